"""Block status through a backing chain: where data lives, found without reading it.

    top.qcow2   [data][ unallocated ][zero]
    base.raw    [....][data ][hole ][....]
    status      [data][data ][zero ][zero]      depth 0, 1, 1, 0

`status(dev, offset, length)` describes the run that starts at `offset` as QEMU's block
layer does (bdrv_block_status_above): flags with the meanings of BDRV_BLOCK_DATA, ZERO,
ALLOCATED and OFFSET_VALID, the run's length, the depth of the image that decides it, that
image, and the host offset in its file. A qcow2 cluster that is unallocated is decided by
the backing file; past the backing file's end, or with no backing file, it reads as zeros,
is not ALLOCATED, and is reported at the depth of the image that has it unallocated (as
`qemu-img map` reports it). Raw images report file-system holes (SEEK_HOLE) as ZERO.

Cost: one walk of allocation metadata per run (L1/L2 tables, lseek for raw), never a
data read, so callers that iterate runs (convert, compare, rebase, map) do work that grows
with the allocated data, not with the virtual size. The recursion follows the opened chain,
which `open_image` keeps acyclic and at most MAX_CHAIN_DEPTH deep.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pyhv.disk.blockdev import BlockDevice
from pyhv.disk.qcow2.image import Qcow2Image
from pyhv.disk.raw import RawImage

DATA = 1
ZERO = 2
OFFSET_VALID = 4
ALLOCATED = 16

_QCOW2 = {"data": DATA | ALLOCATED | OFFSET_VALID, "zero": ZERO | ALLOCATED,
          "compressed": DATA | ALLOCATED, "unallocated": 0}
_RAW = {"data": DATA | ALLOCATED | OFFSET_VALID, "zero": ZERO | ALLOCATED | OFFSET_VALID}


@dataclass(frozen=True)
class Status:
    flags: int
    length: int
    depth: int
    dev: BlockDevice
    host: int | None  # offset in dev's file (OFFSET_VALID)

    @property
    def data(self) -> bool:
        return bool(self.flags & DATA)

    @property
    def zero(self) -> bool:
        return bool(self.flags & ZERO)

    @property
    def allocated(self) -> bool:
        return bool(self.flags & ALLOCATED)


def own_status(dev: BlockDevice, offset: int, length: int) -> tuple[int, int, int | None]:
    """(flags, length, host offset) of one image alone; flags 0: unallocated here."""
    if isinstance(dev, Qcow2Image):
        kind, n, host = dev.block_status(offset, length)
        return _QCOW2[kind], n, host
    if isinstance(dev, RawImage):
        kind, n, host = dev.block_status(offset, length)
        return _RAW[kind], n, host
    return DATA | ALLOCATED, length, None  # any other device: all data


def status(dev: BlockDevice, offset: int, length: int, depth: int = 0) -> Status:
    """The run at `offset` (at most `length` bytes) as the whole chain below dev sees it."""
    flags, n, host = own_status(dev, offset, length)
    if flags:
        return Status(flags, n, depth, dev, host if flags & OFFSET_VALID else None)
    back = dev.backing if isinstance(dev, Qcow2Image) else None
    if back is None:
        return Status(ZERO, n, depth, dev, None)
    if offset >= back.size:
        return Status(ZERO, n, depth, dev, None)  # as qemu-img map: this layer says zero
    return status(back, offset, min(n, back.size - offset), depth + 1)


def runs(dev: BlockDevice, offset: int = 0,
         end: int | None = None) -> Iterator[tuple[int, Status]]:
    """(start, status) of consecutive runs covering [offset, end) (default: the disk)."""
    stop = dev.size if end is None else end
    pos = offset
    while pos < stop:
        s = status(dev, pos, stop - pos)
        yield pos, s
        pos += s.length
