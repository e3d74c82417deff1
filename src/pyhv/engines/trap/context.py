"""The guest's registers while the monitor holds it (between two KVM_RUNs).

Design: two situations, one interface.

    parked   the guest took an exception at CPL 3; the CPU pushed RIP/CS/RFLAGS/RSP/SS
             on the monitor's stack and sits in the stub, whose IRETQ will pop them.
             RIP, RSP and RFLAGS are read from that frame and written back to it, with
             no ioctl at all; the other registers are fetched with KVM_GET_REGS only
             when an emulation needs one (IN/OUT, MOV CR, RDMSR...).
    live     the guest stopped at CPL 3 for another reason (an MMIO access, a kick):
             all registers come from KVM_GET_REGS and go back with KVM_SET_REGS.

`commit()` writes back what changed: the frame (parked) and the registers, if any were
written. In the parked case KVM's RIP/RSP/RFLAGS are the stub's and are left as they
are: only the general registers the guest owns are changed.
"""

from __future__ import annotations

from pyhv.kvm import structs as ks
from pyhv.kvm.vcpu import Vcpu

GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")     # in encoding order


class Held:
    """RIP/RSP/RFLAGS (always loaded) and the other GPRs (on demand) of a held guest."""

    def __init__(self, vcpu: Vcpu, *, parked: bool, rip: int = 0, rsp: int = 0,
                 rflags: int = 0) -> None:
        self.vcpu = vcpu
        self.parked = parked
        self._regs: ks.KvmRegs | None = None
        self._dirty = False
        if parked:
            self.rip, self.rsp, self.rflags = rip, rsp, rflags
        else:
            r = self.regs()
            self.rip, self.rsp, self.rflags = r.rip, r.rsp, r.rflags

    def regs(self) -> ks.KvmRegs:
        if self._regs is None:
            self._regs = self.vcpu.get_regs()
        return self._regs

    def gpr(self, index: int) -> int:
        """General register by encoding number (0 = RAX ... 15 = R15)."""
        if index == 4:
            return self.rsp
        return int(getattr(self.regs(), GPRS[index]))

    def set_gpr(self, index: int, value: int) -> None:
        value &= 0xFFFF_FFFF_FFFF_FFFF
        if index == 4:
            self.rsp = value
            return
        setattr(self.regs(), GPRS[index], value)
        self._dirty = True

    def commit(self) -> None:
        """Push register changes to KVM (the caller writes the frame when parked)."""
        if self.parked:
            if self._dirty and self._regs is not None:
                self.vcpu.set_regs(self._regs)
            return
        r = self.regs()
        r.rip, r.rsp, r.rflags = self.rip, self.rsp, self.rflags
        self.vcpu.set_regs(r)
