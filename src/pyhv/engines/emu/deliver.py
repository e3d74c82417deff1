"""Exception and interrupt delivery through the guest's IDT, as the CPU does it.

unicorn raises exceptions but never delivers them (docs/host.md): its interrupt hook gets the
vector and pyhv must do what the processor does (SDM Vol. 3A, chapter 6):

    real mode       IVT entry (offset:segment) at IDTR.base + 4 * vector; push FLAGS, CS,
                    IP; clear IF, TF, AC
    protected mode  8-byte gate (interrupt/trap, 16 or 32-bit); target code segment from
                    the GDT/LDT; to a more privileged level the new SS:ESP comes from the
                    TSS and the old SS:ESP is pushed; push EFLAGS, CS, EIP [, error code]
    long mode       16-byte gate; 64-bit target code segment; new RSP from TSS.RSPn on a
                    privilege change or from TSS.ISTn when the gate names an IST; RSP
                    aligned to 16; push SS, RSP, RFLAGS, CS, RIP [, error code]; SS becomes
                    the null selector with RPL = new CPL on a privilege change

Interrupt gates clear IF; both kinds clear TF, NT, RF and VM. Software interrupts (INT n,
INT3, INTO) check the gate's DPL against CPL and return after the instruction; faults
return to the faulting instruction. A fault while delivering (bad gate, descriptor, TSS,
stack page) becomes the next event by the double-fault rules (SDM Table 6-5):
contributory+contributory or page-fault+(contributory|page-fault) -> #DF, anything during
#DF -> triple fault, which ends the run (`TripleFault`). Error codes from nested faults
carry EXT=1 when the event being delivered was external or a hardware exception.

Invariant: all reads and pushes happen before any register changes, so a failed delivery
leaves the interrupted state intact for the next event's delivery; `CpuView.commit`
publishes the result in one step.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

from pyhv.engines.emu import layout as L
from pyhv.engines.emu.cpu import CpuView, descriptor_cache
from pyhv.engines.emu.mmu import BadPhysical, Mmu, PageFault
from pyhv.memory import GuestMemory

DE, DB, NMI, BP, OF, BR, UD, NM, DF, TS, NP, SS, GP, PF, MF, AC, MC, XM = (
    0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19)
ERROR_CODE_VECTORS = frozenset((DF, TS, NP, SS, GP, PF, AC, 21))
CONTRIBUTORY = frozenset((DE, TS, NP, SS, GP))
NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
         8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
         17: "#AC", 18: "#MC", 19: "#XM"}

IF, TF, NT, RF, VM, AC_FLAG = 1 << 9, 1 << 8, 1 << 14, 1 << 16, 1 << 17, 1 << 18


class Kind(Enum):
    EXCEPTION = "exception"     # raised by the CPU (fault or trap)
    SOFTWARE = "software"       # INT n / INT3 / INTO: DPL checked, returns after the insn
    EXTERNAL = "external"       # from the interrupt controller


@dataclass
class Event:
    vector: int
    kind: Kind
    error_code: int | None = None
    return_rip: int = 0         # where IRET goes back to
    cr2: int | None = None      # set CR2 before delivering (#PF found by pyhv itself)


class Fault(Exception):
    """A fault raised while delivering (becomes the next event)."""

    def __init__(self, vector: int, error_code: int | None = 0, cr2: int | None = None) -> None:
        super().__init__(f"{NAMES.get(vector, vector)} ({error_code})")
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2


class TripleFault(Exception):
    """The CPU would shut down: a fault while delivering #DF."""


def name(vector: int) -> str:
    return NAMES.get(vector, f"vector {vector:#x}")


# ---------------------------------------------------------------------- entry point


def deliver(cpu: CpuView, mem: GuestMemory, ev: Event) -> list[str]:
    """Deliver ev (and the faults its delivery raises); returns the chain for reports.

    Raises TripleFault when the CPU would shut down. `cpu` must be loaded; on return the
    new state is committed.
    """
    chain: list[str] = []
    for _ in range(4):
        chain.append(name(ev.vector))
        try:
            _deliver_once(cpu, mem, ev)
            return chain
        except Fault as f:
            if f.cr2 is not None:
                cpu.b.set_cr(2, f.cr2)
            first = ev.vector if ev.kind is not Kind.EXTERNAL else -1
            if first == DF:
                chain.append(name(f.vector))
                raise TripleFault(" -> ".join(chain)) from None
            ext = ev.kind is not Kind.SOFTWARE
            to_df = ((first in CONTRIBUTORY and f.vector in CONTRIBUTORY)
                     or (first == PF and (f.vector in CONTRIBUTORY or f.vector == PF)))
            if to_df:
                ev = Event(DF, Kind.EXCEPTION, 0, ev.return_rip if ev.kind is not Kind.SOFTWARE
                           else ev.return_rip)
            else:
                code = f.error_code
                if code is not None and ext:
                    code |= 1
                ev = Event(f.vector, Kind.EXCEPTION, code, _fault_rip(cpu, mem, ev))
    raise TripleFault(" -> ".join(chain))


