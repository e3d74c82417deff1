"""Bounded positional I/O on the image file: locking, flush barriers, test hooks.

Design: every byte pyhv reads from or writes to a qcow2 file goes through `ImageFile`.
`pread` refuses ranges outside the file (a table entry pointing past the end is an
`ImageError`, never a short read silently padded).

Opening takes QEMU's permission locks (lock.py) for the file's access: a file another
process uses in a conflicting way is refused before anything is read or written, and
closing the descriptor releases the locks.

`barrier()` is the write-ordering primitive of the crash-safety rules (image.py): it
makes every write issued so far durable (fdatasync) before any later write is issued,
and costs nothing when nothing was written since the last one. `unsafe` files (QEMU's
cache=unsafe: a new output whose loss on a host crash is acceptable) skip the syncs.

Test hooks (class-wide, set by tests only): `fault_hook(offset, length)` runs before
each pwrite (tests raise from it to simulate a crash between any two writes: the write
that raises never reaches the file); `observer(file, op, offset, data)` sees every
write ("write", offset, bytes), sync ("flush", 0, b"") and truncate ("truncate", size,
b"") in issue order: the crash-consistency tests record and replay that log;
`skip_sync` lets a test that only records the order skip the fdatasync system calls.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from pyhv.disk.lock import Access, ImageLock, access_for, lock_fd
from pyhv.errors import ImageError

FaultHook = Callable[[int, int], None]
Observer = Callable[["ImageFile", str, int, bytes], None]


class InjectedFault(Exception):
    """Raised by a test's fault hook to simulate a crash before a write."""


class ImageFile:
    """One open, locked file descriptor with bounds-checked pread/pwrite."""

    fault_hook: FaultHook | None = None  # class-wide: set by tests only
    observer: Observer | None = None  # class-wide: set by tests only
    skip_sync = False  # class-wide: set by tests only

    def __init__(self, path: str, read_only: bool, access: Access | None = None) -> None:
        self.path = path
        self.read_only = read_only
        self.unsafe = False
        self.dirty = False  # written since the last sync
        try:
            self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        except OSError as e:
            raise ImageError(f"cannot open {path}: {e.strerror}") from e
        try:
            self.lock: ImageLock = lock_fd(
                self.fd, path, access or access_for("qcow2", read_only=read_only))
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise
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
        obs = ImageFile.observer
        if obs is not None:
            obs(self, "write", offset, bytes(data))
        view = memoryview(data)
        pos = offset
        self.dirty = True
        while view:
            n = os.pwrite(self.fd, view, pos)
            view, pos = view[n:], pos + n
        self.size = max(self.size, offset + len(data))

    def truncate(self, size: int) -> None:
        obs = ImageFile.observer
        if obs is not None:
            obs(self, "truncate", size, b"")
        self.dirty = True
        os.ftruncate(self.fd, size)
        self.size = size

    def sync(self) -> None:
        """fdatasync (unless read-only or unsafe)."""
        if self.read_only:
            return
        self.dirty = False
        if self.unsafe:
            return
        obs = ImageFile.observer
        if obs is not None:
            obs(self, "flush", 0, b"")
        if not ImageFile.skip_sync:
            os.fdatasync(self.fd)

    def barrier(self) -> None:
        """Everything written so far is durable before anything written after."""
        if self.dirty:
            self.sync()

    def close(self) -> None:
        if self.fd >= 0:
            self.lock.release()
            os.close(self.fd)
            self.fd = -1
