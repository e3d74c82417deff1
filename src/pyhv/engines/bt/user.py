"""Guest user mode on bt: the transitions between the guest's CPL 0 and its CPL 3.

Design: VMware's monitor ran guest user code directly and translated only the kernel.
So does bt: while the virtual CPU is at CPL 3 (its CS has RPL 3) the guest's own code
runs natively at the real CPL 3 on a second shadow root (shadow.py `user_only`) that
maps only what the guest's tables give CPL 3, with the guest's own XD, and neither the
translator's area nor anything of the kernel's supervisor pages; the translation cache
is not even mapped, so user code cannot jump into translated kernel code.

The ways in and out, each carried out here on the virtual CPU as a CPU would (SDM Vol.
3A 6.14, Vol. 2 IRET/SYSCALL/SYSRET), with the guest's registers in a `Held`:

    kernel -> user   IRETQ to an RPL 3 CS (`iret_to_user`), SYSRETQ (`sysret`); both
                     are call-outs of translated kernel code
    user -> kernel   SYSCALL (the real EFER.SCE is 0: a #UD in user mode, `syscall`),
                     INT n (the monitor's gates are DPL 0: #GP(n*8+2), delivered by
                     reflect.py, which checks the guest gate's DPL), exceptions and
                     external interrupts (reflect.py's privilege change: RSP0, the
                     user's SS:RSP and CS in the frame)

Invariants: a transition commits nothing before every check passed (a failed check
is the guest's fault, raised as GuestFault before any register changes); only 64-bit
user mode is run (a compatibility-mode CS is refused with a clear error, not run
wrongly); user mode is entered only with the guest's IOPL below 3, so every IN/OUT/
CLI/STI of user code faults and is reflected as on a CPU at CPL 3 (with IOPL 3 the CPU
would let them through: refused with a clear error). Known difference: PUSHF in user
mode shows the real IF (1) where the guest returned to user mode with IF 0 (VMware
translated such user code; bt runs it directly).
"""

from __future__ import annotations

import struct

from pyhv.arch.x86 import gdt
from pyhv.arch.x86 import msr as M
from pyhv.arch.x86.cpustate import RFLAGS_FIXED, RFLAGS_IF, RFLAGS_IOPL, Segment
from pyhv.engines.trap import descriptors, guestmem
from pyhv.engines.trap.context import Held
from pyhv.engines.trap.guestmem import GuestFault, Mem, canonical
from pyhv.engines.trap.virtual import VirtualCpu

GP, NP, SS, UD = 13, 11, 12, 6
EFER_SCE = 1 << 0
IRET_FLAGS = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x400 | 0x800 | 0x40000 | 0x200000 | 0x100
SYSRET_FLAGS = 0x3C7FD7       # what SYSRET takes from R11 (RF, VM and reserved bits clear)
RFLAGS_RF = 1 << 16


class Refused(Exception):
    """User mode the engine does not run (compatibility mode, IOPL 3): end clearly."""


def in_user(v: VirtualCpu) -> bool:
    """The virtual CPU is at CPL 3."""
    return v.cs.selector & 3 == 3


def int_refused(mem: Mem, v: VirtualCpu, n: int) -> bool:
    """INT n at CPL 3 through a gate of DPL < 3: #GP(n*8+2) at the INT itself (a gate
    beyond the IDT's limit or unreadable is left to delivery, which faults on it)."""
    if n * 16 + 15 > v.idt.limit:
        return False
    try:
        lo = guestmem.read_u64(mem, v.idt.base + n * 16)
    except GuestFault:
        return False
    return (lo >> 45) & 3 < 3


def _flat(selector: int, *, code: bool) -> Segment:
    """The fixed flat descriptors SYSCALL/SYSRET load (no GDT read)."""
    dpl = selector & 3
    if code:
        return Segment(selector=selector, base=0, limit=0xFFFFFFFF, type=0xB, s=1, dpl=dpl,
                       present=1, l=1, db=0, g=1)
    return Segment(selector=selector, base=0, limit=0xFFFFFFFF, type=0x3, s=1, dpl=dpl,
                   present=1, l=0, db=1, g=1)


