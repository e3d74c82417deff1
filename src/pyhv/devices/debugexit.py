"""QEMU's isa-debug-exit device: a guest ends the run with a status of its choosing.

Convention (QEMU hw/misc/debugexit.c, as documented for `-device isa-debug-exit`): a
write of value v to the port makes the VMM exit with status (v << 1) | 1, so a guest
can never report 0 (success is conventionally some agreed odd status). pyhv puts it
where test guests usually ask QEMU for it: `iobase=0xf4`.

    port 0xf4  write v  -> on_exit((v << 1) | 1); v is the whole written value (an
                           `outl` passes 32 bits), the caller truncates to 8 bits if the
                           status goes to a process exit code
               read     -> 0

Design: the device only reports; ending the run is the callback's business (the machine
stops its vCPUs and returns the status). Invariant: every write calls `on_exit` once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from pyhv.devices.bus import BusDevice
from pyhv.devices.state import Reader

PORT = 0xF4
LENGTH = 1


class DebugExit:
    """isa-debug-exit: writes end the run through `on_exit(status)`."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self.on_exit = on_exit
        self.last_status: int | None = None

    def regions(self) -> list[tuple[int, int, BusDevice, str]]:
        """(base, length, device, name) to register on the port bus."""
        return [(PORT, LENGTH, self, "debugexit")]

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        status = (value << 1) | 1
        self.last_status = status
        self.on_exit(status)

    # ------------------------------------------------------------------ state records

    state_version: ClassVar[int] = 1

    def save_state(self) -> dict[str, Any]:
        return {"last_status": self.last_status}

    def load_state(self, record: Mapping[str, Any], version: int) -> None:
        r = Reader("debug-exit", record)
        last = r.opt_int("last_status", 0, 0x1FFFFFFFF)
        r.done()
        self.last_status = last
