"""SYSCALL and SYSENTER: unicorn only calls a hook for them, pyhv does what the CPU does.

(SYSRET, SYSEXIT, SWAPGS, IRET and the MSR instructions are executed by unicorn itself.)

SYSCALL (SDM Vol. 2B; AMD APM Vol. 3), with EFER.SCE=1, else #UD:
    long mode:   RCX = next RIP, R11 = RFLAGS, RFLAGS &= ~SFMASK (and RF cleared),
                 CS = STAR[47:32] & ~3 (flat 64-bit code, DPL 0), SS = that + 8 (flat
                 data, DPL 0), RIP = LSTAR from 64-bit code or CSTAR from compat code
    legacy mode: ECX = next EIP, clear IF, VM, RF; CS/SS as above but 32-bit;
                 EIP = STAR[31:0]
SYSENTER (SDM Vol. 2B), #GP(0) if SYSENTER_CS is null or in real mode:
    CS = SYSENTER_CS & ~3 (64-bit code when EFER.LMA), SS = CS + 8, RIP = SYSENTER_EIP,
    RSP = SYSENTER_ESP, clear IF, VM, RF.

Invariant: called from unicorn's instruction hook, where EIP still points at the
instruction and unicorn adds the instruction length (2) after the hook returns, so the
new RIP is written minus 2. The caller commits the view.
"""

from __future__ import annotations

from pyhv.engines.emu import layout as L
from pyhv.engines.emu.cpu import CpuView

INSN_LEN = 2
IF, RF, VM = 1 << 9, 1 << 16, 1 << 17
EFER_SCE = 1

CODE64 = (L.DESC_P | L.DESC_S | (0xB << 8) | L.DESC_L | L.DESC_G)
CODE32 = (L.DESC_P | L.DESC_S | (0xB << 8) | L.DESC_B | L.DESC_G)
DATA = (L.DESC_P | L.DESC_S | (0x3 << 8) | L.DESC_B | L.DESC_G)


class Undefined(Exception):
    """The instruction raises #UD (vector 6) or #GP(0) (vector 13)."""

    def __init__(self, vector: int) -> None:
        super().__init__(vector)
        self.vector = vector


def syscall(cpu: CpuView) -> None:
    b = cpu.b
    if not cpu.efer & EFER_SCE:
        raise Undefined(6)
    star = b.u64(L.STAR)
    rip = cpu.rip
    nxt = rip + INSN_LEN
    sel = (star >> 32) & 0xFFFC
    if cpu.long_mode:
        compat = not (cpu.seg("cs")[3] & L.DESC_L)
        cpu.set_reg("rcx", nxt)
        cpu.set_reg("r11", cpu.rflags & ~RF)
        cpu.rflags &= ~(b.u64(L.FMASK) | RF)
        target = b.u64(L.CSTAR if compat else L.LSTAR)
        cpu.set_seg("cs", sel, 0, 0xFFFFFFFF, CODE64)
    else:
        cpu.set_reg("rcx", nxt & 0xFFFFFFFF)
        cpu.rflags &= ~(IF | VM | RF)
        target = star & 0xFFFFFFFF
        cpu.set_seg("cs", sel, 0, 0xFFFFFFFF, CODE32)
    cpu.set_seg("ss", sel + 8, 0, 0xFFFFFFFF, DATA)
    cpu.rip = (target - INSN_LEN) & 0xFFFFFFFFFFFFFFFF


def sysenter(cpu: CpuView) -> None:
    b = cpu.b
    cs = b.u32(L.SYSENTER_CS) & 0xFFFC
    if not cpu.protected or cs == 0:
        raise Undefined(13)
    cpu.rflags &= ~(IF | VM | RF)
    if cpu.long_mode:
        cpu.set_seg("cs", cs, 0, 0xFFFFFFFF, CODE64)
        target = b.u64(L.SYSENTER_EIP)
        cpu.set_reg("rsp", b.u64(L.SYSENTER_ESP))
    else:
        cpu.set_seg("cs", cs, 0, 0xFFFFFFFF, CODE32)
        target = b.u64(L.SYSENTER_EIP) & 0xFFFFFFFF
        cpu.set_reg("rsp", b.u64(L.SYSENTER_ESP) & 0xFFFFFFFF)
    cpu.set_seg("ss", cs + 8, 0, 0xFFFFFFFF, DATA)
    cpu.rip = (target - INSN_LEN) & 0xFFFFFFFFFFFFFFFF
