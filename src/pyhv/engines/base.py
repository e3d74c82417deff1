"""The engine boundary: how any way of running guest code meets the machine.

Design: an `Engine` is one VM's execution back end (KVM, the software CPU, trap-and-
emulate, binary translation...). It is given the guest's `GuestMemory` and creates
vCPUs. A vCPU's `run()` executes guest code until something the machine must handle
happens and returns a typed `Exit`:

    IoIn / IoOut        port I/O (data to fill / data written)
    MmioRead / MmioWrite  an access outside RAM
    Halt                HLT with nothing to deliver (the run loop decides to wait or stop)
    Shutdown            triple fault or reset request from the CPU
    Interrupted         `kick()` was called (timer due, pause requested)
    InternalError       the engine cannot go on (reason, rip, instruction bytes)

The machine never touches an engine's private state: interrupts reach a vCPU through an
`InterruptSource` (the 8259 PIC, or anything with `pending()`/`acknowledge()`) that the
engine polls its own way; architectural state goes in and out as one `CpuState`; dirty
pages come from `dirty_pages()`. So devices, loaders, snapshots and migration are written
once for every engine.

Engine options: what a user may choose about an engine (`pyhv run --engine-opt
NAME=VALUE`) is declared by the engine class in `options` and checked by
`parse_options`, which turns the text pairs into the constructor's keyword arguments
(defaults filled in) or refuses them with a ConfigError naming what is accepted. Nothing
reaches an engine through the environment.

Invariants: `run()` is only called by the thread that owns the vCPU; `kick()` may be
called from any thread and makes the current or next `run()` return `Interrupted` soon.
For IoIn/MmioRead the run loop fills `data` before the next `run()`; the engine feeds it
to the guest when it resumes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from pyhv.arch.x86.cpustate import CpuState
from pyhv.clock import TimerQueue, VirtualClock
from pyhv.errors import ConfigError
from pyhv.exits import (
    Exit,
    Halt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
)
from pyhv.memory import GuestMemory

__all__ = ["Engine", "EngineOption", "EngineVcpu", "InterruptSource", "Exit", "Halt",
           "InternalError", "Interrupted", "IoIn", "IoOut", "MmioRead", "MmioWrite", "Shutdown",
           "on_off"]

# ---------------------------------------------------------------------- interfaces


class InterruptSource(Protocol):
    """What an engine asks about external interrupts (the 8259's INTR/INTA pair)."""

    def pending(self) -> bool:
        """True while an unmasked interrupt request waits (the INTR pin)."""
        ...

    def acknowledge(self) -> int | None:
        """The INTA cycle: the vector to deliver, or None if the request went away."""
        ...


IoHandler = Callable[[int, int, "int | None"], int]
# handler(msr, value | None for a read) -> the value read, 0 after a write, or None when
# the MSR is not the handler's (the engine's own MSRs answer); raises MsrFault for #GP(0)
MsrHandler = Callable[[int, "int | None"], "int | None"]


class MsrFault(Exception):
    """An MSR handler refuses the access: the RDMSR/WRMSR takes #GP(0)."""


class EngineVcpu(ABC):
    """One virtual CPU of an engine."""

    index: int

    @abstractmethod
    def run(self) -> Exit:
        """Run guest code until the next exit."""

    @abstractmethod
    def get_state(self) -> CpuState: ...

    @abstractmethod
    def set_state(self, state: CpuState) -> None: ...

    @abstractmethod
    def kick(self) -> None:
        """Ask a running (or about to run) `run()` to return `Interrupted` soon."""

    def set_interrupt_source(self, source: InterruptSource | None) -> None:
        """Where external interrupts come from (None: no interrupt controller)."""
        self.interrupt_source = source

    def invalidate_code(self) -> None:  # noqa: B027
        """Code in RAM may have been changed by another vCPU: drop any translation of
        it this vCPU keeps (a software CPU's translation cache). Called between runs."""

    def set_apic_present(self, present: bool) -> None:  # noqa: B027
        """The machine has a local APIC for this vCPU (xAPIC MMIO at 0xfee00000): an
        engine whose CPUID can say so truthfully sets CPUID.1:EDX.APIC. Engines that
        cannot route the APIC's accesses keep the bit clear."""

    def attach_msr(self, handler: MsrHandler) -> bool:
        """Route the local APIC's MSRs (IA32_APIC_BASE, the x2APIC range 0x800-0x8ff,
        IA32_TSC_DEADLINE) to `handler`. True if the engine can (its CPUID then offers
        x2APIC and TSC-deadline, with the APIC bit); engines that cannot return False
        and keep those bits clear."""
        return False

    def set_cpu_count(self, n: int) -> None:  # noqa: B027
        """The machine has n vCPUs: an engine whose CPUID shows the topology says so
        (emu: n cores of one package). Others ignore it."""

    def set_others_runnable(self, others: bool) -> None:  # noqa: B027
        """Before a slice of a round-robin run: whether another vCPU waits for its turn
        (emu then ends the slice at a PAUSE, a spin-wait). Others ignore it."""

    def guest_tsc(self) -> tuple[Callable[[], int], int] | None:
        """(a function reading this vCPU's TSC, its rate in Hz) when the engine defines
        the guest's TSC itself (a software CPU on virtual time), else None."""
        return None

    def attach_io(self, pio: IoHandler | None, mmio: IoHandler | None) -> None:  # noqa: B027
        """Synchronous I/O handlers, `f(addr, size, value|None) -> int` (None: a read).

        Engines that stop the guest for every access (KVM) return IoIn/IoOut/Mmio* exits
        instead and ignore this; a software CPU calls the handlers from inside `run()`.
        """

    def attach_clock(self, clock: VirtualClock, timers: TimerQueue) -> None:  # noqa: B027
        """For engines with `Engine.virtual_time`: advance `clock` with guest progress and
        return `Interrupted` by the next deadline in `timers`. Others ignore it."""

    def stats(self) -> dict[str, int | float]:
        """Engine-specific counters for `--stats` (exits, instructions, deliveries...)."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release host resources."""


def on_off(text: str) -> bool:
    """An on/off switch's value: on/off (also yes/no, true/false, 1/0)."""
    value = {"on": True, "yes": True, "true": True, "1": True,
             "off": False, "no": False, "false": False, "0": False}.get(text.lower())
    if value is None:
        raise ValueError(f"expected on or off, got {text!r}")
    return value


@dataclass(frozen=True)
class EngineOption:
    """One option a user may set on an engine (`--engine-opt NAME=VALUE`)."""

    name: str                      # also the constructor's keyword argument
    values: str                    # what VALUE may be, for messages and help ("on|off")
    parse: Callable[[str], Any]    # VALUE -> the argument; ValueError says what is wrong
    default: Any
    help: str


class Engine(ABC):
    """One VM's execution back end."""

    name: ClassVar[str]
    # True when guest time is the engine's own progress (a software CPU), so the machine
    # gives it a VirtualClock; False when guest time is host time (hardware engines).
    virtual_time: ClassVar[bool] = False
    # The options a user may set, passed to the constructor as keyword arguments.
    options: ClassVar[tuple[EngineOption, ...]] = ()

    @classmethod
    def parse_options(cls, given: Mapping[str, str]) -> dict[str, Any]:
        """`{NAME: VALUE}` from the user -> the constructor's keyword arguments, every
        declared option present (its default when not given); ConfigError for a name
        this engine does not declare or a value its option refuses."""
        known = {o.name: o for o in cls.options}
        out = {o.name: o.default for o in cls.options}
        for name, text in given.items():
            opt = known.get(name)
            if opt is None:
                takes = (f"it takes {', '.join(f'{o.name}={o.values}' for o in cls.options)}"
                         if cls.options else "it takes none")
                raise ConfigError(f"engine {cls.name!r} has no option {name!r} ({takes})")
            try:
                out[name] = opt.parse(text)
            except ValueError as e:
                raise ConfigError(f"engine {cls.name!r} option {name}={text}: {e} "
                                  f"({name}={opt.values})") from None
        return out

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory

    @classmethod
    @abstractmethod
    def probe(cls) -> str | None:
        """None when this engine can run on this host, else the reason it cannot."""

    @abstractmethod
    def create_vcpu(self, index: int) -> EngineVcpu: ...

    def enable_dirty_tracking(self, enable: bool = True) -> None:
        """Start (or stop) tracking guest writes to RAM."""
        raise NotImplementedError(f"engine {self.name} does not track dirty pages")

    def dirty_pages(self) -> set[int]:
        """Guest page frames written since the last call (guest and device writes)."""
        raise NotImplementedError(f"engine {self.name} does not track dirty pages")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release host resources (after every vCPU is closed)."""
