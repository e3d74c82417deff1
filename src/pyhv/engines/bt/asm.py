"""Assembling translated code: an emitter that knows where its bytes will run.

Design: translated code is assembled one instruction at a time at its final address in
the translation cache (`Emitter.at`), with iced-x86's encoder, so RIP-relative operands
that reach the vCPU state page (area.S, within the same few MiB) are computed by the
encoder. Guest addresses are a different matter: the TC lives at 0x7f80_0000_0000, far
beyond the +-2 GiB a RIP-relative displacement reaches from there, so a guest
RIP-relative operand becomes an absolute one (`absolute()`):

    target < 4 GiB                 [disp32] with a 0x67 address-size prefix (zero-extended)
    target in the top 2 GiB        [disp32] sign-extended (64-bit addressing, no base)
    anywhere else                  a scratch register loaded with the 64-bit address

Only register-to-memory moves, immediates, jumps and the few instructions the sequences
need are emitted; nothing here changes the guest's flags unless its docstring says so.
"""

from __future__ import annotations

import struct
from typing import cast

import iced_x86 as ix

from pyhv.engines.bt import area as A

R = ix.Register
GPR64 = (R.RAX, R.RCX, R.RDX, R.RBX, R.RSP, R.RBP, R.RSI, R.RDI,
         R.R8, R.R9, R.R10, R.R11, R.R12, R.R13, R.R14, R.R15)
RCX, R10, R11 = 1, 10, 11
SCRATCH_ORDER = (11, 10, 9, 8, 3, 1)     # candidates for a scratch register


def reg32(idx: int) -> ix.Register_:
    """The 32-bit register with encoding number `idx` (EAX..R15D)."""
    return cast(ix.Register_, R.EAX + idx)


def reg16(idx: int) -> ix.Register_:
    """The 16-bit register with encoding number `idx` (AX..R15W)."""
    return cast(ix.Register_, R.AX + idx)


def fits32(value: int) -> bool:
    """True if `value` (a 64-bit address) is a sign-extended 32-bit immediate."""
    value &= 0xFFFF_FFFF_FFFF_FFFF
    return value < 0x8000_0000 or value >= 0xFFFF_FFFF_8000_0000


def s_mem(off: int, size: int = 0) -> ix.MemoryOperand:
    """A RIP-relative operand naming S page offset `off`."""
    return ix.MemoryOperand(R.RIP, displ=A.s_addr(off))


