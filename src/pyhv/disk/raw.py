"""Raw disk images: the file is the disk, byte for byte.

Design: a thin `BlockDevice` over `os.pread`/`os.pwrite` on one file descriptor. The size
is the file's size rounded up to whole 512-byte sectors, as QEMU sees a raw file (the
bytes past the end of the file read as zeros); a sparse file reads as zeros where it has
holes, and `block_status` reports holes and data from the file system (SEEK_HOLE /
SEEK_DATA), as QEMU's file driver does. Discard writes nothing (it is advisory); `resize`
truncates or extends the file (new space reads as zeros). One thread lock per image (see
blockdev). Opening takes QEMU's permission locks on the file (lock.py; `access`
overrides the default for raw files, e.g. a guest's disk) and closing releases them;
`create` locks the file and tries the new size before it drops the old content.
"""

from __future__ import annotations

import errno
import os
import stat
import threading

from pyhv.disk.blockdev import check_range
from pyhv.disk.lock import Access, access_for, create_locked, open_locked
from pyhv.errors import ImageError

MAX_SIZE = (1 << 63) - 1  # qemu-img's limit (an int64 byte count)


def _sectors(n: int) -> int:
    return -(-n // 512) * 512


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
        st = os.fstat(self._fd)
        if stat.S_ISDIR(st.st_mode):
            os.close(self._fd)
            raise ImageError(f"cannot open {path}: Is a directory")
        self._size = _sectors(st.st_size)
        self._lock = threading.RLock()

    @staticmethod
    def create(path: str, size: int) -> None:
        """Create (or empty) a sparse raw image of `size` bytes, rounded up to whole
        sectors as qemu-img does. The file is locked as its creator, then the size is
        tried on it before its old content is dropped (lock.create_locked), so an image
        in use, or a size the file system refuses, leaves an existing file as it was."""
        if not 0 <= _sectors(size) <= MAX_SIZE:
            raise ImageError(f"image size {size} out of range (0 to {MAX_SIZE})")
        size = _sectors(size)
        fd = create_locked(path, size)
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            raise ImageError(f"cannot create {path}: {e.strerror}") from e
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
        """Set the file's length to exactly `size` bytes (qemu-img does not round it)."""
        with self._lock:
            if self._read_only:
                raise ImageError(f"{self.path} is open read-only")
            if not 0 <= size <= MAX_SIZE:
                raise ImageError(f"image size {size} out of range (0 to {MAX_SIZE})")
            try:
                os.ftruncate(self._fd, size)
            except OSError as e:
                raise ImageError(f"cannot resize {self.path} to {size} bytes: "
                                 f"{e.strerror}") from e
            self._size = _sectors(size)

    def block_status(self, offset: int, length: int) -> tuple[str, int, int | None]:
        """("data" | "zero", length, host offset) of the run at `offset`: file-system
        holes and the rounded-up tail past the end of the file read as zeros (a file
        system without SEEK_DATA reports everything as data)."""
        with self._lock:
            check_range(self._size, offset, length)
            end = offset + length
            try:
                data = os.lseek(self._fd, offset, os.SEEK_DATA)
                hole = os.lseek(self._fd, offset, os.SEEK_HOLE) if data == offset else end
            except OSError as e:
                if e.errno != errno.ENXIO:  # no SEEK_DATA here: all data
                    return "data", length, offset
                data = hole = end  # ENXIO: no data at or after offset
            if data > offset:
                return "zero", min(data, end) - offset, offset
            return "data", max(1, min(hole, end) - offset), offset

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
