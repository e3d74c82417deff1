"""Emulation of the privileged instructions a deprivileged kernel traps on.

Design: the real CPU raised #GP (or #UD) at CPL 3; `emulate` decodes the instruction at
the faulting RIP and either carries it out on the virtual CPU (virtual.py) or says what
else must happen. The common ones are recognised from their bytes (CLI, STI, HLT,
IN/OUT); everything else goes through iced-x86, which also gives memory operands.

    CLI / STI                   virtual IF (STI: the next instruction runs first)
    PUSHF / POPF                never get here: they do not trap (the point of the probe)
    HLT                         a Halt exit with the virtual IF
    IN / OUT (imm8, DX)         IoIn / IoOut exits to pyhv's port bus
    MOV CRn, CLTS, LMSW         virtual CR0/CR2/CR3/CR4/CR8 (CR3: the shadow follows it)
    MOV DRn                     virtual debug registers (no real breakpoints)
    LGDT/LIDT/LLDT/LTR          virtual GDTR/IDTR/LDTR/TR (LGDT rebuilds the shadow GDT)
    SGDT/SIDT/SLDT/STR/SMSW     only trap with CR4.UMIP: the virtual values
    RDMSR / WRMSR               virtual MSRs (EFER, SYSCALL/SYSENTER, PAT...), FS/GS base
                                on the real segments; any other MSR -> #GP(0)
    SWAPGS                      real GS base <-> virtual KERNEL_GS_BASE
    INVLPG                      the shadow drops the address (shadow.py)
    WBINVD, INVD                nothing to do
    IRETQ / IRETD / RETF        to an RPL 0 CS: pop the frame, restore the virtual IF
    MOV SS                      virtual SS (checked against the virtual GDT)
    MOV DS/ES/FS/GS             (only fault on a stale shadow) rebuild the shadow, retry
    INT n / INT3                reflected through the guest's IDT (software interrupt)

An instruction outside this list that faulted for an architectural reason (a bad
selector, a non-canonical address) gets its #GP/#UD reflected; a privileged instruction
this monitor does not implement (string I/O, XSETBV, SYSRET, MONITOR...) ends the run
with "cannot emulate" and its bytes. Checks mirror the CPU at CPL 0: a bad descriptor or
operand becomes the fault the CPU would raise (`GuestFault`).

`pt_write` is the other entry: a store the guest made, natively, to one of its own
page-table pages, which the shadow maps read-only (shadow.py). It is carried out here
through the guest's paging so that the shadow sees it: MOV to memory (register or
immediate) and XCHG; any other instruction writing a page table is "cannot emulate".
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import iced_x86 as ix

from pyhv.arch.x86 import msr as M
from pyhv.arch.x86.cpustate import (
    CR0_PE,
    CR0_PG,
    CR0_TS,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    EFER_SCE,
    RFLAGS_FIXED,
    RFLAGS_IF,
    RFLAGS_IOPL,
    DescriptorTable,
    Segment,
)
from pyhv.engines.trap import descriptors, guestmem
from pyhv.engines.trap.context import Held
from pyhv.engines.trap.guestmem import GuestFault, Mem, canonical
from pyhv.engines.trap.reflect import Event, Kind, name
from pyhv.engines.trap.virtual import VirtualCpu
from pyhv.exits import Exit, Halt, IoIn, IoOut

GP, UD = 13, 6
# RFLAGS bits an emulated IRET may set in the real RFLAGS: CF PF AF ZF SF DF OF AC ID
# (TF and NT stay clear, IF and IOPL are virtual).
IRET_FLAGS = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x400 | 0x800 | 0x40000 | 0x200000
KNOWN_MSRS_DEFAULT = {M.PAT: 0x0007040600070406, M.MTRRCAP: 0, M.MTRR_DEF_TYPE: 0,
                      M.MISC_ENABLE: 1, M.MCG_CAP: 0, M.MCG_STATUS: 0}
EFER_WRITABLE = EFER_SCE | EFER_LME | EFER_NXE
CR0_WP = 1 << 16
CR3_RESERVED = ((1 << 63) - 1) & ~((1 << 32) - 1)   # address bits >= MAXPHYADDR (32); 62:52
UNSUPPORTED = {ix.Mnemonic.INSB, ix.Mnemonic.INSW, ix.Mnemonic.INSD, ix.Mnemonic.OUTSB,
               ix.Mnemonic.OUTSW, ix.Mnemonic.OUTSD, ix.Mnemonic.XSETBV, ix.Mnemonic.SYSRET,
               ix.Mnemonic.SYSRETQ, ix.Mnemonic.SYSEXIT, ix.Mnemonic.SYSEXITQ,
               ix.Mnemonic.MONITOR, ix.Mnemonic.MWAIT, ix.Mnemonic.RDPMC,
               ix.Mnemonic.JMP, ix.Mnemonic.CALL,
               ix.Mnemonic.INVPCID, ix.Mnemonic.LSS, ix.Mnemonic.LFS, ix.Mnemonic.LGS}


@dataclass
class Outcome:
    """What an emulation decided. Exactly one of the optional fields is usually set."""

    kind: str                          # statistics key: "cli", "out", "iretq", "#UD"...
    exit: Exit | None = None           # hand this to the run loop (IoIn/IoOut/Halt)
    event: Event | None = None         # reflect this into the guest (h.rip = return RIP)
    error: str | None = None           # cannot emulate: end the run
    in_size: int = 0                   # IoIn: the operand size to merge into RAX
    retry: bool = False                # resume at the same RIP (shadow GDT rebuilt)
    reload_gdt: bool = False           # the virtual GDTR or CS/SS changed
    paging: str | None = None          # "cr3", "invlpg" (at `address`) or "flush"
    address: int = 0


class Emulator:
    """Decodes and emulates one trapped instruction at a time for one vCPU."""

    def __init__(self, mem: Mem, v: VirtualCpu, *, umip: bool) -> None:
        self.mem = mem
        self.v = v
        self.umip = umip
        self.last_retry_rip: int | None = None
        self.segment_base: dict[str, int] = {}     # set by the engine for SWAPGS/FS/GS

    # ------------------------------------------------------------------ entry

    def emulate(self, h: Held, vector: int, error_code: int | None, insn: bytes) -> Outcome:
        """Handle #GP or #UD raised at h.rip by `insn` (the bytes there)."""
        try:
            out = self._fast(h, insn)
            if out is None:
                out = self._decoded(h, vector, error_code, insn)
        except GuestFault as f:
            return Outcome(f"fault {f.vector}", event=Event(f.vector, Kind.EXCEPTION,
                                                            f.error_code, f.cr2))
        if not out.retry:
            self.last_retry_rip = None
        return out

    def _fast(self, h: Held, insn: bytes) -> Outcome | None:
        """The frequent one-byte instructions, without a decoder."""
        if not insn:
            return None
        op, n, size = insn[0], 1, 4
        if op == 0x66 and len(insn) > 1:
            op, n, size = insn[1], 2, 2
        v = self.v
        if n == 1:
            if op == 0xFA:
                v.if_ = False
                h.rip += 1
                return Outcome("cli")
            if op == 0xFB:
                v.if_ = True
                v.sti_shadow = True
                h.rip += 1
                return Outcome("sti")
            if op == 0xF4:
                h.rip += 1
                return Outcome("hlt", exit=Halt(interrupts_enabled=v.if_))
        if 0xE4 <= op <= 0xE7 or 0xEC <= op <= 0xEF:
            if op in (0xE4, 0xE6, 0xEC, 0xEE):
                size = 1
            if op <= 0xE7:
                if len(insn) < n + 1:
                    return None
                port, length = insn[n], n + 1
            else:
                port, length = h.gpr(2) & 0xFFFF, n
            h.rip += length
            if op & 2:                                  # OUT
                value = h.gpr(0) & ((1 << (8 * size)) - 1)
                return Outcome("out", exit=IoOut(port, size, value.to_bytes(size, "little")))
            return Outcome("in", exit=IoIn(port, size, memoryview(bytearray(size))),
                           in_size=size)
        return None

    # ------------------------------------------------------------------ decoded

    def _decoded(self, h: Held, vector: int, error_code: int | None, insn: bytes
                 ) -> Outcome:
        i = ix.Decoder(64, insn, ip=h.rip).decode()
        mn = i.mnemonic
        code = i.code
        kind = _mnemonic_name(mn)
        if code == ix.Code.INVALID:
            return self._reflect(vector, error_code)
        nxt = (h.rip + i.len) & 0xFFFF_FFFF_FFFF_FFFF
        v = self.v
        if mn in (ix.Mnemonic.INT, ix.Mnemonic.INT3):
            vec = 3 if mn == ix.Mnemonic.INT3 else i.immediate8
            h.rip = nxt
            return Outcome(kind, event=Event(vec, Kind.SOFTWARE))
        if vector != GP:
            return self._reflect(vector, error_code)
        if mn == ix.Mnemonic.MOV and i.op0_kind == ix.OpKind.REGISTER and (
                _is_cr(i.op0_register) or _is_cr(i.op1_register)):
            out = self._mov_cr(h, i)
        elif mn == ix.Mnemonic.MOV and (_is_dr(i.op0_register) or _is_dr(i.op1_register)):
            out = self._mov_dr(h, i)
        elif mn == ix.Mnemonic.MOV and _is_sreg(i.op0_register):
            out = self._mov_sreg(h, i)
        elif mn in (ix.Mnemonic.LGDT, ix.Mnemonic.LIDT):
            limit, base = struct.unpack("<HQ", guestmem.read(self.mem, self._ea(h, i), 10))
            if not canonical(base):
                raise GuestFault(GP, 0)
            if mn == ix.Mnemonic.LGDT:
                v.gdt = DescriptorTable(base, limit)
            else:
                v.idt = DescriptorTable(base, limit)
            out = Outcome(kind, reload_gdt=mn == ix.Mnemonic.LGDT)
        elif mn in (ix.Mnemonic.SGDT, ix.Mnemonic.SIDT):
            t = v.gdt if mn == ix.Mnemonic.SGDT else v.idt
            guestmem.write(self.mem, self._ea(h, i), struct.pack("<HQ", t.limit, t.base))
            out = Outcome(kind)
        elif mn == ix.Mnemonic.LLDT:
            sel = self._operand16(h, i)
            if sel & 0xFFFC == 0:
                v.ldt = Segment(selector=sel, type=2, s=0, present=0, unusable=1)
            else:
                v.ldt, _ = descriptors.system(self.mem, v, sel, (0x2,))
            out = Outcome(kind)
        elif mn == ix.Mnemonic.LTR:
            sel = self._operand16(h, i)
            seg, addr = descriptors.system(self.mem, v, sel, (0x9,))
            guestmem.write(self.mem, addr + 5, bytes([guestmem.read(self.mem, addr + 5, 1)[0]
                                                      | 0x2]))      # mark busy
            seg.type = 0xB
            v.tr = seg
            out = Outcome(kind)
        elif mn in (ix.Mnemonic.SLDT, ix.Mnemonic.STR, ix.Mnemonic.SMSW):
            value = {ix.Mnemonic.SLDT: v.ldt.selector, ix.Mnemonic.STR: v.tr.selector,
                     ix.Mnemonic.SMSW: v.cr0}[mn]
            self._store(h, i, value)
            out = Outcome(kind)
        elif mn == ix.Mnemonic.LMSW:
            value = self._operand16(h, i) & 0xF
            v.cr0 = (v.cr0 & ~0xE) | (value & 0xE) | (v.cr0 & CR0_PE) | (value & CR0_PE)
            out = Outcome(kind)
        elif mn == ix.Mnemonic.CLTS:
            v.cr0 &= ~CR0_TS
            out = Outcome(kind)
        elif mn == ix.Mnemonic.INVLPG:
            out = Outcome(kind, paging="invlpg", address=self._ea(h, i))
        elif mn in (ix.Mnemonic.WBINVD, ix.Mnemonic.INVD):
            out = Outcome(kind)
        elif mn == ix.Mnemonic.RDMSR:
            out = self._rdmsr(h, kind)
        elif mn == ix.Mnemonic.WRMSR:
            out = self._wrmsr(h, kind)
        elif mn == ix.Mnemonic.SWAPGS:
            gs = self.segment_base.get("gs", 0)
            self.segment_base["gs"] = v.msrs.get(M.KERNEL_GS_BASE, 0)
            v.msrs[M.KERNEL_GS_BASE] = gs
            out = Outcome(kind)
        elif code in (ix.Code.IRETQ, ix.Code.IRETD):
            return self._iret(h, 8 if code == ix.Code.IRETQ else 4, kind)
        elif code in (ix.Code.RETFQ, ix.Code.RETFD, ix.Code.RETFQ_IMM16, ix.Code.RETFD_IMM16):
            size = 8 if code in (ix.Code.RETFQ, ix.Code.RETFQ_IMM16) else 4
            extra = i.immediate16 if code in (ix.Code.RETFQ_IMM16, ix.Code.RETFD_IMM16) else 0
            return self._retf(h, size, extra, kind)
        elif mn in UNSUPPORTED and error_code == 0 and _privileged_form(i):
            return Outcome(kind, error=f"cannot emulate {i} (privileged, not implemented "
                                       "by the trap engine)")
        else:
            return self._reflect(vector, error_code)
        if not out.retry and out.error is None and out.event is None:
            h.rip = nxt
        return out

    def _reflect(self, vector: int, error_code: int | None) -> Outcome:
        code = error_code if vector == GP else None
        return Outcome(_vector_kind(vector), event=Event(vector, Kind.EXCEPTION, code))

    # ------------------------------------------------------------------ operands

    def _ea(self, h: Held, i: ix.Instruction) -> int:
        """The linear address of i's memory operand (flat segments; FS/GS add base)."""
        if i.is_ip_rel_memory_operand:
            addr = i.ip_rel_memory_address
        else:
            addr = i.memory_displacement
            if i.memory_base != ix.Register.NONE:
                addr += self._reg(h, i.memory_base)
            if i.memory_index != ix.Register.NONE:
                addr += self._reg(h, i.memory_index) * i.memory_index_scale
        seg = i.memory_segment
        if seg == ix.Register.FS:
            addr += self.segment_base.get("fs", 0)
        elif seg == ix.Register.GS:
            addr += self.segment_base.get("gs", 0)
        return addr & 0xFFFF_FFFF_FFFF_FFFF

    def _reg(self, h: Held, reg: ix.Register_) -> int:
        info = ix.RegisterInfo(reg)
        idx = info.full_register - ix.Register.RAX
        if not 0 <= idx < 16:
            raise GuestFault(UD, None)
        value = h.gpr(idx)
        return value & ((1 << (8 * info.size)) - 1)

    def _set_reg(self, h: Held, reg: ix.Register_, value: int) -> None:
        info = ix.RegisterInfo(reg)
        idx = info.full_register - ix.Register.RAX
        if info.size == 8 or info.size == 4:            # 32-bit writes zero-extend
            h.set_gpr(idx, value & ((1 << (8 * info.size)) - 1))
        else:
            mask = (1 << (8 * info.size)) - 1
            h.set_gpr(idx, (h.gpr(idx) & ~mask) | (value & mask))

    def _operand16(self, h: Held, i: ix.Instruction) -> int:
        if i.op0_kind == ix.OpKind.REGISTER:
            return self._reg(h, i.op0_register) & 0xFFFF
        return int.from_bytes(guestmem.read(self.mem, self._ea(h, i), 2), "little")

    def _store(self, h: Held, i: ix.Instruction, value: int) -> None:
        if i.op0_kind == ix.OpKind.REGISTER:
            self._set_reg(h, i.op0_register, value)
        else:
            guestmem.write(self.mem, self._ea(h, i), (value & 0xFFFF).to_bytes(2, "little"))

    # ------------------------------------------------------------------ instructions

    def _mov_cr(self, h: Held, i: ix.Instruction) -> Outcome:
        v = self.v
        if _is_cr(i.op1_register):                      # MOV r64, CRn
            n = i.op1_register - ix.Register.CR0
            value = {0: v.cr0, 2: v.cr2, 3: v.cr3, 4: v.cr4, 8: v.cr8}.get(n)
            if value is None:
                raise GuestFault(UD, None)
            self._set_reg(h, i.op0_register, value)
            return Outcome(f"mov r, cr{n}")
        n = i.op0_register - ix.Register.CR0
        value = self._reg(h, i.op1_register)
        if n == 0:
            if value >> 32:
                raise GuestFault(GP, 0)
            if not value & CR0_PG or not value & CR0_PE:
                return Outcome("mov cr0", error="cannot emulate: the guest turns paging or "
                               f"protection off (mov cr0, {value:#x}); the trap engine runs "
                               "long-mode guests only")
            flush = (v.cr0 ^ value) & CR0_WP
            v.cr0 = value
            if flush:
                return Outcome("mov cr0", paging="flush")
        elif n == 2:
            v.cr2 = value
        elif n == 3:
            if value & CR3_RESERVED:
                raise GuestFault(GP, 0)
            v.cr3 = value                                # the shadow follows it
            return Outcome("mov cr3", paging="cr3")
        elif n == 4:
            if not value & CR4_PAE:
                raise GuestFault(GP, 0)                  # clearing PAE in long mode
            v.cr4 = value
            return Outcome("mov cr4", paging="flush")
        elif n == 8:
            if value >> 4:
                raise GuestFault(GP, 0)
            v.cr8 = value
        else:
            raise GuestFault(UD, None)
        return Outcome(f"mov cr{n}")

    def _mov_dr(self, h: Held, i: ix.Instruction) -> Outcome:
        v = self.v
        if _is_dr(i.op1_register):
            n = i.op1_register - ix.Register.DR0
            n = {4: 6, 5: 7}.get(n, n)
            if n > 7:
                raise GuestFault(UD, None)
            self._set_reg(h, i.op0_register, v.dr[n])
            return Outcome("mov r, dr")
        n = i.op0_register - ix.Register.DR0
        n = {4: 6, 5: 7}.get(n, n)
        if n > 7:
            raise GuestFault(UD, None)
        v.dr[n] = self._reg(h, i.op1_register)
        return Outcome("mov dr")

    def _mov_sreg(self, h: Held, i: ix.Instruction) -> Outcome:
        sel = self._operand_src16(h, i)
        reg = i.op0_register
        if reg == ix.Register.SS:
            self.v.ss = descriptors.stack(self.mem, self.v, sel)
            return Outcome("mov ss", reload_gdt=True)
        if reg == ix.Register.CS:
            raise GuestFault(UD, None)
        # DS/ES/FS/GS only fault when the shadow is stale (or the selector is bad):
        # check it against the virtual GDT, rebuild the shadow, run it again natively.
        lo, _ = descriptors.raw(self.mem, self.v, sel)
        if not (lo >> 44) & 1 or ((lo >> 43) & 1 and not (lo >> 41) & 1):
            raise GuestFault(GP, sel & 0xFFFC)
        if not (lo >> 47) & 1:
            raise GuestFault(11, sel & 0xFFFC)
        if self.last_retry_rip == h.rip:
            return Outcome("mov sreg", error=f"cannot emulate {i}: the shadow GDT entry "
                           "still faults after a rebuild")
        self.last_retry_rip = h.rip
        return Outcome("mov sreg", retry=True, reload_gdt=True)

    def _operand_src16(self, h: Held, i: ix.Instruction) -> int:
        if i.op1_kind == ix.OpKind.REGISTER:
            return self._reg(h, i.op1_register) & 0xFFFF
        return int.from_bytes(guestmem.read(self.mem, self._ea(h, i), 2), "little")

    def _rdmsr(self, h: Held, kind: str) -> Outcome:
        v = self.v
        idx = h.gpr(1) & 0xFFFF_FFFF
        if idx == M.EFER:
            value = v.efer
        elif idx in M.STATE_MSRS and idx != M.TSC:
            value = v.msrs.get(idx, KNOWN_MSRS_DEFAULT.get(idx, 0))
        elif idx in KNOWN_MSRS_DEFAULT:
            value = v.msrs.get(idx, KNOWN_MSRS_DEFAULT[idx])
        elif idx == M.APIC_BASE:
            value = v.apic_base
        elif idx == M.TSC:
            value = time.perf_counter_ns()
        elif idx in (M.FS_BASE, M.GS_BASE):
            value = self.segment_base.get("fs" if idx == M.FS_BASE else "gs", 0)
        else:
            raise GuestFault(GP, 0)
        h.set_gpr(0, value & 0xFFFF_FFFF)
        h.set_gpr(2, value >> 32)
        return Outcome(kind)

    def _wrmsr(self, h: Held, kind: str) -> Outcome:
        v = self.v
        idx = h.gpr(1) & 0xFFFF_FFFF
        value = ((h.gpr(2) & 0xFFFF_FFFF) << 32) | (h.gpr(0) & 0xFFFF_FFFF)
        if idx == M.EFER:
            if value & ~(EFER_WRITABLE | EFER_LMA) or not value & EFER_LME:
                raise GuestFault(GP, 0)
            flush = (v.efer ^ value) & EFER_NXE
            v.efer = (value & EFER_WRITABLE) | EFER_LMA
            if flush:
                return Outcome(kind, paging="flush")
        elif idx in (M.FS_BASE, M.GS_BASE, M.KERNEL_GS_BASE, M.LSTAR, M.CSTAR,
                     M.SYSENTER_EIP, M.SYSENTER_ESP):
            if not canonical(value):
                raise GuestFault(GP, 0)
            if idx in (M.FS_BASE, M.GS_BASE):
                self.segment_base["fs" if idx == M.FS_BASE else "gs"] = value
            else:
                v.msrs[idx] = value
        elif idx in M.STATE_MSRS or idx in KNOWN_MSRS_DEFAULT:
            v.msrs[idx] = value
        elif idx == M.APIC_BASE:
            v.apic_base = value
        else:
            raise GuestFault(GP, 0)
        return Outcome(kind)

    def pt_write(self, h: Held, insn: bytes) -> Outcome:
        """Carry out the store at h.rip (to a guest page-table page) through the guest's
        paging, so that the shadow sees it (guestmem.write -> shadow.written)."""
        try:
            i = ix.Decoder(64, insn, ip=h.rip).decode()
            mn = i.mnemonic
            if i.code != ix.Code.INVALID and mn in (ix.Mnemonic.MOV, ix.Mnemonic.XCHG) and (
                    i.op0_kind == ix.OpKind.MEMORY or i.op1_kind == ix.OpKind.MEMORY):
                size = ix.MemorySizeInfo(i.memory_size).size
                ea = self._ea(h, i)
                if mn == ix.Mnemonic.MOV and i.op0_kind == ix.OpKind.MEMORY:
                    if i.op1_kind == ix.OpKind.REGISTER:
                        value = self._reg(h, i.op1_register)
                    else:
                        value = i.immediate(1)
                    guestmem.write(self.mem, ea, (value & ((1 << (8 * size)) - 1))
                                   .to_bytes(size, "little"))
                elif mn == ix.Mnemonic.XCHG:
                    reg = i.op1_register if i.op0_kind == ix.OpKind.MEMORY else i.op0_register
                    old = guestmem.read(self.mem, ea, size)
                    guestmem.write(self.mem, ea, self._reg(h, reg).to_bytes(size, "little"))
                    self._set_reg(h, reg, int.from_bytes(old, "little"))
                else:
                    return _cannot_pt_write(i)
                h.rip = (h.rip + i.len) & 0xFFFF_FFFF_FFFF_FFFF
                return Outcome("pt write")
            return _cannot_pt_write(i)
        except GuestFault as f:
            return Outcome(f"fault {f.vector}", event=Event(f.vector, Kind.EXCEPTION,
                                                            f.error_code, f.cr2))

    def _pop(self, h: Held, size: int, n: int) -> list[int]:
        data = guestmem.read(self.mem, h.rsp, size * n)
        return list(struct.unpack(f"<{n}{'Q' if size == 8 else 'I'}", data))

    def _iret(self, h: Held, size: int, kind: str) -> Outcome:
        rip, cs_sel, rflags, rsp, ss_sel = self._pop(h, size, 5)
        cs_sel &= 0xFFFF
        ss_sel &= 0xFFFF
        if cs_sel & 3:
            return Outcome(kind, error=f"cannot emulate {kind} to CS {cs_sel:#06x} (RPL "
                           f"{cs_sel & 3}): a return to the guest's own user mode needs "
                           "ring compression, which the trap engine does not do")
        if not canonical(rip):
            raise GuestFault(GP, 0)
        cs = descriptors.code64(self.mem, self.v, cs_sel)
        ss = descriptors.stack(self.mem, self.v, ss_sel)
        v = self.v
        v.cs, v.ss = cs, ss
        v.if_ = bool(rflags & RFLAGS_IF)
        v.iopl = (rflags & RFLAGS_IOPL) >> 12
        h.rip, h.rsp = rip, rsp
        h.rflags = (rflags & IRET_FLAGS) | RFLAGS_FIXED | RFLAGS_IF
        return Outcome(kind, reload_gdt=True)

    def _retf(self, h: Held, size: int, extra: int, kind: str) -> Outcome:
        rip, cs_sel = self._pop(h, size, 2)
        cs_sel &= 0xFFFF
        if cs_sel & 3:
            return Outcome(kind, error=f"cannot emulate {kind} to CS {cs_sel:#06x} (RPL "
                           f"{cs_sel & 3}): the trap engine does not do ring compression")
        if not canonical(rip):
            raise GuestFault(GP, 0)
        self.v.cs = descriptors.code64(self.mem, self.v, cs_sel)
        h.rip = rip
        h.rsp = (h.rsp + 2 * size + extra) & 0xFFFF_FFFF_FFFF_FFFF
        return Outcome(kind, reload_gdt=True)


