"""--copy-storage: the VM's disks mirrored over the migration's own connection.

Design (as QEMU's drive-mirror to a pre-created target, `-incoming` on the other side):
the destination is started with its own `--disk` images, of the same virtual sizes (the
user creates them: `qemu-img create -f qcow2 dst.qcow2 SIZE`, or copies); the source
says `"storage": "copy"` and each disk's size in its header, and the destination opens
its images at once (locked read-write: the same image as the source's is refused by the
lock) and refuses sizes that differ.

The source (`Mirror`): `start()` installs block-layer dirty tracking (pyhv.disk.dirty)
on every virtio-blk disk; `bulk()` copies each disk whole while the guest runs, chunk by
chunk (CHUNK bytes, an all-zero chunk as a marker with no data); each RAM round is
followed by `dirty()`, which sends again the chunks written since they were last taken;
inside the switch-over pause, after the capture quiesced the disks, a last `dirty()`
sends the rest; `stop()` removes the tracking (success or not). Every read of the image
and every take of the dirty set runs on the disk's I/O thread (VirtioBlk.call), in order
with the guest's own requests: a chunk written after it was read is in the next set.

The DISK record: u16 disk index, u16 flags (bit 0: zero), u32 length, u64 offset, then
the data (none for a zero chunk). The destination (`write_record`) checks the index,
range and length, and writes the data; for a zero chunk it reads its own chunk and
writes zeros only where it is not zero already (a pre-created target may hold old data).

Invariants: the source only reads its disks (a failed migration leaves them as the guest
left them, tracking removed); the destination's disk equals the source's at the
switch-over: every chunk was sent once in bulk, and again after each write that
followed (the set is taken after the guest is paused and its requests finished).
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from pyhv.disk.dirty import CHUNK, Tracked
from pyhv.errors import PyhvError
from pyhv.migration.handover import blk_devices
from pyhv.migration.stream import MigrationError

if TYPE_CHECKING:
    from pyhv.devices.virtio.blk import VirtioBlk
    from pyhv.machine import Machine

HEAD = struct.Struct("<HHIQ")
F_ZERO = 1
ZERO = bytes(CHUNK)

Send = Callable[[bytes], None]       # sends one DISK record's payload


def sizes(machine: Machine) -> list[int]:
    return [dev.disk.size for dev in blk_devices(machine)]


class Mirror:
    def __init__(self, machine: Machine) -> None:
        self.devs: list[VirtioBlk] = blk_devices(machine)
        self.chunks = 0          # records sent
        self.bytes = 0           # data bytes sent (zero chunks carry none)
        self.again = 0           # chunks sent again (written after they were sent)

    def start(self) -> None:
        for dev in self.devs:
            def install(d: VirtioBlk = dev) -> None:
                if not isinstance(d.disk, Tracked):
                    d.disk = Tracked(d.disk)
            dev.call(install)

    def stop(self) -> None:
        for dev in self.devs:
            def remove(d: VirtioBlk = dev) -> None:
                if isinstance(d.disk, Tracked):
                    d.disk = d.disk.inner
            with contextlib.suppress(PyhvError):     # a closed device: nothing to remove
                dev.call(remove)

    def bulk(self, send: Send, check: Callable[[], None]) -> None:
        for i, dev in enumerate(self.devs):
            size = dev.disk.size
            for c in range((size + CHUNK - 1) // CHUNK):
                check()
                self._send(i, dev, c, send)

    def dirty(self, send: Send, check: Callable[[], None]) -> int:
        n = 0
        for i, dev in enumerate(self.devs):
            disk = dev.disk
            if not isinstance(disk, Tracked):
                raise MigrationError(f"{dev.name}: its dirty tracking is gone")
            for c in dev.call(disk.take):
                check()
                self._send(i, dev, c, send)
                n += 1
        self.again += n
        return n

    def _send(self, index: int, dev: VirtioBlk, c: int, send: Send) -> None:
        size = dev.disk.size
        off = c * CHUNK
        n = min(CHUNK, size - off)
        data = dev.call(lambda: dev.disk.read(off, n))
        if data.count(0) == n:
            send(HEAD.pack(index, F_ZERO, n, off))
        else:
            send(HEAD.pack(index, 0, n, off) + data)
            self.bytes += n
        self.chunks += 1


def check_target(machine: Machine, theirs: object) -> str | None:
    """None when this machine's disks can take the source's (sizes), else why not."""
    mine = sizes(machine)
    if theirs != mine:
        return (f"--copy-storage: the source's disks have {theirs!r} bytes, this "
                f"destination's {mine!r}: create images of the source's sizes")
    return None


def write_record(devs: list[VirtioBlk], payload: bytes) -> None:
    """Write one DISK record into this side's image (MigrationError if malformed)."""
    if len(payload) < HEAD.size:
        raise MigrationError("a DISK record shorter than its header")
    index, flags, n, off = HEAD.unpack_from(payload)
    data = payload[HEAD.size:]
    if index >= len(devs) or flags & ~F_ZERO or not 0 < n <= CHUNK or off % CHUNK:
        raise MigrationError(f"a malformed DISK record (disk {index}, flags {flags:#x}, "
                             f"{n} bytes at {off})")
    disk = devs[index].disk
    if off + n > disk.size:
        raise MigrationError(f"a DISK record past the end of disk {index}")
    if flags & F_ZERO:
        if data:
            raise MigrationError("a zero DISK record with data")
        if disk.read(off, n).count(0) != n:
            disk.write(off, ZERO[:n])
        return
    if len(data) != n:
        raise MigrationError(f"a DISK record of {len(data)} bytes, its header says {n}")
    disk.write(off, data)