class Emitter:
    """Bytes of one translation, assembled at their final TC address."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.code = bytearray()
        self._enc = ix.Encoder(64)

    @property
    def here(self) -> int:
        return self.at + len(self.code)

    def raw(self, data: bytes) -> None:
        self.code += data

    def raw_at(self, data: bytes) -> int:
        """Append `data`; returns its address."""
        addr = self.here
        self.code += data
        return addr

    def ins(self, i: ix.Instruction) -> int:
        """Encode `i` here; returns its address."""
        addr = self.here
        self._enc.encode(i, addr)
        self.code += self._enc.take_buffer()
        return addr

    # ------------------------------------------------------------------ S page

    def store(self, reg: int, off: int) -> int:
        """mov [S+off], r64"""
        return self.ins(ix.Instruction.create_mem_reg(ix.Code.MOV_RM64_R64, s_mem(off),
                                                      GPR64[reg]))

    def load(self, reg: int, off: int) -> int:
        """mov r64, [S+off]"""
        return self.ins(ix.Instruction.create_reg_mem(ix.Code.MOV_R64_RM64, GPR64[reg],
                                                      s_mem(off)))

    def store_imm32(self, off: int, value: int) -> int:
        """mov dword [S+off], imm32"""
        return self.ins(ix.Instruction.create_mem_u32(ix.Code.MOV_RM32_IMM32, s_mem(off),
                                                      value & 0xFFFF_FFFF))

    def store_imm64(self, off: int, value: int) -> int:
        """mov qword [S+off], imm32 (sign-extended)"""
        return self.ins(ix.Instruction.create_mem_i32(ix.Code.MOV_RM64_IMM32, s_mem(off),
                                                      value))

    def movabs(self, reg: int, value: int) -> int:
        return self.ins(ix.Instruction.create_reg_u64(ix.Code.MOV_R64_IMM64, GPR64[reg],
                                                      value & 0xFFFF_FFFF_FFFF_FFFF))

    # ------------------------------------------------------------------ control

    def jmp(self, target: int | None) -> int:
        """jmp rel32 (None: to be patched); returns the address of its rel32 field."""
        start = self.here
        rel = 0 if target is None else target - (start + 5)
        self.raw(b"\xe9" + struct.pack("<i", rel))
        return start + 1

    def jcc(self, cc: int, target: int | None) -> int:
        """j<cc> rel32 (cc = the low nibble of the opcode); returns its rel32 address."""
        start = self.here
        rel = 0 if target is None else target - (start + 6)
        self.raw(bytes((0x0F, 0x80 | cc)) + struct.pack("<i", rel))
        return start + 2

    def patch(self, rel_at: int, target: int) -> None:
        """Point the rel32 field at TC address `rel_at` (in this emitter) to `target`."""
        off = rel_at - self.at
        self.code[off:off + 4] = struct.pack("<i", target - (rel_at + 4))

    def jmp_s(self, off: int) -> int:
        """jmp qword [S+off]"""
        return self.ins(ix.Instruction.create_mem(ix.Code.JMP_RM64, s_mem(off)))

    def callout(self, site: int, common: int) -> int:
        """mov dword [S.SITE], site; jmp COMMON"""
        start = self.store_imm32(A.S_SITE, site)
        self.jmp(common)
        return start


def rel32_patch(at: int, target: int) -> bytes:
    """The rel32 bytes for a jump whose rel32 field is at `at`, going to `target`."""
    return struct.pack("<i", target - (at + 4))


def absolute(i: ix.Instruction, scratch: int | None) -> ix.Instruction:
    """A copy of `i` whose RIP-relative memory operand names the same address absolutely
    (see the module docstring); `scratch` is the register holding it in the far case."""
    out = i.copy()
    target = i.ip_rel_memory_address
    out.memory_index = R.NONE
    if target < 1 << 32:
        out.memory_base = R.NONE
        out.memory_displacement = target
        out.memory_displ_size = 4
    elif fits32(target):
        out.memory_base = R.NONE
        out.memory_displacement = target
        out.memory_displ_size = 8
    else:
        assert scratch is not None
        out.memory_base = GPR64[scratch]
        out.memory_displacement = 0
        out.memory_displ_size = 0
    return out


def needs_scratch(target: int) -> bool:
    return not (target < 1 << 32 or fits32(target))


def regs_used(i: ix.Instruction) -> set[int]:
    """Encoding numbers of the 64-bit GPRs `i` reads or writes (explicitly or not)."""
    out: set[int] = set()
    for u in ix.InstructionInfoFactory().info(i).used_registers():
        full = ix.RegisterInfo(u.register).full_register
        if R.RAX <= full <= R.R15:
            out.add(full - R.RAX)
    return out


def pick_scratch(used: set[int]) -> int:
    return next(r for r in SCRATCH_ORDER if r not in used)


def mem_operand(i: ix.Instruction, scratch: int | None = None, extra: int = 0
                ) -> ix.MemoryOperand:
    """`i`'s memory operand as a MemoryOperand (RIP-relative made absolute), + `extra`."""
    seg = i.segment_prefix
    if i.is_ip_rel_memory_operand:
        target = (i.ip_rel_memory_address + extra) & 0xFFFF_FFFF_FFFF_FFFF
        if target < 1 << 32 or fits32(target):
            # a 64-bit [disp32] is sign-extended: below 2 GiB or in the top 2 GiB
            if fits32(target):
                return ix.MemoryOperand(R.NONE, displ=_signed(target), displ_size=8, seg=seg)
            return ix.MemoryOperand(R.NONE, displ=target, displ_size=4, seg=seg)
        assert scratch is not None
        return ix.MemoryOperand(GPR64[scratch], displ=extra, displ_size=1 if extra else 0,
                                seg=seg)
    return ix.MemoryOperand(i.memory_base, i.memory_index, i.memory_index_scale,
                            _signed(i.memory_displacement + extra),
                            i.memory_displ_size or (1 if extra else 0), False, seg)


def _signed(value: int) -> int:
    """A 64-bit displacement as the signed value MemoryOperand takes."""
    value &= 0xFFFF_FFFF_FFFF_FFFF
    return value - (1 << 64) if value >> 63 else value