def _fault_rip(cpu: CpuView, mem: GuestMemory, ev: Event) -> int:
    """Where a fault raised while delivering ev returns: the instruction that caused ev."""
    if ev.kind is not Kind.SOFTWARE:
        return ev.return_rip
    # INT3 (CC) and INTO (CE) are one byte; INT n (CD nn) is two
    length = 2
    if ev.vector in (BP, OF):
        try:
            mmu = _mmu(cpu, mem)
            cs_base = cpu.seg("cs")[1]
            if mmu.read(cs_base + ev.return_rip - 1, 1)[0] in (0xCC, 0xCE):
                length = 1
        except (PageFault, BadPhysical):
            pass
    return ev.return_rip - length


def _mmu(cpu: CpuView, mem: GuestMemory) -> Mmu:
    return Mmu(mem, cpu.cr0, cpu.cr3, cpu.cr4, cpu.efer)


def _deliver_once(cpu: CpuView, mem: GuestMemory, ev: Event) -> None:
    if ev.cr2 is not None:
        cpu.b.set_cr(2, ev.cr2)
    mmu = _mmu(cpu, mem)
    try:
        if not cpu.protected:
            _real(cpu, mmu, ev)
        elif cpu.long_mode:
            _long(cpu, mmu, ev)
        else:
            _protected(cpu, mmu, ev)
    except PageFault as pf:
        raise Fault(PF, pf.error_code, cr2=pf.addr) from None
    except BadPhysical:
        raise Fault(GP, 0) from None
    cpu.commit()


# ---------------------------------------------------------------------- helpers


def _ext(ev: Event) -> int:
    return 0 if ev.kind is Kind.SOFTWARE else 1


def _idt_code(ev: Event) -> int:
    """Error code naming the IDT entry (IDT bit set)."""
    return ev.vector * 8 + 2 + _ext(ev)


def _descriptor(cpu: CpuView, mmu: Mmu, sel: int, ev: Event, *, wide: bool = False
                ) -> tuple[int, int]:
    """The raw descriptor (low 8 bytes, high 8 bytes if wide) for a selector."""
    idx = sel & ~7
    if sel & 4:
        _s, base, limit, flags = cpu.seg("ldt")
        if not flags & L.DESC_P:
            raise Fault(GP, (sel & ~3) | _ext(ev))
    else:
        base, limit = cpu.table("gdt")
    if idx + (15 if wide else 7) > limit:
        raise Fault(GP, (sel & ~3) | _ext(ev))
    lo = mmu.read_u64(base + idx)
    hi = mmu.read_u64(base + idx + 8) if wide else 0
    return lo, hi


def _target_cs(cpu: CpuView, mmu: Mmu, sel: int, ev: Event, *, long: bool
               ) -> tuple[int, int, int, int]:
    """(new CPL, base, limit, flags) for the gate's code segment, with its checks."""
    code = (sel & ~3) | _ext(ev)
    if sel & ~3 == 0:
        raise Fault(GP, _ext(ev))
    desc, _ = _descriptor(cpu, mmu, sel, ev)
    base, limit, flags = descriptor_cache(desc)
    dpl = (flags >> 13) & 3
    if not flags & L.DESC_S or not (flags >> 8) & 8 or dpl > cpu.cpl:
        raise Fault(GP, code)
    if long and (not flags & L.DESC_L or flags & L.DESC_B):
        raise Fault(GP, code)
    if not flags & L.DESC_P:
        raise Fault(NP, code)
    conforming = bool((flags >> 8) & 4)
    new_cpl = cpu.cpl if conforming else dpl
    return new_cpl, base, limit, flags


