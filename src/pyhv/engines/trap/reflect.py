"""Reflection: exceptions and interrupts delivered through the guest's own (virtual) IDT.

Design: the real IDT belongs to the monitor; the guest's LIDT only records IDTR. When
the guest must see an event (an exception its code raised, an INT n, an interrupt from
the 8259 while its virtual IF is 1), the monitor does what the CPU would do for a kernel
at CPL 0 in long mode (SDM Vol. 3A 6.14), on the guest's memory and virtual CPU:

    gate      16 bytes at IDTR.base + 16 * vector (beyond the limit: #GP(vector*8+2+EXT));
              type 0xE (interrupt) or 0xF (trap), present (else #NP(...));
              its selector a present 64-bit code segment of the virtual GDT
    stack     no privilege change (the guest "is" at CPL 0): the current RSP, or the
              virtual TSS's IST entry when the gate names one; aligned down to 16
    frame     push SS, RSP, RFLAGS (virtual IF and IOPL), CS (the guest's RPL 0
              selector), RIP [, error code]
    then      RIP = the gate's offset, CS = its selector; TF/NT/RF cleared; an
              interrupt gate clears the virtual IF

From the guest's user mode (virtual CS with RPL 3: only the bt engine runs one, the
trap engine's virtual CPU is always at CPL 0) delivery changes privilege as the CPU
does (the caller checks an INT n's gate DPL, engines/bt/user.py): the handler's CS must
be DPL 0; the stack is the virtual TSS's RSP0 (or the gate's IST), SS becomes null, and
the frame holds the user's SS, RSP and CS with RPL 3.

So the guest's handler finds exactly the frame a CPU at CPL 0 would have pushed. Its
IRETQ to that RPL 0 CS faults at CPL 3 and is emulated (emulate.py).

A fault raised while delivering (bad gate, descriptor, stack) follows the double-fault
rules (SDM Table 6-5): contributory after contributory, or #PF after #PF/contributory,
becomes #DF; anything during #DF is a triple fault (`TripleFault`: the vCPU shuts down).
All reads and the frame write happen before any register changes, so a failed delivery
leaves the interrupted state for the next event.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

from pyhv.arch.x86.cpustate import RFLAGS_NT, RFLAGS_RF, RFLAGS_TF, Segment
from pyhv.engines.trap import descriptors, guestmem
from pyhv.engines.trap.context import Held
from pyhv.engines.trap.guestmem import GuestFault, Mem, canonical
from pyhv.engines.trap.virtual import VirtualCpu

DE, DB, BP, UD, NM, DF, TS, NP, SS, GP, PF = 0, 1, 3, 6, 7, 8, 10, 11, 12, 13, 14
CONTRIBUTORY = frozenset((DE, TS, NP, SS, GP))
NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
         8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
         17: "#AC", 18: "#MC", 19: "#XM"}


def name(vector: int) -> str:
    return NAMES.get(vector, f"vector {vector:#x}")


class Kind(Enum):
    EXCEPTION = "exception"     # raised by the CPU (or by the monitor on its behalf)
    SOFTWARE = "software"       # INT n / INT3: returns after the instruction
    EXTERNAL = "external"       # from the interrupt controller


@dataclass
class Event:
    vector: int
    kind: Kind
    error_code: int | None = None
    cr2: int | None = None      # #PF: the virtual CR2 to set before delivering


class TripleFault(Exception):
    """The CPU would shut down: a fault while delivering #DF."""


@dataclass
class Delivered:
    chain: list[str]            # e.g. ["#GP"] or ["#PF", "#DF"]
    vector: int                 # the vector finally delivered
    target: int                 # the handler entered


def deliver(mem: Mem, v: VirtualCpu, h: Held, ev: Event) -> Delivered:
    """Deliver `ev` (and the faults its delivery raises) into the guest held by `h`.

    `h.rip` must already be the return address (the faulting instruction for a fault,
    the next one for INT n). Raises TripleFault when the CPU would shut down.
    """
    chain: list[str] = []
    for _ in range(4):
        chain.append(name(ev.vector))
        try:
            target = _deliver_once(mem, v, h, ev)
            return Delivered(chain, ev.vector, target)
        except GuestFault as f:
            first = ev.vector if ev.kind is not Kind.EXTERNAL else -1
            if first == DF:
                chain.append(name(f.vector))
                raise TripleFault(" -> ".join(chain)) from None
            to_df = ((first in CONTRIBUTORY and f.vector in CONTRIBUTORY)
                     or (first == PF and (f.vector in CONTRIBUTORY or f.vector == PF)))
            if to_df:
                ev = Event(DF, Kind.EXCEPTION, 0)
            else:
                code = f.error_code
                if code is not None and ev.kind is not Kind.SOFTWARE:
                    code |= 1                          # EXT: not the program's doing
                ev = Event(f.vector, Kind.EXCEPTION, code, f.cr2)
    raise TripleFault(" -> ".join(chain))


def _deliver_once(mem: Mem, v: VirtualCpu, h: Held, ev: Event) -> int:
    vec = ev.vector
    ext = 0 if ev.kind is Kind.SOFTWARE else 1
    idt_code = vec * 8 + 2 + ext
    if ev.cr2 is not None:
        v.cr2 = ev.cr2
    if vec * 16 + 15 > v.idt.limit:
        raise GuestFault(GP, idt_code)
    lo, hi = (int(x) for x in struct.unpack("<QQ", guestmem.read(mem, v.idt.base + vec * 16, 16)))
    gate_type = (lo >> 40) & 0x1F                      # S=0 and the 4-bit type
    if gate_type not in (0xE, 0xF):
        raise GuestFault(GP, idt_code)
    user = v.cs.selector & 3 == 3
    if not (lo >> 47) & 1:
        raise GuestFault(NP, idt_code)
    selector = (lo >> 16) & 0xFFFF
    try:
        cs = descriptors.code64(mem, v, selector)
    except GuestFault as f:
        raise GuestFault(f.vector, (f.error_code or 0) | ext, f.cr2) from None
    target = (lo & 0xFFFF) | (((lo >> 48) & 0xFFFF) << 16) | ((hi & 0xFFFF_FFFF) << 32)
    if user and cs.dpl != 0:
        raise GuestFault(GP, (selector & 0xFFFC) | ext)
    if not canonical(target):
        raise GuestFault(GP, ext)
    ist = (lo >> 32) & 7
    rsp = h.rsp
    if ist:
        rsp = guestmem.read_u64(mem, v.tr.base + 0x24 + 8 * (ist - 1))
    elif user:
        rsp = guestmem.read_u64(mem, v.tr.base + 4)          # RSP0
    rsp &= ~0xF
    words = [h.rip, v.cs.selector & (0xFFFF if user else 0xFFFC), v.rflags(h.rflags),
             h.rsp, v.ss.selector]
    if ev.error_code is not None:
        words.insert(0, ev.error_code & 0xFFFF_FFFF)
    frame = struct.pack(f"<{len(words)}Q", *words)
    new_rsp = (rsp - len(frame)) & 0xFFFF_FFFF_FFFF_FFFF
    guestmem.write(mem, new_rsp, frame)
    # committed: nothing below can fail
    h.rip, h.rsp = target, new_rsp
    h.rflags &= ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF)
    if gate_type == 0xE:
        v.if_ = False
    v.cs = cs
    if user:
        v.ss = Segment(selector=0, base=0, limit=0, type=3, s=1, present=0, unusable=1)
    v.sti_shadow = False
    return target
