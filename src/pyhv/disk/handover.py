"""Handing a guest's disk over from one pyhv process to another (live migration): the
block layer's half (the stand-in, `peek`); the machine's half, `release` and `take`, is
pyhv.migration.handover.

QEMU's semantics for shared storage (the same image path on both hosts): the destination
opens the image only when it takes the VM over, and the source writes nothing after the
switch-over. pyhv holds its images with QEMU-compatible locks (pyhv.disk.lock), so both
sides cannot hold one image read-write at once; the handover is explicit:

- the source, paused, with its disks quiesced (vmstate.capture: in-flight requests
  finished), calls `release(machine)` (pyhv.migration.handover): each virtio-blk's
  image is flushed and closed (its lock released) and replaced by a `Released`
  stand-in of the same path and size, on which any I/O is an ImageError (the guest is
  paused: nothing reaches it);
- the destination builds its virtio-blk devices on `Released` stand-ins (`peek`: the
  size read with a shared, read-only open that takes no write lock, QEMU's `-U`), and
  calls `take(machine)` once the source's final state has arrived: each image is opened
  read-write, locked, as `pyhv run --disk` opens it;
- if the migration fails before the destination runs, the source calls `take(machine)`
  and resumes. If that fails (the destination holds the image: it took over and its
  "running" answer was lost), the source must not run the guest again: the caller stops.

Invariants: at every instant at most one process holds each image read-write; a
`Released` disk never touches the image file; `take` opens the disks in slot order and,
if one fails, closes those it opened (all-or-nothing) before raising.
"""

from __future__ import annotations

from pyhv.errors import ImageError


class Released:
    """The stand-in for an image another process holds: size and path, no I/O."""

    def __init__(self, path: str, size: int, read_only: bool) -> None:
        self.path = path
        self._size = size
        self._read_only = read_only

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    def _gone(self) -> ImageError:
        return ImageError(f"{self.path}: the image was handed over (live migration); "
                          "this process does not hold it")

    def read(self, offset: int, length: int) -> bytes:
        raise self._gone()

    def write(self, offset: int, data: bytes) -> None:
        raise self._gone()

    def discard(self, offset: int, length: int) -> None:
        raise self._gone()

    def flush(self) -> None:
        """Nothing is held, nothing is cached: no-op (close paths flush)."""

    def close(self) -> None:
        """No-op: the image is not open here."""


def peek(path: str, fmt: str | None, read_only: bool) -> Released:
    """A stand-in for `path`, sized without taking a write lock (the source holds it)."""
    from pyhv.disk.open import open_image
    img = open_image(path, fmt, read_only=True, force_share=True)
    try:
        return Released(path, img.size, read_only)
    finally:
        img.close()