def _rflags_after(cpu: CpuView, interrupt_gate: bool) -> int:
    fl = cpu.rflags & ~(TF | NT | RF | VM)
    if interrupt_gate:
        fl &= ~IF
    return fl


# ---------------------------------------------------------------------- real mode


def _real(cpu: CpuView, mmu: Mmu, ev: Event) -> None:
    base, limit = cpu.table("idt")
    if ev.vector * 4 + 3 > limit:
        raise Fault(GP, 0)
    off, seg = struct.unpack("<HH", mmu.read(base + ev.vector * 4, 4))
    ss_sel, ss_base, _lim, _fl = cpu.seg("ss")
    cs_sel = cpu.seg("cs")[0]
    sp = cpu.reg("rsp")
    frame = struct.pack("<HHH", ev.return_rip & 0xFFFF, cs_sel, cpu.rflags & 0xFFFF)
    new_sp = (sp - 6) & 0xFFFF
    for i in range(0, 6, 2):    # each word wraps within the 64 KiB segment
        mmu.write(ss_base + ((new_sp + i) & 0xFFFF), frame[i:i + 2])
    cpu.set_reg("rsp", (sp & ~0xFFFF) | new_sp)
    _s, _b, cs_limit, cs_flags = cpu.seg("cs")
    cpu.set_seg("cs", seg, seg << 4, cs_limit, cs_flags)
    cpu.rip = off
    cpu.rflags &= ~(IF | TF | AC_FLAG | RF)


# ---------------------------------------------------------------------- protected mode


def _protected(cpu: CpuView, mmu: Mmu, ev: Event) -> None:
    if cpu.rflags & VM:
        raise Fault(GP, 0)   # virtual-8086 delivery is not supported: guests see #GP -> #DF
    base, limit = cpu.table("idt")
    if ev.vector * 8 + 7 > limit:
        raise Fault(GP, _idt_code(ev))
    gate = mmu.read_u64(base + ev.vector * 8)
    gtype = (gate >> 40) & 0xF
    gdpl = (gate >> 45) & 3
    if gtype not in (0x6, 0x7, 0xE, 0xF):
        raise Fault(GP, _idt_code(ev))      # task gates (0x5) are not supported
    if ev.kind is Kind.SOFTWARE and gdpl < cpu.cpl:
        raise Fault(GP, _idt_code(ev))
    if not (gate >> 47) & 1:
        raise Fault(NP, _idt_code(ev))
    is32 = gtype >= 0xE
    offset = (gate & 0xFFFF) | ((gate >> 32) & 0xFFFF0000)
    if not is32:
        offset &= 0xFFFF
    sel = (gate >> 16) & 0xFFFF
    new_cpl, cs_base, cs_limit, cs_flags = _target_cs(cpu, mmu, sel, ev, long=False)
    old_cpl = cpu.cpl
    old_ss = cpu.seg("ss")
    old_esp = cpu.reg("rsp")
    wsize = 4 if is32 else 2
    fmt = "<I" if is32 else "<H"
    items: list[int] = []
    if new_cpl < old_cpl:
        tr_sel, tr_base, tr_limit, tr_flags = cpu.seg("tr")
        tss32 = ((tr_flags >> 8) & 0xF) in (0x9, 0xB)
        if tss32:
            off = 4 + 8 * new_cpl
            if off + 5 > tr_limit:
                raise Fault(TS, (tr_sel & ~3) | _ext(ev))
            esp = mmu.read_u32(tr_base + off)
            ss_sel = mmu.read_u16(tr_base + off + 4)
        else:
            off = 2 + 4 * new_cpl
            if off + 3 > tr_limit:
                raise Fault(TS, (tr_sel & ~3) | _ext(ev))
            esp = mmu.read_u16(tr_base + off)
            ss_sel = mmu.read_u16(tr_base + off + 2)
        if ss_sel & ~3 == 0 or ss_sel & 3 != new_cpl:
            raise Fault(TS, (ss_sel & ~3) | _ext(ev))
        ss_desc, _ = _descriptor(cpu, mmu, ss_sel, ev)
        ss_base, ss_limit, ss_flags = descriptor_cache(ss_desc)
        if (not ss_flags & L.DESC_S or (ss_flags >> 8) & 8 or not (ss_flags >> 8) & 2
                or (ss_flags >> 13) & 3 != new_cpl):
            raise Fault(TS, (ss_sel & ~3) | _ext(ev))
        if not ss_flags & L.DESC_P:
            raise Fault(SS, (ss_sel & ~3) | _ext(ev))
        items += [old_ss[0], old_esp & 0xFFFFFFFF]
        new_ss = (ss_sel, ss_base, ss_limit, ss_flags)
        sp = esp
    else:
        new_ss = old_ss
        sp = old_esp
    items += [cpu.rflags & 0xFFFFFFFF, cpu.seg("cs")[0], ev.return_rip & 0xFFFFFFFF]
    if ev.error_code is not None:
        items.append(ev.error_code & 0xFFFFFFFF)
    frame = b"".join(struct.pack(fmt, v & (0xFFFFFFFF if is32 else 0xFFFF))
                     for v in reversed(items))
    big = bool(new_ss[3] & L.DESC_B)
    mask = 0xFFFFFFFF if big else 0xFFFF
    new_sp = (sp - wsize * len(items)) & mask
    mmu.write(new_ss[1] + new_sp, frame)
    if new_cpl < old_cpl:
        cpu.set_seg("ss", *new_ss)
    cpu.set_reg("rsp", (sp & ~mask) | new_sp if not big else new_sp)
    cpu.set_seg("cs", (sel & ~3) | new_cpl, cs_base, cs_limit, cs_flags)
    cpu.rip = offset
    cpu.rflags = _rflags_after(cpu, interrupt_gate=gtype in (0x6, 0xE))


