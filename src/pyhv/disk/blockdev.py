"""The block-device protocol every disk image implements (raw, qcow2).

Design: a `BlockDevice` is a flat array of `size` bytes. `read(offset, length)` and
`write(offset, data)` work at any byte offset and length inside the device (no sector
alignment is required of the caller); a range outside the device is an `ImageError`, never
a short read or a host access outside the file. `flush()` makes completed writes durable
(fsync). `discard()` is advisory: afterwards each byte of the range reads either as
before or as zero (qcow2 deallocates the whole clusters inside the range; a v2 image
with a backing file cannot express zeros and keeps its data), never as anything else.

Thread safety: each image object holds one lock (`threading.RLock`) taken by every public
method, so one image may be shared by several threads (virtio-blk queues); operations on
one image are serialized. Two image objects on the same file are not coordinated: open a
file read-write at most once.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pyhv.errors import ImageError


@runtime_checkable
class BlockDevice(Protocol):
    """What virtio-blk (and `pyhv img`) needs of a disk image."""

    @property
    def size(self) -> int:
        """Virtual size in bytes."""
        ...

    @property
    def read_only(self) -> bool: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def close(self) -> None: ...


def check_range(size: int, offset: int, length: int) -> None:
    """Refuse an access that is negative or reaches past the device's end."""
    if offset < 0 or length < 0 or offset + length > size:
        raise ImageError(f"access at {offset} (+{length}) outside the {size}-byte disk")
