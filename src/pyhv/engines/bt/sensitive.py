"""LAR, LSL, VERR and VERW as a CPU at CPL 0 would answer them, on the virtual GDT/LDT.

Design: natively at CPL 3 these four look at the real (shadow) GDT, where the guest's
code and data descriptors carry DPL 3 and its system descriptors are absent, so they
answer for the monitor's tables, silently (docs/popek.md). The translator calls them
out (translate.py, kind "lar") and this module gives the CPL 0 answer from the guest's
own descriptor tables (SDM Vol. 2, LAR/LSL/VERR/VERW; 64-bit mode, CPL 0):

    null selector, outside the table            ZF=0
    code/data: LAR, LSL                         ZF=1 if conforming code or DPL >= RPL
    VERR                                        readable (data, or code with R) and
                                                (conforming or DPL >= RPL)
    VERW                                        writable data and DPL >= RPL
    system: LAR                                 LDT (2), TSS (9, 0xB), call gate (0xC)
    system: LSL                                 LDT, TSS; VERR/VERW never

LAR's result is the descriptor's second dword masked with 0x00F0FF00 (0xFF00 for a
16-bit destination; bits 19:16 are undefined in the SDM's 00FxFF00H, and zero here as in
QEMU), LSL's the limit in bytes (granularity applied). Only ZF changes in
RFLAGS; the destination is written only when ZF=1. A descriptor table the guest cannot
read faults as the CPU would (the fault is returned as an Event to deliver).
"""

from __future__ import annotations

import iced_x86 as ix

from pyhv.engines.trap import descriptors, guestmem
from pyhv.engines.trap.context import Held
from pyhv.engines.trap.emulate import Emulator
from pyhv.engines.trap.guestmem import GuestFault, Mem
from pyhv.engines.trap.reflect import Event, Kind
from pyhv.engines.trap.virtual import VirtualCpu

M = ix.Mnemonic
ZF = 1 << 6
GP = 13


def check(mem: Mem, v: VirtualCpu, mn: int, selector: int) -> tuple[bool, int, int]:
    """(ZF, low, high dword pair as one int) for `mn` on `selector` at CPL 0."""
    if selector & 0xFFFC == 0:
        return False, 0, 0
    try:
        lo, _ = descriptors.raw(mem, v, selector)
    except GuestFault as f:
        if f.vector == GP:
            return False, 0, 0
        raise
    s, typ, dpl, rpl = (lo >> 44) & 1, (lo >> 40) & 0xF, (lo >> 45) & 3, selector & 3
    if s:
        code = bool(typ & 8)
        conforming = code and bool(typ & 4)
        if mn in (M.LAR, M.LSL):
            ok = conforming or dpl >= rpl
        elif mn == M.VERR:
            ok = (not code or bool(typ & 2)) and (conforming or dpl >= rpl)
        else:
            ok = not code and bool(typ & 2) and dpl >= rpl
    elif mn == M.LAR:
        ok = typ in (0x2, 0x9, 0xB, 0xC) and dpl >= rpl
    elif mn == M.LSL:
        ok = typ in (0x2, 0x9, 0xB) and dpl >= rpl
    else:
        ok = False
    return ok, lo, lo >> 32


def lar_family(mem: Mem, v: VirtualCpu, h: Held, insn: bytes, emu: Emulator
               ) -> Event | None:
    """Carry out the instruction at h.rip on `h`; an Event if it faults."""
    i = ix.Decoder(64, insn, ip=h.rip).decode()
    mn = i.mnemonic
    src = 1 if mn in (M.LAR, M.LSL) else 0
    try:
        if i.op_kind(src) == ix.OpKind.REGISTER:
            sel = emu._reg(h, i.op_register(src)) & 0xFFFF
        else:
            sel = int.from_bytes(guestmem.read(mem, emu._ea(h, i), 2), "little")
        ok, lo, hi = check(mem, v, mn, sel)
    except GuestFault as f:
        return Event(f.vector, Kind.EXCEPTION, f.error_code, f.cr2)
    h.rflags = (h.rflags | ZF) if ok else (h.rflags & ~ZF)
    if ok and mn in (M.LAR, M.LSL):
        size = ix.RegisterInfo(i.op0_register).size
        if mn == M.LAR:
            value = hi & (0xFF00 if size == 2 else 0x00F0_FF00)
        else:
            value = (lo & 0xFFFF) | ((lo >> 32) & 0xF_0000)
            if (lo >> 55) & 1:
                value = (value << 12) | 0xFFF
        emu._set_reg(h, i.op0_register, value)
    h.rip = i.next_ip
    return None
