"""Typed vCPU exits: what running guest code hands back to the machine.

Pure data with no dependencies, shared by the KVM binding and every engine, so that no
caller touches raw `kvm_run` bytes or an engine's private state (after rust-vmm's
`VcpuExit`). For IoIn/MmioRead the run loop fills `data` before the vCPU runs again.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class Exit:
    """Base of every typed exit."""

    __slots__ = ()


@dataclass(slots=True)
class IoIn(Exit):
    port: int
    size: int
    data: memoryview          # size * count bytes, filled by the run loop
    count: int = 1


@dataclass(slots=True)
class IoOut(Exit):
    port: int
    size: int
    data: bytes               # size * count bytes written by the guest
    count: int = 1


@dataclass(slots=True)
class MmioRead(Exit):
    addr: int
    data: memoryview          # len(data) bytes, filled by the run loop


@dataclass(slots=True)
class MmioWrite(Exit):
    addr: int
    data: bytes


@dataclass(slots=True)
class Halt(Exit):
    interrupts_enabled: bool  # RFLAGS.IF at the HLT: False means nothing can wake it


@dataclass(slots=True)
class Shutdown(Exit):
    reason: str = "triple fault"
    rip: int | None = None


@dataclass(slots=True)
class Interrupted(Exit):
    pass


@dataclass(slots=True)
class InternalError(Exit):
    reason: str
    rip: int | None = None
    insn: bytes = b""
    detail: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        where = f" at rip={self.rip:#x}" if self.rip is not None else ""
        code = f" (instruction bytes: {self.insn.hex(' ')})" if self.insn else ""
        return f"{self.reason}{where}{code}"
