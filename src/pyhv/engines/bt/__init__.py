"""Binary translation: guest kernel code decoded, rewritten and run from a cache at CPL 3.

The engine behind `pyhv run --engine bt` (docs/bt.md), built on the trap engine's
monitor (engines/trap). One concept per module:

    area.py       the translator's memory: TC, vCPU state page S, lookup tables, CALLOUT
    asm.py        assembling translated code at its final address (iced-x86's encoder)
    translate.py  one guest basic block -> its translation, sites and precise locations
    cache.py      the translation cache: COMMON/MISS, blocks, chaining, invalidation, flush
    state.py      the guest's registers at a call-out (the S page as a `Held`)
    sensitive.py  LAR/LSL/VERR/VERW answered as at CPL 0
    trace.py      `--trace-bt`: each guest block next to its translation
    engine.py     BtEngine / BtVcpu: the run loop behind the Engine interface
"""

from pyhv.engines.bt.engine import BtEngine, BtVcpu

__all__ = ["BtEngine", "BtVcpu"]
