"""Trap-and-emulate: a guest kernel that believes it runs at CPL 0, run at CPL 3.

The engine behind `pyhv run --engine trap` (docs/trap.md). One concept per module:

    monitor.py      the monitor's hidden memory: shadow GDT/IDT/TSS, stubs, page tables
    virtual.py      the virtual CPU: IF, CRs, EFER, descriptor-table registers, MSRs
    guestmem.py     the guest's linear address space as the monitor accesses it
    paging.py       the guest's own 4-level page tables, walked and validated
    shadow.py       the shadow page tables built from them for the real CPU
    descriptors.py  the guest's descriptor tables and the shadow GDT built from them
    context.py      the guest's registers while the monitor holds it
    emulate.py      the privileged instructions, decoded and emulated
    reflect.py      exceptions and interrupts delivered through the guest's own IDT
    stats.py        traps by kind and their cost (`--stats`)
    engine.py       TrapEngine / TrapVcpu: the run loop behind the Engine interface
"""

from pyhv.engines.trap.engine import TrapEngine, TrapVcpu

__all__ = ["TrapEngine", "TrapVcpu"]
