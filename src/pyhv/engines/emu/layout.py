"""unicorn 2.1.4's x86 CPU state blob: field offsets, a start-up self-check, typed access.

Why: unicorn's register API cannot set everything pyhv must set. In 64-bit mode writing
CS/SS only changes the selector (not the hidden descriptor nor the CPL), the error code
and "software INT" flag of an exception live only in the CPU state, and an internal
"exception in flight" field (QEMU's `old_exception`) is not cleared when pyhv delivers an
exception itself, so the next fault would become #DF (docs/host.md). The context blob of
`uc_context_save` is a byte copy of QEMU's `CPUX86State` (up to its reset fields), so pyhv
reads and writes those fields there and `uc_context_restore`s the result.

This ties pyhv to one unicorn build: pyproject pins unicorn==2.1.4, and `self_check()`
verifies every offset used here against values written through unicorn's public API (and
one real exception) before the first vCPU runs. A mismatch raises HostError naming the
version, never a silently corrupted guest.

    CPUX86State (x86_64 target, as in unicorn 2.1.4 / QEMU 5.0.1), offsets in bytes:
      0   regs[16]        RAX RCX RDX RBX RSP RBP RSI RDI R8..R15 (QEMU order)
    128   eip             136 eflags (IF, IOPL, TF... but not the arithmetic flags)
    144   cc_dst  152 cc_src  160 cc_src2  168 cc_op (u32)  172 df (+1/-1)
    176   hflags (u32)    180 hflags2 (u32)
    184   segs[6]         ES CS SS DS FS GS, 24 bytes each:
                          selector u32 | pad | base u64 | limit u32 | flags u32
    328   ldt  352 tr  376 gdt  400 idt   (same 24-byte SegmentCache)
    424   cr[0..4]        592 efer
    4800  sysenter_cs(u32) 4808 sysenter_esp 4816 sysenter_eip 4824 star
    4840  lstar 4848 cstar 4856 fmask 4864 kernelgsbase 5280 pat
    5384  error_code(i32) 5388 exception_is_int(i32) 5392 exception_next_eip
    5496  old_exception (i32)
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

from pyhv.errors import HostError

UNICORN_VERSION = "2.1.4"

CTX_HEADER = 40          # struct uc_context header before the CPUX86State copy
ENV_SIZE = 5568          # bytes of CPUX86State the context holds

REGS = 0
EIP = 128
EFLAGS = 136
CC_DST = 144
CC_SRC = 152
CC_SRC2 = 160
CC_OP = 168
DF = 172
HFLAGS = 176
HFLAGS2 = 180
SEGS = 184
LDT = 328
TR = 352
GDT = 376
IDT = 400
CR = 424
EFER = 592
SYSENTER_CS = 4800
SYSENTER_ESP = 4808
SYSENTER_EIP = 4816
STAR = 4824
LSTAR = 4840
CSTAR = 4848
FMASK = 4856
KERNELGSBASE = 4864
PAT = 5280
ERROR_CODE = 5384
EXCEPTION_IS_INT = 5388
EXCEPTION_NEXT_EIP = 5392
OLD_EXCEPTION = 5496

SEG_SIZE = 24
# QEMU's segment order in segs[]
R_ES, R_CS, R_SS, R_DS, R_FS, R_GS = range(6)
SEG_INDEX = {"es": R_ES, "cs": R_CS, "ss": R_SS, "ds": R_DS, "fs": R_FS, "gs": R_GS}
# QEMU's register order in regs[]
REG_INDEX = {"rax": 0, "rcx": 1, "rdx": 2, "rbx": 3, "rsp": 4, "rbp": 5, "rsi": 6, "rdi": 7,
             "r8": 8, "r9": 9, "r10": 10, "r11": 11, "r12": 12, "r13": 13, "r14": 14,
             "r15": 15}
CC_OP_EFLAGS = 1         # cc_src holds the arithmetic flags as they are

# hflags bits (QEMU target/i386/cpu.h, HF_*_SHIFT)
HF_CPL_MASK = 3
HF_INHIBIT_IRQ = 1 << 3
HF_CS32 = 1 << 4
HF_SS32 = 1 << 5
HF_ADDSEG = 1 << 6
HF_PE = 1 << 7
HF_MP = 1 << 9
HF_EM = 1 << 10
HF_TS = 1 << 11
HF_LMA = 1 << 14
HF_CS64 = 1 << 15
HF_OSFXSR = 1 << 22
HF_SMAP = 1 << 23
# the hflags bits pyhv derives from architectural state (others are left as unicorn has them)
HF_DERIVED = (HF_CPL_MASK | HF_INHIBIT_IRQ | HF_CS32 | HF_SS32 | HF_ADDSEG | HF_PE | HF_MP
              | HF_EM | HF_TS | HF_LMA | HF_CS64 | HF_OSFXSR | HF_SMAP)

# QEMU's SegmentCache.flags: the descriptor's high dword, bits 8..23 in place
DESC_TYPE_SHIFT = 8
DESC_S = 1 << 12
DESC_DPL_SHIFT = 13
DESC_P = 1 << 15
DESC_AVL = 1 << 20
DESC_L = 1 << 21
DESC_B = 1 << 22
DESC_G = 1 << 23

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")


class Blob:
    """One reusable unicorn context and typed access to the CPUX86State inside it.

    `load()` copies the live CPU state in (uc_context_save into the same buffer),
    `store()` copies it back (uc_context_restore). Both are valid inside hooks.
    """

    def __init__(self, uc: Any) -> None:
        self.uc = uc
        self.ctx = uc.context_save()
        if self.ctx.size != CTX_HEADER + ENV_SIZE:
            raise HostError(
                f"unicorn context is {self.ctx.size} bytes, pyhv expects "
                f"{CTX_HEADER + ENV_SIZE} (unicorn {UNICORN_VERSION}); install "
                f"unicorn=={UNICORN_VERSION}")
        addr = self.ctx.context.value
        self.buf = (ctypes.c_char * ENV_SIZE).from_address(addr + CTX_HEADER)
        self.mv = memoryview(self.buf).cast("B")

    def load(self) -> None:
        self.uc.context_update(self.ctx)

    def store(self) -> None:
        self.uc.context_restore(self.ctx)

    # -- fields
    def u64(self, off: int) -> int:
        return int(_U64.unpack_from(self.mv, off)[0])

    def set_u64(self, off: int, value: int) -> None:
        _U64.pack_into(self.mv, off, value & 0xFFFFFFFFFFFFFFFF)

    def u32(self, off: int) -> int:
        return int(_U32.unpack_from(self.mv, off)[0])

    def set_u32(self, off: int, value: int) -> None:
        _U32.pack_into(self.mv, off, value & 0xFFFFFFFF)

    def i32(self, off: int) -> int:
        return int(_I32.unpack_from(self.mv, off)[0])

    def set_i32(self, off: int, value: int) -> None:
        _I32.pack_into(self.mv, off, value)

    def reg(self, name: str) -> int:
        return self.u64(REGS + 8 * REG_INDEX[name])

    def set_reg(self, name: str, value: int) -> None:
        self.set_u64(REGS + 8 * REG_INDEX[name], value)

    def seg(self, off: int) -> tuple[int, int, int, int]:
        """(selector, base, limit, flags) of the SegmentCache at off."""
        sel, _pad, base, limit, flags = struct.unpack_from("<IIQII", self.mv, off)
        return sel, base, limit, flags

    def set_seg(self, off: int, selector: int, base: int, limit: int, flags: int) -> None:
        struct.pack_into("<IIQII", self.mv, off, selector & 0xFFFF, 0,
                         base & 0xFFFFFFFFFFFFFFFF, limit & 0xFFFFFFFF, flags & 0xFFFFFFFF)

    @staticmethod
    def seg_off(name: str) -> int:
        if name == "ldt":
            return LDT
        if name == "tr":
            return TR
        return SEGS + SEG_SIZE * SEG_INDEX[name]

    @property
    def cpl(self) -> int:
        return self.u32(HFLAGS) & HF_CPL_MASK

    def cr(self, n: int) -> int:
        return self.u64(CR + 8 * n)

    def set_cr(self, n: int, value: int) -> None:
        self.set_u64(CR + 8 * n, value)


# ---------------------------------------------------------------------- self-check

_checked: str | None = None


def self_check() -> None:
    """Verify the offsets above against unicorn's public API; HostError on mismatch."""
    global _checked
    if _checked == "ok":
        return
    from pyhv.engines.emu._uc import IMPORT_ERROR, scratch_uc, unicorn
    from pyhv.engines.emu._uc import x86 as x
    if IMPORT_ERROR is not None:
        raise HostError(f"the emu engine needs the Python package unicorn: {IMPORT_ERROR}")
    version = getattr(unicorn, "__version__", "?")
    problems: list[str] = []
    try:
        uc = scratch_uc()
        uc.mem_map(0, 0x10000)
        values = {name: 0x1111_0000_0000 + 0x101 * i for i, name in enumerate(REG_INDEX)}
        for name, v in values.items():
            uc.reg_write(getattr(x, f"UC_X86_REG_{name.upper()}"), v)
        uc.reg_write(x.UC_X86_REG_RIP, 0x1000)
        uc.reg_write(x.UC_X86_REG_GDTR, (0, 0x2000, 0x3F, 0))
        uc.reg_write(x.UC_X86_REG_IDTR, (0, 0x3000, 0xFFF, 0))
        uc.reg_write(x.UC_X86_REG_CR2, 0x4242_4242)
        uc.reg_write(x.UC_X86_REG_FS_BASE, 0x7777_0000)
        msrs = {0x174: (SYSENTER_CS, 0x10, 4), 0x175: (SYSENTER_ESP, 0x1750_0000, 8),
                0x176: (SYSENTER_EIP, 0x1760_0000, 8), 0xC0000081: (STAR, 0x0023_0010_0000_0000, 8),
                0xC0000082: (LSTAR, 0x8200_0000, 8), 0xC0000083: (CSTAR, 0x8300_0000, 8),
                0xC0000084: (FMASK, 0x4700, 8), 0xC0000102: (KERNELGSBASE, 0x1020_0000, 8),
                0x277: (PAT, 0x0007_0406_0007_0407, 8),
                0xC0000080: (EFER, 0xD01, 8)}
        for msr, (_off, v, _sz) in msrs.items():
            uc.reg_write(x.UC_X86_REG_MSR, (msr, v))
        b = Blob(uc)
        b.load()
        for name, v in values.items():
            if b.reg(name) != v:
                problems.append(f"regs[{name}]")
        if b.u64(EIP) != 0x1000:
            problems.append("eip")
        if b.seg(GDT)[1:3] != (0x2000, 0x3F) or b.seg(IDT)[1:3] != (0x3000, 0xFFF):
            problems.append("gdt/idt")
        if b.cr(2) != 0x4242_4242:
            problems.append("cr2")
        if b.seg(Blob.seg_off("fs"))[1] != 0x7777_0000:
            problems.append("segs")
        for msr, (off, v, sz) in msrs.items():
            got = b.u32(off) if sz == 4 else b.u64(off)
            if got != v:
                problems.append(f"msr {msr:#x}")
        if b.u32(HFLAGS) & (HF_PE | HF_LMA | HF_CS64) != HF_PE | HF_LMA | HF_CS64:
            problems.append("hflags")
        # one real exception: INT 0x80 records is_int and the next RIP; a #GP with a
        # selector error code records error_code and old_exception.
        seen: list[tuple[int, int, int, int, int]] = []

        def intr(uc_: Any, intno: int, _ud: Any) -> None:
            b.load()
            seen.append((intno, b.i32(ERROR_CODE), b.i32(EXCEPTION_IS_INT),
                         b.u64(EXCEPTION_NEXT_EIP), b.i32(OLD_EXCEPTION)))
            uc_.emu_stop()

        uc.hook_add(unicorn.UC_HOOK_INTR, intr)
        # int 0x80 ; hlt
        uc.mem_write(0x1000, bytes.fromhex("cd80f4"))
        uc.emu_start(0x1000, 0x1003)
        # mov ax, 0x2b ; mov ds, ax (beyond the GDT limit: #GP(0x28)) ; hlt
        uc.mem_write(0x1100, bytes.fromhex("66b82b008ed8f4"))
        uc.emu_start(0x1100, 0x1107)
        if len(seen) != 2:
            problems.append(f"exceptions seen {seen}")
        else:
            if seen[0][0] != 0x80 or seen[0][2] != 1 or seen[0][3] != 0x1002:
                problems.append(f"exception_is_int/next_eip {seen[0]}")
            if seen[1][0] != 13 or seen[1][1] != 0x28 or seen[1][4] != 13:
                problems.append(f"error_code/old_exception {seen[1]}")
    except HostError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here means "layout unknown"
        problems.append(f"{type(e).__name__}: {e}")
    if problems:
        raise HostError(
            f"unicorn {version}'s CPU state layout is not the one pyhv's emu engine was "
            f"written for (unicorn=={UNICORN_VERSION}): {', '.join(problems)}")
    _checked = "ok"
