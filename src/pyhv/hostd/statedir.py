"""The daemon's state directory: where its inventory, token, sockets and VM logs live.

Layout of DIR (created 0700; refused when it is not a private directory of this user):

    DIR/inventory.db      the SQLite inventory (pyhv.hostd.inventory)
    DIR/token             the API's bearer token, 0600, made on first start
    DIR/daemon.lock       flock'ed by the running daemon (one daemon per DIR)
    DIR/daemon.json       {"pid", "socket", "listen"} of the running daemon (for clients)
    DIR/api.sock          the REST API's UNIX socket (0600)
    DIR/vms/              the VMs' run directory (PYHV_RUN_DIR of their `pyhv run`):
        NAME.sock         the VM's control API          NAME.lock  its pyhv.rundir lock
        NAME.console      its serial console socket     NAME.log   console output
        NAME.err          pyhv's own messages (stderr) of its last run

The default DIR is $PYHV_STATE_DIR, else $XDG_STATE_HOME/pyhv, else ~/.local/state/pyhv.

Invariants: the token file is never readable by others (a token file with group or
other permission bits is refused, not used); a VM's paths fit a UNIX socket address
(checked when a VM is defined, so a name never fails later for its length).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from pyhv import pidlock
from pyhv.errors import ConfigError

TOKEN_BYTES = 32
SOCKET_MAX = 107


def default_dir() -> Path:
    if env := os.environ.get("PYHV_STATE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "pyhv"


def _private_dir(d: Path) -> Path:
    with contextlib.suppress(FileExistsError):
        d.mkdir(mode=0o700, parents=True)
    st = d.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"the state directory {d} is not a directory")
    if st.st_uid != os.getuid():
        raise ConfigError(f"the state directory {d} belongs to another user")
    if st.st_mode & 0o077:
        raise ConfigError(f"the state directory {d} is open to others (mode "
                          f"{stat.S_IMODE(st.st_mode):o}); make it 0700")
    return d


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path.absolute()

    @property
    def db(self) -> Path:
        return self.path / "inventory.db"

    @property
    def token_file(self) -> Path:
        return self.path / "token"

    @property
    def socket(self) -> Path:
        return self.path / "api.sock"

    @property
    def info_file(self) -> Path:
        return self.path / "daemon.json"

    @property
    def vms(self) -> Path:
        return self.path / "vms"

    def vm_path(self, name: str, suffix: str) -> Path:
        return self.vms / f"{name}.{suffix}"

    def create(self) -> None:
        _private_dir(self.path)
        _private_dir(self.vms)
        if len(os.fsencode(self.socket)) > SOCKET_MAX:
            raise ConfigError(f"the state directory {self.path} is too deep: its API "
                              f"socket would pass the {SOCKET_MAX}-byte limit of a "
                              "UNIX socket path")

    def check_vm_name(self, name: str) -> None:
        longest = self.vm_path(name, "console")
        if len(os.fsencode(longest)) > SOCKET_MAX:
            raise ConfigError(f"the VM name {name!r} is too long for this state "
                              f"directory: {longest} passes the {SOCKET_MAX}-byte limit "
                              "of a UNIX socket path")

    def lock(self) -> int:
        """Take the daemon lock (kept until the process ends); refuse a second daemon."""
        try:
            return pidlock.take(self.path / "daemon.lock")
        except pidlock.LockHeld as e:
            raise ConfigError(f"a pyhv host daemon already serves {self.path}{e.by}"
                              ) from None

    def token(self, create: bool = False) -> str:
        """The API token: read from the token file (made, 0600, when `create`)."""
        path = self.token_file
        if create and not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(TOKEN_BYTES) + "\n")
        return read_token(path)


def read_token(path: Path) -> str:
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise ConfigError(f"no token file {path} (the daemon makes it on its first "
                          "start; `pyhv host serve`)") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"the token file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(f"the token file {path} is readable by others (mode "
                          f"{stat.S_IMODE(st.st_mode):o}); it must be 0600")
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read the token file {path}: {e.strerror or e}") from None
    if len(token) < 16:
        raise ConfigError(f"the token file {path} holds no usable token")
    return token