def _enter(v: VirtualCpu, h: Held, rip: int, rsp: int, rflags: int) -> None:
    if (rflags & RFLAGS_IOPL) == RFLAGS_IOPL:
        raise Refused("guest user mode with IOPL 3 (its port I/O and CLI/STI would be "
                      "legal at CPL 3): the bt engine runs user mode with IOPL 0..2 only")
    v.if_ = bool(rflags & RFLAGS_IF)
    v.iopl = (rflags & RFLAGS_IOPL) >> 12
    h.rip, h.rsp = rip, rsp
    h.rflags = (rflags & IRET_FLAGS) | RFLAGS_FIXED | RFLAGS_IF


def iret_to_user(mem: Mem, v: VirtualCpu, h: Held) -> None:
    """IRETQ at CPL 0 whose frame names an RPL 3 CS: to guest user mode."""
    data = guestmem.read(mem, h.rsp, 40)
    rip, cs_sel, rflags, rsp, ss_sel = struct.unpack("<5Q", data)
    cs_sel &= 0xFFFF
    ss_sel &= 0xFFFF
    if not cs_sel & 0xFFFC:
        raise GuestFault(GP, 0)
    lo, _ = descriptors.raw(mem, v, cs_sel)
    cs = gdt.decode(cs_sel, lo)
    if not cs.s or not cs.type & 8 or cs.dpl != 3 or cs.type & 4:
        raise GuestFault(GP, cs_sel & 0xFFFC)         # not a non-conforming DPL 3 code
    if not cs.present:
        raise GuestFault(NP, cs_sel & 0xFFFC)
    if not cs.l or cs.db:
        raise Refused(f"IRETQ to CS {cs_sel:#06x}, a compatibility-mode (32-bit) user "
                      "segment: the bt engine runs 64-bit guest user mode only")
    if ss_sel & 3 != 3 or not ss_sel & 0xFFFC:
        raise GuestFault(GP, ss_sel & 0xFFFC)
    lo, _ = descriptors.raw(mem, v, ss_sel)
    ss = gdt.decode(ss_sel, lo)
    if not ss.s or ss.type & 8 or not ss.type & 2 or ss.dpl != 3:
        raise GuestFault(GP, ss_sel & 0xFFFC)
    if not ss.present:
        raise GuestFault(SS, ss_sel & 0xFFFC)
    if not canonical(rip):
        raise GuestFault(GP, 0)
    _enter(v, h, rip, rsp, rflags)
    v.cs, v.ss = cs, ss


def sysret(v: VirtualCpu, h: Held) -> None:
    """SYSRETQ at CPL 0: RIP = RCX, RFLAGS = R11, the fixed user CS/SS from STAR."""
    if not v.efer & EFER_SCE:
        raise GuestFault(UD, None)
    rip = h.gpr(1)
    if not canonical(rip):
        raise GuestFault(GP, 0)
    base = (v.msrs.get(M.STAR, 0) >> 48) & 0xFFFF
    _enter(v, h, rip, h.rsp, (h.gpr(11) & SYSRET_FLAGS) | RFLAGS_FIXED)
    v.cs = _flat(((base + 16) & 0xFFFC) | 3, code=True)
    v.ss = _flat(((base + 8) & 0xFFFC) | 3, code=False)


def syscall(v: VirtualCpu, h: Held, next_rip: int) -> None:
    """SYSCALL at CPL 3: RCX = the next RIP, R11 = RFLAGS, CS/SS from STAR, RIP = LSTAR,
    RFLAGS masked by SFMASK."""
    if not v.efer & EFER_SCE:
        raise GuestFault(UD, None)
    flags = v.rflags(h.rflags)
    h.set_gpr(1, next_rip)
    h.set_gpr(11, flags & ~RFLAGS_RF)
    new = flags & ~(v.msrs.get(M.SFMASK, 0) | RFLAGS_RF)
    v.if_ = bool(new & RFLAGS_IF)
    v.iopl = (new & RFLAGS_IOPL) >> 12
    h.rflags = (new & ~(RFLAGS_IF | RFLAGS_IOPL)) | RFLAGS_FIXED | RFLAGS_IF
    h.rip = v.msrs.get(M.LSTAR, 0)
    base = (v.msrs.get(M.STAR, 0) >> 32) & 0xFFFC
    v.cs = _flat(base, code=True)
    v.ss = _flat(base + 8, code=False)