# ---------------------------------------------------------------------- helpers


def _cannot_pt_write(i: ix.Instruction) -> Outcome:
    return Outcome("pt write", error=f"cannot emulate {i}: a store to a guest page-table "
                   "page that is not MOV or XCHG (the trap engine's shadow page tables "
                   "emulate only those)")


def _is_cr(reg: int) -> bool:
    return bool(ix.Register.CR0 <= reg <= ix.Register.CR15)


def _is_dr(reg: int) -> bool:
    return bool(ix.Register.DR0 <= reg <= ix.Register.DR15)


def _is_sreg(reg: int) -> bool:
    return reg in (ix.Register.ES, ix.Register.CS, ix.Register.SS, ix.Register.DS,
                   ix.Register.FS, ix.Register.GS)


def _privileged_form(i: ix.Instruction) -> bool:
    """True for the forms of UNSUPPORTED that fault only for privilege (not far JMP/CALL
    to a valid selector... those are reported too: the monitor cannot follow them)."""
    if i.mnemonic in (ix.Mnemonic.JMP, ix.Mnemonic.CALL):
        return i.op0_kind in (ix.OpKind.FAR_BRANCH16, ix.OpKind.FAR_BRANCH32) or (
            i.op0_kind == ix.OpKind.MEMORY and i.code in (
                ix.Code.JMP_M1616, ix.Code.JMP_M1632, ix.Code.JMP_M1664,
                ix.Code.CALL_M1616, ix.Code.CALL_M1632, ix.Code.CALL_M1664))
    return True


_MNEMONIC_NAMES: dict[int, str] = {}


def _mnemonic_name(mn: int) -> str:
    name = _MNEMONIC_NAMES.get(mn)
    if name is None:
        name = next((k.lower() for k, val in vars(ix.Mnemonic).items()
                     if k.isupper() and val == mn), f"mnemonic {mn}")
        _MNEMONIC_NAMES[mn] = name
    return name


def _vector_kind(vector: int) -> str:
    return f"reflect {name(vector)}"
