"""Bounded positional I/O on the image file, with a fault-injection hook for tests.

Design: every byte pyhv reads from or writes to a qcow2 file goes through `ImageFile`.
`pread` refuses ranges outside the file (a table entry pointing past the end is an
`ImageError`, never a short read silently padded). `pwrite` first calls `fault_hook`
(tests install one that raises after N writes, simulating a crash between any two
metadata updates: the write that raises never reaches the file).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from pyhv.errors import ImageError

FaultHook = Callable[[int, int], None]


class InjectedFault(Exception):
    """Raised by a test's fault hook to simulate a crash before a write."""


class ImageFile:
    """One open file descriptor with bounds-checked pread/pwrite."""

    fault_hook: FaultHook | None = None  # class-wide: set by tests only

    def __init__(self, path: str, read_only: bool) -> None:
        self.path = path
        self.read_only = read_only
        try:
            self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        except OSError as e:
            raise ImageError(f"cannot open {path}: {e.strerror}") from e
        self.size = os.fstat(self.fd).st_size

    def pread(self, offset: int, length: int, what: str = "data") -> bytes:
        if offset < 0 or offset + length > self.size:
            raise ImageError(f"{what} at {offset:#x} (+{length}) lies outside the file "
                             f"({self.size} bytes)")
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise ImageError(f"short read of {what} at {offset:#x}")
        return data

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.read_only:
            raise ImageError(f"{self.path} is open read-only")
        hook = ImageFile.fault_hook
        if hook is not None:
            hook(offset, len(data))
        view = memoryview(data)
        pos = offset
        while view:
            n = os.pwrite(self.fd, view, pos)
            view, pos = view[n:], pos + n
        self.size = max(self.size, offset + len(data))

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self.size = size

    def sync(self) -> None:
        if not self.read_only:
            os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
