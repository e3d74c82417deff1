"""A listening UNIX socket only its owner may use: the VM's control API (pyhv.vmapi)
and its console socket (pyhv.consolesock).

`check_length(path, what)` refuses a path the kernel cannot bind (sun_path holds 107
bytes and a NUL). `bind(path, what, ...)` binds under umask 0177, so the socket file is
never reachable by others, not even between bind and chmod, then sets mode 0600 and
starts listening. Invariants: the umask is restored whatever happens; on any OSError the
caller's socket is closed and one ConfigError names the socket ("cannot create the
WHAT PATH: reason").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from pyhv.errors import ConfigError

MAX_PATH = 107


def check_length(path: Path, what: str) -> None:
    if len(os.fsencode(path)) > MAX_PATH:
        raise ConfigError(f"the {what} path {path} is too long for a UNIX socket "
                          f"(at most {MAX_PATH} bytes)")


def bind(path: Path, what: str, do_bind: Callable[[], None],
         listen: Callable[[], None], close: Callable[[], None]) -> None:
    """`do_bind()` (binding the caller's socket to `path`), chmod 0600, `listen()`;
    `close()` and ConfigError on failure."""
    old = os.umask(0o177)
    try:
        try:
            do_bind()
            os.chmod(path, 0o600)
            listen()
        except OSError as e:
            close()
            raise ConfigError(f"cannot create the {what} {path}: "
                              f"{e.strerror or e}") from None
    finally:
        os.umask(old)
