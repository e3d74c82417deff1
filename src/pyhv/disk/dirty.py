"""Dirty tracking in the block layer: which chunks of a disk were written since when.

Design: `Tracked(inner)` is a BlockDevice that forwards everything to `inner` and, for
each write or discard, records the CHUNK-sized pieces it touched in a set; `take()`
returns them (sorted) and starts an empty set. Live migration with --copy-storage
(pyhv.migration.storage) installs it on each virtio-blk disk while it copies the disk,
so what the guest writes meanwhile is sent again, and removes it afterwards.

Invariants: a chunk is marked before the write reaches `inner` returns, so a reader that
copies a chunk and then takes the set never misses a write that followed its read; all
calls (writes, `take`) run on the device's one I/O thread (VirtioBlk.call), so the set
needs no lock. Attributes other than the BlockDevice's (path, snapshots...) are the
inner image's.
"""

from __future__ import annotations

from typing import Any

from pyhv.disk.blockdev import BlockDevice

CHUNK = 64 << 10


class Tracked:
    def __init__(self, inner: BlockDevice) -> None:
        self.inner = inner
        self._dirty: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def read_only(self) -> bool:
        return self.inner.read_only

    def _mark(self, offset: int, length: int) -> None:
        if length > 0:
            self._dirty.update(range(offset // CHUNK, (offset + length - 1) // CHUNK + 1))

    def read(self, offset: int, length: int) -> bytes:
        return self.inner.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self._mark(offset, len(data))
        self.inner.write(offset, data)

    def discard(self, offset: int, length: int) -> None:
        self._mark(offset, length)
        self.inner.discard(offset, length)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()

    def take(self) -> list[int]:
        out = sorted(self._dirty)
        self._dirty = set()
        return out
