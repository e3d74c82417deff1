"""An exclusive lock file that names its holder: the VM name claims (pyhv.rundir) and
the host daemon's lock (pyhv.hostd.statedir).

`take(path)` opens `path` (created mode 0600), takes an exclusive non-blocking `flock`
on it and writes this process's pid into it; the lock lasts as long as the returned fd
is open (the kernel drops it when the holder dies, however it dies). Invariants: the
pid is written only once the lock is ours; when another process holds it, the fd is
closed and `LockHeld` carries the pid read from the file ("" if none), the file
untouched.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class LockHeld(Exception):
    """Another process holds the lock; `pid` is what it wrote (may be "")."""

    def __init__(self, pid: str) -> None:
        super().__init__(pid)
        self.pid = pid

    @property
    def by(self) -> str:
        """" (pid N)" for a message, or "" when the holder's pid is unknown."""
        return f" (pid {self.pid})" if self.pid else ""


def take(path: Path, flags: int = 0) -> int:
    """Lock `path` for this process (extra open `flags`, e.g. O_NOFOLLOW); its fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise LockHeld(pid) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
