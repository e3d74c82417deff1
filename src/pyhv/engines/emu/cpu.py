"""Architectural state of an emu vCPU: `CpuState` in and out of unicorn, exactly.

Design: everything is read from and written to the CPUX86State blob (`layout.Blob`) so
that hidden segment state, CPL and the lazily-computed flags come out exactly as the CPU
has them; unicorn's register API is used only where it performs a conversion pyhv does
not want to duplicate (MSRs without a fixed slot, the x87/SSE registers) or where a side
effect is wanted (TLB flush).

Invariants kept by `CpuView.commit()`:
- QEMU's `hflags` (CPL, CS32/SS32/CS64, LMA, PE, MP/EM/TS, OSFXSR, ADDSEG, interrupt
  shadow) are recomputed from the architectural fields after every change, so the
  translator never sees a mode that disagrees with CR0/EFER/CS/SS;
- RFLAGS is stored the way QEMU keeps it: arithmetic flags in cc_src with
  cc_op = CC_OP_EFLAGS, DF in `df` (+1/-1), the rest in `eflags`;
- `old_exception` is reset to -1: delivery finished, no exception is in flight.

CPL is SS.DPL in protected mode (as QEMU keeps it), 0 in real mode, 3 in virtual-8086.
"""

from __future__ import annotations

import struct
from typing import Any

from pyhv.arch.x86 import msr
from pyhv.arch.x86.cpustate import (
    CR0_PE,
    EFER_LMA,
    GPRS,
    RFLAGS_FIXED,
    RFLAGS_VM,
    CpuState,
    DescriptorTable,
    Segment,
)
from pyhv.engines.emu import layout as L
from pyhv.engines.emu._uc import unicorn, x86

ARITH_FLAGS = 0x8D5          # CF PF AF ZF SF OF
RFLAGS_DF = 1 << 10
CR4_OSFXSR = 1 << 9


# ---------------------------------------------------------------------- segments


def seg_flags(seg: Segment) -> int:
    """QEMU's SegmentCache.flags for a Segment."""
    present = 0 if seg.unusable else seg.present
    return ((seg.type & 0xF) << L.DESC_TYPE_SHIFT | (seg.s & 1) << 12 | (seg.dpl & 3) << 13
            | (present & 1) << 15 | (seg.avl & 1) << 20 | (seg.l & 1) << 21
            | (seg.db & 1) << 22 | (seg.g & 1) << 23)


def seg_from(selector: int, base: int, limit: int, flags: int) -> Segment:
    present = (flags >> 15) & 1
    return Segment(selector=selector & 0xFFFF, base=base, limit=limit,
                   type=(flags >> 8) & 0xF, s=(flags >> 12) & 1, dpl=(flags >> 13) & 3,
                   present=present, avl=(flags >> 20) & 1, l=(flags >> 21) & 1,
                   db=(flags >> 22) & 1, g=(flags >> 23) & 1, unusable=0 if present else 1)


def descriptor_cache(desc: int, high: int = 0) -> tuple[int, int, int]:
    """(base, limit in bytes, flags) of a raw 8-byte descriptor (+ high 8 for system)."""
    limit = (desc & 0xFFFF) | ((desc >> 32) & 0xF0000)
    if desc & (1 << 55):
        limit = (limit << 12) | 0xFFF
    base = ((desc >> 16) & 0xFFFFFF) | (((desc >> 56) & 0xFF) << 24)
    if not desc & (1 << 44):
        base |= (high & 0xFFFFFFFF) << 32
    flags = (desc >> 32) & 0x00F0FF00
    return base, limit, flags


# ---------------------------------------------------------------------- the view


