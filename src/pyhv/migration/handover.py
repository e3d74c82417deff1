"""The machine's half of the disk handover (shared storage): `release` and `take` over
every virtio-blk of a machine. The design and the invariants are pyhv.disk.handover's
(the block layer's half: the `Released` stand-in and `peek`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyhv.disk.handover import Released
from pyhv.errors import ImageError

if TYPE_CHECKING:
    from pyhv.devices.virtio.blk import VirtioBlk
    from pyhv.machine import Machine


def blk_devices(machine: Machine) -> list[VirtioBlk]:
    from pyhv.devices.virtio.blk import VirtioBlk
    from pyhv.devices.virtio.transport import VirtioPciFunction
    return [fn.device for fn in machine.pci_functions
            if isinstance(fn, VirtioPciFunction) and isinstance(fn.device, VirtioBlk)]


def release(machine: Machine) -> None:
    """Flush and close every disk of a paused, quiesced machine (the source's side)."""
    for dev in blk_devices(machine):
        disk = dev.disk
        if isinstance(disk, Released):
            continue
        path = str(getattr(disk, "path", dev.name))
        stand_in = Released(path, disk.size, disk.read_only)
        try:
            if not disk.read_only:
                disk.flush()
        finally:
            disk.close()
            dev.disk = stand_in


def take(machine: Machine) -> None:
    """Open every released disk again, locked (all or none); ImageError if one fails."""
    opened: list[tuple[VirtioBlk, Released]] = []
    try:
        for dev in blk_devices(machine):
            stand_in = dev.disk
            if not isinstance(stand_in, Released):
                continue
            if dev.reopen is None:
                raise ImageError(f"{dev.name}: pyhv does not know how to open its image")
            img = dev.reopen()
            opened.append((dev, stand_in))
            dev.disk = img
            if img.size != stand_in.size:
                raise ImageError(f"{dev.name}: {stand_in.path} is now {img.size} bytes, "
                                 f"the guest knows {stand_in.size}")
    except BaseException:
        for dev, stand_in in opened:
            dev.disk.close()
            dev.disk = stand_in
        raise
