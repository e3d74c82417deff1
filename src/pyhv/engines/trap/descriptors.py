"""The guest's (virtual) descriptor tables, and the shadow GDT built from them.

Design: the guest's LGDT only records GDTR in the virtual CPU; the monitor then copies
the guest's descriptors into the real (shadow) GDT, with one change: every present code
or data descriptor gets DPL 3, so that code running at real CPL 3 can load the guest's
own selectors into DS/ES/FS/GS without a trap (the classic shadow-GDT trick). System
descriptors (TSS, LDT) are not copied: LTR/LLDT are emulated against the virtual tables.

Which selectors the real CPU runs with: CS = the guest's CS index with RPL 3 when the
shadow holds a DPL 3 64-bit code descriptor there, SS likewise for a writable data
descriptor; otherwise the monitor's fallback descriptors (monitor.SEL_UCODE/SEL_UDATA).
So `mov ax, cs` in the guest shows its own index with RPL 3: deprivileging is visible.

Coherence limit (documented in docs/trap.md): the shadow is rebuilt at LGDT and when a
segment load faults, not when the guest writes its GDT in place; a real monitor
write-protects the guest's GDT pages to catch that.

Every descriptor the guest names is checked as a CPU at CPL 0 would (SDM Vol. 3A 5.5,
6.14): outside the table -> #GP(selector), not present -> #NP(selector), wrong type ->
#GP(selector). A GDT in memory the guest cannot reach faults as the CPU would (#PF/#GP).
"""

from __future__ import annotations

import struct

from pyhv.arch.x86 import gdt
from pyhv.arch.x86.cpustate import DescriptorTable, Segment
from pyhv.engines.trap import guestmem
from pyhv.engines.trap.guestmem import GuestFault, Mem
from pyhv.engines.trap.monitor import MIRROR_END, SEL_UCODE, SEL_UDATA, MonitorArea
from pyhv.engines.trap.virtual import VirtualCpu

GP, NP = 13, 11
_S, _P = 1 << 44, 1 << 47
_DPL3 = 3 << 45


def raw(mem: Mem, v: VirtualCpu, selector: int, *, wide: bool = False
        ) -> tuple[int, int]:
    """(low, high) 8-byte halves of the descriptor `selector` names in the virtual tables."""
    index = selector & 0xFFF8
    if selector & 4:                               # TI: the LDT
        if v.ldt.unusable or not v.ldt.present:
            raise GuestFault(GP, selector & 0xFFFC)
        base, limit = v.ldt.base, v.ldt.limit
    else:
        base, limit = v.gdt.base, v.gdt.limit
    if index + (15 if wide else 7) > limit:
        raise GuestFault(GP, selector & 0xFFFC)
    lo = guestmem.read_u64(mem, base + index)
    hi = guestmem.read_u64(mem, base + index + 8) if wide else 0
    return lo, hi


def code64(mem: Mem, v: VirtualCpu, selector: int) -> Segment:
    """The 64-bit code segment `selector` names (for CS at virtual CPL 0)."""
    err = selector & 0xFFFC
    if err == 0:
        raise GuestFault(GP, 0)
    lo, _ = raw(mem, v, selector)
    seg = gdt.decode(selector & 0xFFFC, lo)
    if not seg.s or not seg.type & 8 or not seg.l or seg.db:
        raise GuestFault(GP, err)
    if not seg.present:
        raise GuestFault(NP, err)
    return seg


def stack(mem: Mem, v: VirtualCpu, selector: int) -> Segment:
    """The stack segment `selector` names at virtual CPL 0 (null is allowed in 64-bit)."""
    err = selector & 0xFFFC
    if err == 0:
        return Segment(selector=selector & 3, base=0, limit=0, type=3, s=1, present=0,
                       unusable=1)
    lo, _ = raw(mem, v, selector)
    seg = gdt.decode(err, lo)
    if not seg.s or seg.type & 8 or not seg.type & 2 or seg.dpl != 0 or selector & 3:
        raise GuestFault(GP, err)
    if not seg.present:
        raise GuestFault(12, err)                  # #SS
    return seg


def system(mem: Mem, v: VirtualCpu, selector: int, types: tuple[int, ...]
           ) -> tuple[Segment, int]:
    """(segment, descriptor address) of an LDT or TSS descriptor in the GDT."""
    err = selector & 0xFFFC
    if selector & 4 or err == 0:
        raise GuestFault(GP, err)
    lo, hi = raw(mem, v, selector, wide=True)
    seg = gdt.decode(err, lo, hi)
    if seg.s or seg.type not in types:
        raise GuestFault(GP, err)
    if not seg.present:
        raise GuestFault(NP, err)
    return seg, v.gdt.base + (selector & 0xFFF8)


def shadow_image(mem: Mem, table: DescriptorTable) -> bytes:
    """The guest's GDT as the shadow holds it: code/data at DPL 3, system slots empty."""
    size = min(table.limit + 1, MIRROR_END) & ~7
    try:
        data = guestmem.read(mem, table.base, size) if size else b""
    except GuestFault:
        data = b""                                 # unreadable: every load will fault
    out = bytearray(len(data))
    skip = False
    for off in range(0, len(data), 8):
        if skip:
            skip = False
            continue
        (d,) = struct.unpack_from("<Q", data, off)
        if d & _P and d & _S:
            struct.pack_into("<Q", out, off, d | _DPL3)
        elif d & _P:
            skip = True                            # a 16-byte system descriptor
    return bytes(out)


def real_selectors(area: MonitorArea, v: VirtualCpu) -> tuple[int, int]:
    """(CS, SS) the real CPU runs the guest with (RPL 3, shadow or fallback)."""
    cs = v.cs.selector | 3
    d = area.shadow_descriptor(cs) if cs & 0xFFF8 and not cs & 4 else 0
    ok = (d & _P and d & _S and (d >> 43) & 1 and (d >> 53) & 1 and not (d >> 54) & 1
          and (d >> 45) & 3 == 3)
    real_cs = cs if ok else SEL_UCODE
    ss = v.ss.selector | 3
    d = area.shadow_descriptor(ss) if ss & 0xFFF8 and not ss & 4 else 0
    ok = (d & _P and d & _S and not (d >> 43) & 1 and (d >> 41) & 1
          and (d >> 45) & 3 == 3)
    return real_cs, ss if ok else SEL_UDATA