class CpuView:
    """Typed read/modify/commit access to one vCPU's state (valid inside hooks too)."""

    def __init__(self, uc: Any, blob: L.Blob) -> None:
        self.uc = uc
        self.b = blob
        self.rflags = RFLAGS_FIXED

    def load(self) -> CpuView:
        self.rflags = int(self.uc.reg_read(x86.UC_X86_REG_EFLAGS))
        self.b.load()
        return self

    # -- simple fields
    @property
    def rip(self) -> int:
        return self.b.u64(L.EIP)

    @rip.setter
    def rip(self, v: int) -> None:
        self.b.set_u64(L.EIP, v)

    def reg(self, name: str) -> int:
        return self.b.reg(name)

    def set_reg(self, name: str, v: int) -> None:
        self.b.set_reg(name, v)

    @property
    def cr0(self) -> int:
        return self.b.cr(0)

    @property
    def cr3(self) -> int:
        return self.b.cr(3)

    @property
    def cr4(self) -> int:
        return self.b.cr(4)

    @property
    def efer(self) -> int:
        return self.b.u64(L.EFER)

    @property
    def cpl(self) -> int:
        return self.b.cpl

    @property
    def long_mode(self) -> bool:
        return bool(self.efer & EFER_LMA)

    @property
    def protected(self) -> bool:
        return bool(self.cr0 & CR0_PE)

    @property
    def shadow(self) -> bool:
        return bool(self.b.u32(L.HFLAGS) & L.HF_INHIBIT_IRQ)

    def seg(self, name: str) -> tuple[int, int, int, int]:
        return self.b.seg(self.b.seg_off(name))

    def set_seg(self, name: str, selector: int, base: int, limit: int, flags: int) -> None:
        self.b.set_seg(self.b.seg_off(name), selector, base, limit, flags)

    def table(self, name: str) -> tuple[int, int]:
        """(base, limit) of gdt or idt."""
        _sel, base, limit, _fl = self.b.seg(L.GDT if name == "gdt" else L.IDT)
        return base, limit

    # -- commit
    def commit(self, *, shadow: bool = False) -> None:
        """Write rflags in QEMU's split form, recompute hflags, clear old_exception."""
        b = self.b
        fl = self.rflags
        b.set_u64(L.CC_SRC, fl & ARITH_FLAGS)
        b.set_u32(L.CC_OP, L.CC_OP_EFLAGS)
        b.set_i32(L.DF, -1 if fl & RFLAGS_DF else 1)
        b.set_u64(L.EFLAGS, (fl & ~(ARITH_FLAGS | RFLAGS_DF)) | RFLAGS_FIXED)
        b.set_u32(L.HFLAGS, self.hflags(shadow))
        b.set_i32(L.OLD_EXCEPTION, -1)
        b.store()

    def hflags(self, shadow: bool) -> int:
        b = self.b
        cr0, cr4, efer = b.cr(0), b.cr(4), b.u64(L.EFER)
        cs_fl = b.seg(b.seg_off("cs"))[3]
        ss_fl = b.seg(b.seg_off("ss"))[3]
        h = b.u32(L.HFLAGS) & ~L.HF_DERIVED
        pe = bool(cr0 & CR0_PE)
        vm = bool(self.rflags & RFLAGS_VM)
        if pe:
            h |= L.HF_PE
            h |= 3 if vm else (ss_fl >> 13) & 3
        if shadow:
            h |= L.HF_INHIBIT_IRQ
        h |= ((cr0 >> 1) & 7) << 9
        if efer & EFER_LMA:
            h |= L.HF_LMA
        cs64 = bool(efer & EFER_LMA and cs_fl & L.DESC_L)
        if cs64:
            h |= L.HF_CS32 | L.HF_CS64
        elif cs_fl & L.DESC_B:
            h |= L.HF_CS32
        if ss_fl & L.DESC_B:
            h |= L.HF_SS32
        if not cs64:
            if not pe or vm or not h & L.HF_CS32:
                h |= L.HF_ADDSEG
            else:
                bases = (b.seg(b.seg_off("ds"))[1] | b.seg(b.seg_off("es"))[1]
                         | b.seg(b.seg_off("ss"))[1])
                if bases:
                    h |= L.HF_ADDSEG
        if cr4 & CR4_OSFXSR:
            h |= L.HF_OSFXSR
        return h


# ---------------------------------------------------------------------- CpuState


def get_state(uc: Any, blob: L.Blob) -> CpuState:
    v = CpuView(uc, blob).load()
    b = blob
    st = CpuState()
    for name in GPRS:
        setattr(st, name, b.reg(name))
    st.rip = v.rip
    st.rflags = v.rflags
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        setattr(st, name, seg_from(*b.seg(b.seg_off(name))))
    gb, gl = v.table("gdt")
    ib, il = v.table("idt")
    st.gdt = DescriptorTable(gb, gl)
    st.idt = DescriptorTable(ib, il)
    st.cr0, st.cr2, st.cr3, st.cr4 = b.cr(0), b.cr(2), b.cr(3), b.cr(4)
    st.efer = b.u64(L.EFER)
    st.msrs = {m: read_msr(uc, m) for m in msr.STATE_MSRS}
    st.fxsave = read_fxsave(uc)
    st.interrupt_shadow = 1 if v.shadow else 0
    return st


