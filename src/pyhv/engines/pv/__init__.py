"""Paravirtualization: pyhv's hypercall ABI and the engine that answers it.

The engine behind `pyhv run --engine pv` (docs/pv.md): the trap engine's monitor plus
hypercalls. One concept per module:

    abi.py      the ABI a PV kernel is written against: hypercall page, shared page,
                hypercall numbers and arguments, events
    engine.py   PvEngine / PvVcpu: hypercalls, the shared page, event delivery to the
                kernel's callback
"""

from pyhv.engines.pv.engine import PvEngine, PvVcpu

__all__ = ["PvEngine", "PvVcpu"]
