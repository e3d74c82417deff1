"""Image locking that QEMU understands: OFD byte-range locks on permission bytes.

QEMU's file-posix driver (block/file-posix.c) describes what an open image file is used
for as permissions (include/block/block-common.h, BLK_PERM_*):

    bit 0 consistent read   bit 1 write   bit 2 write unchanged   bit 3 resize

(bit 4, the removed "graph mod", is neither taken nor tested: QEMU >= 6.2 ignores it).
On its own open file description it holds a shared lock (F_RDLCK, taken with
F_OFD_SETLK, Linux >= 3.15) on

    byte 100 + bit   for each permission it takes           "I use this"
    byte 200 + bit   for each permission it does not share  "nobody else may"

An opener takes its bytes first, then tests, with F_OFD_GETLK for a write lock (which
reports a lock of any *other* open file description), byte 200 + bit for each permission
it takes and byte 100 + bit for each one it does not share. A lock found there is a
conflict: the opener drops its bytes and fails with QEMU's message

    Failed to get "write" lock
    Is another process using the image [disk.qcow2]?

("Failed to get shared "write" lock" when it is the other side that uses what this one
refuses to share). Taking before testing means two racing openers can both fail, never
both succeed.

What each kind of open takes, as QEMU 7.2's qemu-img, qemu-io and qemu-system-x86_64
take it (measured with strace and /proc/locks; `access_for` is this table):

    open                              takes (1xx)              does not share (2xx)
    qcow2, read-only                  consistent read          write, resize
    qcow2, read-write                 consistent read, write,  write, resize
                                      resize
    raw, read-only                    consistent read          -
    raw, read-write                   consistent read, write   -
    raw as a guest's disk (rw / ro)   as raw                   write
    force share (-U, read-only only)  consistent read          - (and tests no 1xx byte)
    creating (truncating) a file      write, resize            resize

(qemu-img resize of a raw file also takes "resize"; pyhv's raw read-write open does not,
as qemu-io's: nothing QEMU opens refuses to share resize on a raw file.)

Locks belong to the open file description, not the process: closing the descriptor (or
the process dying) releases them, and two opens of one file in one process conflict just
as two processes do. `ImageLock.release` unlocks explicitly (every byte it took), for
owners that keep the descriptor open. A kernel without OFD locks (EINVAL) means no
locking, as QEMU's locking=auto; a file system that refuses locks (ENOLCK...) is an
ImageError naming the byte, as QEMU reports it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from dataclasses import dataclass

from pyhv.errors import ImageError

CONSISTENT_READ = 0x1
WRITE = 0x2
WRITE_UNCHANGED = 0x4
RESIZE = 0x8
ALL = 0xF
PERM_NAMES = {CONSISTENT_READ: "consistent read", WRITE: "write",
              WRITE_UNCHANGED: "write unchanged", RESIZE: "resize"}
PERM_BASE = 100
SHARED_BASE = 200

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
# struct flock (x86-64 / aarch64 Linux): short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (must be 0 for OFD locks), padded to 32 bytes
_FLOCK = struct.Struct("=hh4xqqi4x")


class LockError(ImageError):
    """Another process (or open) holds a conflicting lock on the image."""


@dataclass(frozen=True)
class Access:
    """What an open takes (`perm`) and what it lets others take (`shared`)."""

    perm: int
    shared: int

    def __str__(self) -> str:
        return f"takes {perm_names(self.perm) or 'nothing'}, shares " \
               f"{perm_names(self.shared) or 'nothing'}"


def perm_names(perm: int) -> str:
    """QEMU's bdrv_perm_names: "consistent read, write"."""
    return ", ".join(n for bit, n in PERM_NAMES.items() if perm & bit)


# the creator of a file (qemu-img create / convert's output) before it truncates it
CREATE_ACCESS = Access(WRITE | RESIZE, ALL & ~RESIZE)


def access_for(fmt: str, *, read_only: bool, force_share: bool = False,
               guest: bool = False) -> Access:
    """QEMU's permissions for an image of format `fmt` (see the table above).

    `guest`: the image is a guest's disk (QEMU's block devices do not share write
    unless share-rw=on); qemu-img and qemu-io share it on raw files."""
    if force_share:
        if not read_only:
            raise ImageError("force-share=on can only be used with read-only images")
        return Access(CONSISTENT_READ, ALL)
    if fmt == "qcow2":  # its metadata may not change under it: write, resize unshared
        perm = CONSISTENT_READ if read_only else CONSISTENT_READ | WRITE | RESIZE
        return Access(perm, CONSISTENT_READ | WRITE_UNCHANGED)
    perm = CONSISTENT_READ if read_only else CONSISTENT_READ | WRITE
    return Access(perm, ALL & ~WRITE if guest else ALL)


def _fcntl(fd: int, cmd: int, ltype: int, byte: int) -> int:
    """One F_OFD_* call on `byte`; returns the l_type the kernel reports back."""
    arg = _FLOCK.pack(ltype, os.SEEK_SET, byte, 1, 0)
    out = fcntl.fcntl(fd, cmd, arg)
    return int(_FLOCK.unpack(out)[0])


