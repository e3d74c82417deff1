"""One contiguous block of guest RAM backed by an anonymous host mapping, or by a file
mapped privately (copy-on-write: a restored snapshot's RAM).

Design: a region owns one `mmap` and knows the guest-physical address it is mapped at.
With `backing=(fd, offset)` the mapping is MAP_PRIVATE of the file at that offset: pages
are read from the file when first touched and copied when first written, so mapping a
snapshot's RAM costs nothing up front and the file is never written.
Its host virtual address (`host_addr`) is what /dev/kvm or a software CPU maps; the
Python side reads and writes it through a memoryview. A region never resizes, so views
and host addresses handed out stay valid until `close()`.

Invariant: every offset accepted is within [0, size); callers outside this package go
through `GuestMemory`, which does the bounds checks.
"""

from __future__ import annotations

import ctypes
import mmap


class MemoryRegion:
    """Guest RAM at [gpa, gpa + size), backed by a private anonymous mapping."""

    def __init__(self, gpa: int, size: int, backing: tuple[int, int] | None = None) -> None:
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(f"region size {size:#x} is not a positive multiple of the page size")
        if gpa % mmap.PAGESIZE:
            raise ValueError(f"region address {gpa:#x} is not page aligned")
        self.gpa = gpa
        self.size = size
        self.end = gpa + size
        if backing is None:
            self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
        else:
            fd, offset = backing
            if offset % mmap.PAGESIZE:
                raise ValueError(f"file offset {offset:#x} is not page aligned")
            # the caller checked that the file covers [offset, offset + size): a page
            # beyond its end would be SIGBUS, not a Python error
            self._map = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self.view = memoryview(self._map)
        self._anchor = ctypes.c_char.from_buffer(self._map)
        self.host_addr: int = ctypes.addressof(self._anchor)

    def __repr__(self) -> str:
        return f"MemoryRegion(gpa={self.gpa:#x}, size={self.size:#x})"

    def advise(self, advice: int, offset: int = 0, length: int | None = None) -> None:
        """madvise(2) on [offset, offset + length) of the mapping (whole pages), e.g.
        MADV_MERGEABLE (KSM may merge it) or MADV_DONTNEED (drop the pages: they read
        as zeros afterwards and no longer count in the process's RSS)."""
        n = self.size - offset if length is None else length
        if offset < 0 or n < 0 or offset + n > self.size or offset % mmap.PAGESIZE:
            raise ValueError(f"advise [{offset:#x}, +{n:#x}) outside the region or unaligned")
        self._map.madvise(advice, offset, n)

    def close(self) -> None:
        """Unmap the region; views obtained earlier must no longer be used."""
        del self._anchor
        self.view.release()
        self._map.close()