def set_state(uc: Any, blob: L.Blob, st: CpuState) -> None:
    v = CpuView(uc, blob).load()
    b = blob
    for name in GPRS:
        b.set_reg(name, getattr(st, name))
    v.rip = st.rip
    v.rflags = st.rflags | RFLAGS_FIXED
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        seg: Segment = getattr(st, name)
        b.set_seg(b.seg_off(name), seg.selector, seg.base, seg.limit, seg_flags(seg))
    b.set_seg(L.GDT, 0, st.gdt.base, st.gdt.limit, 0)
    b.set_seg(L.IDT, 0, st.idt.base, st.idt.limit, 0)
    b.set_cr(0, st.cr0)
    b.set_cr(2, st.cr2)
    b.set_cr(3, st.cr3)
    b.set_cr(4, st.cr4)
    b.set_u64(L.EFER, st.efer)
    b.set_i32(L.ERROR_CODE, 0)
    b.set_i32(L.EXCEPTION_IS_INT, 0)
    v.commit(shadow=bool(st.interrupt_shadow))
    for m, value in st.msrs.items():
        write_msr(uc, m, value)
    write_fxsave(uc, st.fxsave)
    uc.ctl(unicorn.UC_CTL_TLB_FLUSH, unicorn.UC_CTL_IO_WRITE)


def read_msr(uc: Any, number: int) -> int:
    return int(uc.reg_read(x86.UC_X86_REG_MSR, number))


def write_msr(uc: Any, number: int, value: int) -> None:
    uc.reg_write(x86.UC_X86_REG_MSR, (number, value & 0xFFFFFFFFFFFFFFFF))


# ---------------------------------------------------------------------- x87 / SSE

_FX = struct.Struct("<HHBxHQQII")    # FCW FSW FTW(abridged) FOP FIP FDP MXCSR MXCSR_MASK


def read_fxsave(uc: Any) -> bytes:
    """A 512-byte FXSAVE image (64-bit layout) of the x87/SSE state."""
    fcw = uc.reg_read(x86.UC_X86_REG_FPCW) & 0xFFFF
    fsw = uc.reg_read(x86.UC_X86_REG_FPSW) & 0xFFFF
    tags = uc.reg_read(x86.UC_X86_REG_FPTAG) & 0xFFFF
    ftw = 0
    for i in range(8):
        if (tags >> (2 * i)) & 3 != 3:
            ftw |= 1 << i
    mxcsr = uc.reg_read(x86.UC_X86_REG_MXCSR) & 0xFFFFFFFF
    img = bytearray(512)
    _FX.pack_into(img, 0, fcw, fsw, ftw, 0, 0, 0, mxcsr, 0xFFFF)
    top = (fsw >> 11) & 7
    for i in range(8):     # ST(i) is physical register (TOP + i) mod 8
        mant, exp = uc.reg_read(x86.UC_X86_REG_FP0 + ((top + i) & 7))
        struct.pack_into("<QH", img, 32 + 16 * i, mant & 0xFFFFFFFFFFFFFFFF, exp & 0xFFFF)
    for i in range(16):
        val = uc.reg_read(x86.UC_X86_REG_XMM0 + i)
        img[160 + 16 * i:176 + 16 * i] = int(val).to_bytes(16, "little")
    return bytes(img)


def write_fxsave(uc: Any, img: bytes | None) -> None:
    """Load an FXSAVE image (None: the reset state, FCW=0x37F, MXCSR=0x1F80, all empty)."""
    if img is None:
        reset = bytearray(512)
        _FX.pack_into(reset, 0, 0x37F, 0, 0, 0, 0, 0, 0x1F80, 0xFFFF)
        img = bytes(reset)
    if len(img) != 512:
        raise ValueError("FXSAVE image must be 512 bytes")
    fcw, fsw, ftw, _fop, _fip, _fdp, mxcsr, _mask = _FX.unpack_from(img, 0)
    uc.reg_write(x86.UC_X86_REG_FPCW, fcw)
    uc.reg_write(x86.UC_X86_REG_FPSW, fsw)
    uc.reg_write(x86.UC_X86_REG_MXCSR, mxcsr)
    top = (fsw >> 11) & 7
    for i in range(8):
        mant, exp = struct.unpack_from("<QH", img, 32 + 16 * i)
        uc.reg_write(x86.UC_X86_REG_FP0 + ((top + i) & 7), (mant, exp))
    tags = 0
    for i in range(8):
        tags |= (0 if ftw >> i & 1 else 3) << (2 * i)
    uc.reg_write(x86.UC_X86_REG_FPTAG, tags)
    for i in range(16):
        uc.reg_write(x86.UC_X86_REG_XMM0 + i, int.from_bytes(img[160 + 16 * i:176 + 16 * i],
                                                             "little"))