class ImageLock:
    """The permission locks one open file description holds on an image."""

    def __init__(self, fd: int, path: str, access: Access) -> None:
        self.fd = fd
        self.path = path
        self.access = access
        self.held: list[int] = []  # bytes this description has locked
        self.enabled = True

    def acquire(self) -> None:
        """Take the bytes, then test for conflicts; on any failure hold nothing."""
        try:
            self._take()
            self._test()
        except BaseException:
            self.release()
            raise

    def _bytes(self) -> list[int]:
        a = self.access
        return [PERM_BASE + i for i in range(4) if a.perm >> i & 1] + \
               [SHARED_BASE + i for i in range(4) if not a.shared >> i & 1]

    def _take(self) -> None:
        for byte in self._bytes():
            try:
                _fcntl(self.fd, F_OFD_SETLK, fcntl.F_RDLCK, byte)
            except OSError as e:
                if e.errno == errno.EINVAL and not self.held:
                    self.enabled = False  # no OFD locks in this kernel: QEMU's auto = off
                    return
                raise self._error(f"Failed to lock byte {byte}", e) from e
            self.held.append(byte)

    def _test(self) -> None:
        if not self.enabled:
            return
        a = self.access
        tests = [(SHARED_BASE + i, 1 << i, "") for i in range(4) if a.perm >> i & 1] + \
                [(PERM_BASE + i, 1 << i, "shared ") for i in range(4)
                 if not a.shared >> i & 1]
        for byte, bit, shared in tests:
            what = f'Failed to get {shared}"{PERM_NAMES[bit]}" lock'
            try:
                got = _fcntl(self.fd, F_OFD_GETLK, fcntl.F_WRLCK, byte)
            except OSError as e:
                raise self._error(what, e) from e
            if got != fcntl.F_UNLCK:
                raise LockError(f"Could not open '{self.path}': {what}\n"
                                f"Is another process using the image [{self.path}]?")

    def _error(self, what: str, e: OSError) -> ImageError:
        if e.errno in (errno.EAGAIN, errno.EACCES):  # held by someone else
            return LockError(f"Could not open '{self.path}': {what}\n"
                             f"Is another process using the image [{self.path}]?")
        return ImageError(f"Could not open '{self.path}': {what}: {e.strerror}")

    def release(self) -> None:
        """Unlock every byte taken (closing the descriptor would also release them)."""
        held, self.held = self.held, []
        for byte in held:
            # if this fails, the descriptor is going away: closing it drops the lock
            with contextlib.suppress(OSError):
                _fcntl(self.fd, F_OFD_SETLK, fcntl.F_UNLCK, byte)


def lock_fd(fd: int, path: str, access: Access) -> ImageLock:
    """Lock the open image file `fd` for `access` (LockError on a conflict)."""
    lock = ImageLock(fd, path, access)
    lock.acquire()
    return lock


def open_locked(path: str, access: Access, flags: int, mode: int = 0o644
                ) -> tuple[int, ImageLock]:
    """os.open + lock_fd; the descriptor is closed again if the lock fails."""
    fd = os.open(path, flags, mode)
    try:
        return fd, lock_fd(fd, path, access)
    except BaseException:
        os.close(fd)
        raise


def create_locked(path: str, size: int, *, reserve: bool = False) -> int:
    """Open `path` for (re)creation: create it if missing and lock it as its creator,
    as qemu-img does; then make sure the file system takes `size` bytes (the file is
    grown to `size` if it is shorter, so a size it refuses, EFBIG, fails here; with
    `reserve` the bytes are also allocated, posix_fallocate, so ENOSPC fails here), and
    only then truncate it to 0 bytes. Returns the descriptor: the caller writes the new
    image (at most `size` bytes) and closes it, which releases the lock.

    Nothing is lost before the create is known to fit: an image another process uses
    is refused, and a size or space the file system refuses leaves an existing file
    as it was (a file this call created is removed again)."""
    created = True
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            created = False  # (or a dangling symlink: its target is created, not ours)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ImageError(f"cannot create {path}: {e.strerror}") from e
    ident = os.fstat(fd)
    try:
        lock_fd(fd, path, CREATE_ACCESS)  # before a byte of it changes
        old = ident.st_size
        try:
            if reserve and size:
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    reserve = False  # the file system cannot reserve: the size at least
            if not (reserve and size) and old < size:
                os.ftruncate(fd, size)
        except BaseException:
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_size != old:
                    os.ftruncate(fd, old)  # back to its length: its content never changed
            raise
        os.ftruncate(fd, 0)
    except BaseException as e:
        os.close(fd)
        if created:
            _unlink_if(path, ident)
        if isinstance(e, OSError):
            raise ImageError(f"cannot create {path}: {e.strerror}") from e
        if isinstance(e, OverflowError):
            raise ImageError(f"cannot create {path}: size too large") from e
        raise
    return fd


def _unlink_if(path: str, st: os.stat_result) -> None:
    """Remove `path` if it is still the file `st` describes (one this call created)."""
    with contextlib.suppress(OSError):
        now = os.stat(path)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.unlink(path)
