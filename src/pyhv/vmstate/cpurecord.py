"""A vCPU's record: `CpuState` as JSON, and the check that a record is one.

Design: the record is `CpuState.to_dict()` (engine-neutral: what the architecture
defines) plus the machine's per-vCPU flag `wait_sipi` (an AP that has not been started,
or was sent INIT). `cpu_from_record` checks every field's presence, type and range
before it builds the `CpuState`, so a hostile or damaged record is a `StateError` naming
the field, never an exception inside an engine. What it cannot judge (whether this
engine can run the mode the state is in) is the engine's `set_state`, which raises a
`PyhvError` (HostError) of its own.

Invariants: `cpu_from_record(cpu_record(s, w)) == (s, w)` for every state an engine
returns; a record with a field `CpuState` does not have is refused.
"""

from __future__ import annotations

from typing import Any

from pyhv.arch.x86.cpustate import GPRS, SEGMENTS, CpuState, DescriptorTable, Segment
from pyhv.devices.state import U16, U32, U64, Reader
from pyhv.errors import StateError

MAX_MSRS = 256
FXSAVE_SIZE = 512
_SEG_BITS = ("s", "present", "avl", "l", "db", "g", "unusable")


def cpu_record(state: CpuState, wait_sipi: bool) -> dict[str, Any]:
    """One vCPU's JSON-able record."""
    return {"state": state.to_dict(), "wait_sipi": wait_sipi}


def _segment(r: Reader) -> Segment:
    seg = Segment(selector=r.int("selector", 0, U16), base=r.int("base", 0, U64),
                  limit=r.int("limit", 0, U32), type=r.int("type", 0, 15),
                  dpl=r.int("dpl", 0, 3), **{k: r.int(k, 0, 1) for k in _SEG_BITS})
    r.done()
    return seg


def _table(r: Reader) -> DescriptorTable:
    t = DescriptorTable(base=r.int("base", 0, U64), limit=r.int("limit", 0, U16))
    r.done()
    return t


def cpu_from_record(record: object, what: str = "vcpu") -> tuple[CpuState, bool]:
    """(state, wait_sipi) from a record, every field checked; StateError if it is not one."""
    outer = Reader(what, record)
    wait_sipi = outer.bool("wait_sipi")
    r = outer.sub("state")
    outer.done()
    st = CpuState()
    for name in (*GPRS, "rip", "rflags", "cr0", "cr2", "cr3", "cr4", "efer", "apic_base",
                 "xcr0"):
        setattr(st, name, r.int(name, 0, U64))
    st.cr8 = r.int("cr8", 0, 15)
    for name in SEGMENTS:
        setattr(st, name, _segment(r.sub(name)))
    st.gdt = _table(r.sub("gdt"))
    st.idt = _table(r.sub("idt"))
    st.msrs = r.int_map("msrs", key_hi=U32, hi=U64, max_len=MAX_MSRS)
    st.fxsave = r.opt_hex("fxsave", length=FXSAVE_SIZE)
    st.pending_interrupt = r.opt_int("pending_interrupt", 0, 0xFF)
    st.interrupt_shadow = r.int("interrupt_shadow", 0, 3)
    st.halted = r.bool("halted")
    st.nmi_blocked = r.bool("nmi_blocked")
    r.done()
    if st.rflags & ~0x3F7FD7 or not st.rflags & 2:
        raise StateError(f"{what}.state: rflags {st.rflags:#x} has reserved bits wrong")
    if st.cr0 >> 32 or st.cr4 >> 32:
        raise StateError(f"{what}.state: cr0/cr4 have bits above 31 set")
    if st.cr0 & (1 << 31) and not st.cr0 & 1:
        raise StateError(f"{what}.state: cr0 {st.cr0:#x} has PG without PE")
    return st, wait_sipi

