"""The boot timer: a one-port device the guest writes to when its /init starts.

After Firecracker's boot-timer device: the guest signals "user space is up" by writing
the magic value 123 to it, and the VMM prints how long the guest took to get there. pyhv
puts it on I/O port layout.BOOT_TIMER_PORT (0x440), free on a PC. The initramfs that
`pyhv guest fetch linux` builds runs a 49-byte static helper (`/bin/pyhv-boottimer`,
ioperm(0x440) + `outb 123`) as the first thing /init does.

    port 0x440  write 123   -> record the guest time (clock.now_ns()) once
                write other -> counted, ignored
                read        -> 0

Invariants: only the first magic write is recorded (`boot_ns` never changes after it);
the device holds two integers and an optional callback, whatever the guest writes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from pyhv.arch.x86 import layout
from pyhv.clock import Clock
from pyhv.devices.state import MAX_NS, Reader

MAGIC_BOOT_COMPLETE = 123
PORT = layout.BOOT_TIMER_PORT
LENGTH = 1


class BootTimer:
    """Records when the guest's user space announced itself."""

    def __init__(self, clock: Clock, on_boot: Callable[[int], None] | None = None) -> None:
        self.clock = clock
        self.on_boot = on_boot
        self.boot_ns: int | None = None
        self.other_writes = 0

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if value & 0xFF != MAGIC_BOOT_COMPLETE or offset != 0:
            self.other_writes += 1
            return
        if self.boot_ns is None:
            self.boot_ns = self.clock.now_ns()
            if self.on_boot is not None:
                self.on_boot(self.boot_ns)

    def report(self) -> str:
        """A one-line summary for --stats."""
        if self.boot_ns is None:
            return "boot timer: the guest never signalled /init"
        return f"boot timer: guest /init started at {self.boot_ns / 1e9:.3f} s"

    # ------------------------------------------------------------------ state records

    state_version: ClassVar[int] = 1

    def save_state(self) -> dict[str, Any]:
        return {"boot_ns": self.boot_ns}

    def load_state(self, record: Mapping[str, Any], version: int) -> None:
        r = Reader("boot-timer", record)
        boot_ns = r.opt_int("boot_ns", 0, MAX_NS)
        r.done()
        self.boot_ns = boot_ns