# ---------------------------------------------------------------------- long mode


def _long(cpu: CpuView, mmu: Mmu, ev: Event) -> None:
    base, limit = cpu.table("idt")
    if ev.vector * 16 + 15 > limit:
        raise Fault(GP, _idt_code(ev))
    lo = mmu.read_u64(base + ev.vector * 16)
    hi = mmu.read_u64(base + ev.vector * 16 + 8)
    gtype = (lo >> 40) & 0xF
    gdpl = (lo >> 45) & 3
    if gtype not in (0xE, 0xF):
        raise Fault(GP, _idt_code(ev))
    if ev.kind is Kind.SOFTWARE and gdpl < cpu.cpl:
        raise Fault(GP, _idt_code(ev))
    if not (lo >> 47) & 1:
        raise Fault(NP, _idt_code(ev))
    offset = (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF0000) | ((hi & 0xFFFFFFFF) << 32)
    sel = (lo >> 16) & 0xFFFF
    ist = (lo >> 32) & 7
    new_cpl, cs_base, cs_limit, cs_flags = _target_cs(cpu, mmu, sel, ev, long=True)
    old_cpl = cpu.cpl
    tr_sel, tr_base, tr_limit, _trf = cpu.seg("tr")
    if ist or new_cpl < old_cpl:
        off = 36 + 8 * (ist - 1) if ist else 4 + 8 * new_cpl
        if off + 7 > tr_limit:
            raise Fault(TS, (tr_sel & ~3) | _ext(ev))
        rsp = mmu.read_u64(tr_base + off)
    else:
        rsp = cpu.reg("rsp")
    rsp &= ~0xF
    ss_sel = cpu.seg("ss")[0]
    items = [ss_sel, cpu.reg("rsp"), cpu.rflags, cpu.seg("cs")[0], ev.return_rip]
    if ev.error_code is not None:
        items.append(ev.error_code & 0xFFFFFFFF)
    new_rsp = (rsp - 8 * len(items)) & 0xFFFFFFFFFFFFFFFF
    if not _canonical(new_rsp) or not _canonical(offset):
        raise Fault(SS if not _canonical(new_rsp) else GP, 0)
    frame = b"".join(struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF) for v in reversed(items))
    mmu.write(new_rsp, frame)
    if new_cpl < old_cpl:
        # null SS with RPL = new CPL; the cache keeps a usable flat data segment at that DPL
        cpu.set_seg("ss", new_cpl, 0, 0xFFFFFFFF,
                    L.DESC_P | L.DESC_S | (3 << 8) | (new_cpl << 13) | L.DESC_B | L.DESC_G)
    cpu.set_reg("rsp", new_rsp)
    cpu.set_seg("cs", (sel & ~3) | new_cpl, cs_base, cs_limit, cs_flags)
    cpu.rip = offset
    cpu.rflags = _rflags_after(cpu, interrupt_gate=gtype == 0xE)


def _canonical(a: int) -> bool:
    top = a >> 47
    return top == 0 or top == 0x1FFFF
