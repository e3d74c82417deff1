"""Raw disk images: the file is the disk, byte for byte.

Design: a thin `BlockDevice` over `os.pread`/`os.pwrite` on one file descriptor. The size
is the file's size; a sparse file reads as zeros where it has holes. Discard writes
nothing (it is advisory); `resize` truncates or extends the file (new space reads as
zeros). One thread lock per image (see blockdev). Opening takes QEMU's permission locks
on the file (lock.py; `access` overrides the default for raw files, e.g. a guest's disk)
and closing releases them; `create` locks the file before it truncates it.
"""

from __future__ import annotations

import os
import threading

from pyhv.disk.blockdev import check_range
from pyhv.disk.lock import Access, access_for, create_locked, open_locked
from pyhv.errors import ImageError


class RawImage:
    """A raw image file as a block device."""

    format_name = "raw"

    def __init__(self, path: str, *, read_only: bool = False, force_share: bool = False,
                 access: Access | None = None) -> None:
        self.path = path
        self._read_only = read_only
        access = access or access_for("raw", read_only=read_only, force_share=force_share)
        try:
            self._fd, self._flock = open_locked(path, access,
                                                os.O_RDONLY if read_only else os.O_RDWR)
        except OSError as e:
            raise ImageError(f"cannot open {path}: {e.strerror}") from e
        self._size = os.fstat(self._fd).st_size
        self._lock = threading.RLock()

    @staticmethod
    def create(path: str, size: int) -> None:
        """Create (or truncate) a sparse raw image of `size` bytes."""
        fd = create_locked(path)
        try:
            os.ftruncate(fd, size)
        except (OSError, OverflowError) as e:
            why = e.strerror if isinstance(e, OSError) else "size too large"
            raise ImageError(f"cannot create {path}: {why}") from e
        finally:
            os.close(fd)

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            check_range(self._size, offset, length)
            data = os.pread(self._fd, length, offset)
            if len(data) < length:  # the file shrank under us: holes read as zeros
                data += bytes(length - len(data))
            return data

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            if self._read_only:
                raise ImageError(f"{self.path} is open read-only")
            check_range(self._size, offset, len(data))
            view = memoryview(data)
            while view:
                n = os.pwrite(self._fd, view, offset)
                view, offset = view[n:], offset + n

    def flush(self) -> None:
        with self._lock:
            if not self._read_only:
                os.fsync(self._fd)

    def discard(self, offset: int, length: int) -> None:
        with self._lock:
            check_range(self._size, offset, length)

    def resize(self, size: int) -> None:
        with self._lock:
            if self._read_only:
                raise ImageError(f"{self.path} is open read-only")
            os.ftruncate(self._fd, size)
            self._size = size

    def is_allocated(self, offset: int, length: int) -> tuple[bool, int]:
        """Raw images are fully allocated: (True, length)."""
        return True, length

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                self._flock.release()
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> RawImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
