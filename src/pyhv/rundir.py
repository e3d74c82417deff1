"""The per-user run directory: where named VMs keep their control sockets.

Layout: `<run dir>/<NAME>.sock` (the VM's control API, mode 0600) and `<NAME>.lock` (a
file the VM process holds an exclusive `flock` on for its whole life, with its pid in
it). The run directory is, in order: `$PYHV_RUN_DIR`; `$XDG_RUNTIME_DIR/pyhv`;
`/run/user/<uid>/pyhv` when `/run/user/<uid>` exists; else `/tmp/pyhv-<uid>`. It is
created with mode 0700; one that exists must be a directory (not a symlink) owned by
this user and not writable by others, else it is refused (another user could place
sockets there).

Invariants: a name is a VM's only if the VM holds its lock, so "in use" is decided by
the kernel, never by guessing from a file's presence: `claim()` refuses a name whose
lock is held (naming the pid that holds it) and otherwise removes a stale socket left by
a VM that died; a lock is released by the kernel when its holder dies, however it dies.
Names are short and safe as file names (letters, digits, `.`, `_`, `-`; no leading dot).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from pyhv import pidlock
from pyhv.errors import ConfigError

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
SOCK_SUFFIX = ".sock"
LOCK_SUFFIX = ".lock"


def run_dir(create: bool = True) -> Path:
    """The run directory (created, private, when `create`)."""
    uid = os.getuid()
    if env := os.environ.get("PYHV_RUN_DIR"):
        d = Path(env)
    elif xdg := os.environ.get("XDG_RUNTIME_DIR"):
        d = Path(xdg) / "pyhv"
    elif Path(f"/run/user/{uid}").is_dir():
        d = Path(f"/run/user/{uid}") / "pyhv"
    else:
        d = Path(f"/tmp/pyhv-{uid}")
    if create:
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700, parents=True)
    if create or d.exists():
        _check_private(d)
    return d


def _check_private(d: Path) -> None:
    st = d.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"the run directory {d} is not a directory")
    if st.st_uid != os.getuid():
        raise ConfigError(f"the run directory {d} belongs to another user (uid "
                          f"{st.st_uid})")
    if st.st_mode & 0o022:
        raise ConfigError(f"the run directory {d} is writable by others (mode "
                          f"{stat.S_IMODE(st.st_mode):o}); make it 0700")


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"--name {name!r}: a VM name is 1-64 letters, digits, '.', '_' "
                          "or '-', not starting with '.' or '-'")
    return name


@dataclass
class Claim:
    """A name this process holds: keep it until the VM ends, then `release()`."""

    name: str
    sock: Path
    lock: Path
    fd: int

    def release(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.unlink()
        with contextlib.suppress(OSError):
            self.lock.unlink()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def claim(name: str, d: Path | None = None) -> Claim:
    """Take `name` for this process: refuse it when a live VM holds it, clean up what a
    dead one left."""
    check_name(name)
    d = d or run_dir()
    lock = d / (name + LOCK_SUFFIX)
    sock = d / (name + SOCK_SUFFIX)
    try:
        fd = pidlock.take(lock, os.O_NOFOLLOW)
    except pidlock.LockHeld as e:
        raise ConfigError(f"a VM named {name!r} is already running{e.by}; choose another "
                          "--name") from None
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()                     # a stale socket: its VM died without cleaning up
    return Claim(name, sock, lock, fd)


def holder(lock: Path) -> int | None:
    """The pid of the live VM holding `lock`, or None when no live process holds it."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def live_names(d: Path | None = None) -> list[str]:
    """Names of the VMs whose lock is held, sorted (a stale entry is not listed)."""
    d = d or run_dir(create=False)
    if not d.is_dir():
        return []
    return sorted(p.name[:-len(LOCK_SUFFIX)] for p in d.glob("*" + LOCK_SUFFIX)
                  if holder(p) is not None)


def socket_for(vm: str) -> Path:
    """`pyhv suspend VM` & co: VM is a socket path (has a '/' or ends in .sock) or a
    name in the run directory. Refuses a VM that does not exist or has died."""
    if "/" in vm or vm.endswith(SOCK_SUFFIX):
        p = Path(vm)
        if not p.exists():
            raise ConfigError(f"no VM control socket at {p}")
        return p
    check_name(vm)
    d = run_dir(create=False)
    sock, lock = d / (vm + SOCK_SUFFIX), d / (vm + LOCK_SUFFIX)
    if holder(lock) is None:
        if sock.exists() or lock.exists():
            raise ConfigError(f"the VM {vm!r} has died (its socket in {d} is stale)")
        raise ConfigError(f"no VM named {vm!r} is running (run directory {d}; "
                          "`pyhv list` shows the running ones)")
    return sock
