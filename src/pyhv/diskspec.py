"""`pyhv run --disk PATH[,format=raw|qcow2][,readonly=on|off][,serial=S]`: the option's
syntax, checked before anything boots, and how a spec becomes a virtio-blk device.

A comma inside PATH is written twice (",,"), as in QEMU's option syntax. The serial is
at most 20 bytes of printable ASCII (what GET_ID returns; Linux shows it as
/sys/block/vdX/serial). Each disk is opened by `make_function` when the machine is
built (pyhv.disk.open_image, with QEMU-compatible image locks: a second writer is
refused with QEMU's message), so a machine restarted by a guest reboot reopens it after
the previous one closed it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from pyhv.devices.deferred import DeferredCalls
from pyhv.devices.pci.function import PciFunction
from pyhv.errors import ConfigError
from pyhv.memory import GuestMemory

MAX_SERIAL = 20


@dataclass(frozen=True)
class DiskSpec:
    path: str
    format: str | None = None
    read_only: bool = False
    serial: str = ""


def _split(text: str) -> list[str]:
    parts, cur, i = [], "", 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    parts.append(cur)
    return parts


def parse_disk(text: str) -> DiskSpec:
    parts = _split(text)
    path = parts[0]
    if not path:
        raise ConfigError(f"--disk {text!r}: no image path")
    fmt: str | None = None
    ro = False
    serial = ""
    for opt in parts[1:]:
        key, eq, value = opt.partition("=")
        if not eq:
            raise ConfigError(f"--disk {text!r}: expected KEY=VALUE, got {opt!r}")
        if key == "format":
            if value not in ("raw", "qcow2"):
                raise ConfigError(f"--disk {text!r}: format must be raw or qcow2")
            fmt = value
        elif key == "readonly":
            if value not in ("on", "off"):
                raise ConfigError(f"--disk {text!r}: readonly must be on or off")
            ro = value == "on"
        elif key == "serial":
            if len(value) > MAX_SERIAL or not all(0x20 < ord(c) < 0x7F for c in value):
                raise ConfigError(f"--disk {text!r}: serial must be at most {MAX_SERIAL} "
                                  "printable ASCII characters without spaces")
            serial = value
        else:
            raise ConfigError(f"--disk {text!r}: unknown option {key!r} "
                              "(format, readonly, serial)")
    if not os.path.exists(path):
        raise ConfigError(f"--disk {path}: no such file")
    return DiskSpec(path, fmt, ro, serial)


def make_function(spec: DiskSpec, index: int, *, held: bool = True
                  ) -> Callable[[GuestMemory, DeferredCalls], PciFunction]:
    """A factory for MachineConfig.pci_devices: opens the image, builds the device.
    held=False (a migration's destination): the image is only sized now and opened
    when the VM is taken over (pyhv.disk.handover)."""
    def make(memory: GuestMemory, deferred: DeferredCalls) -> PciFunction:
        from pyhv.devices.virtio.blk import VirtioBlk
        from pyhv.devices.virtio.transport import VirtioPciFunction
        from pyhv.disk.blockdev import BlockDevice
        from pyhv.disk.handover import peek
        from pyhv.disk.open import open_image

        def reopen() -> BlockDevice:
            return open_image(spec.path, spec.format, read_only=spec.read_only, guest=True)
        disk: BlockDevice = reopen() if held else peek(spec.path, spec.format,
                                                       spec.read_only)
        try:
            dev = VirtioBlk(disk, serial=spec.serial, name=f"virtio-blk{index}",
                            reopen=reopen)
            return VirtioPciFunction(dev, memory, deferred)
        except BaseException:
            disk.close()
            raise
    return make
