"""`pyhv host serve`'s serving: the inventory opened, the VMs adopted, the REST API on a
UNIX socket and (optionally) TCP through uvicorn, until SIGTERM/SIGINT.

Order: take the state directory's daemon lock (one daemon per directory), open the
inventory, adopt the VMs that still run, bind the sockets (the UNIX one 0600, made under
a 0177 umask so it is never briefly open), write DIR/daemon.json (pid, socket, the TCP
address actually bound: `--listen 127.0.0.1:0` picks a free port), serve. On the way out
the monitor stops and daemon.json and the socket go; the VMs keep running (they are in
their own sessions) and the next daemon adopts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
from pathlib import Path

from pyhv.errors import ConfigError
from pyhv.hostd.app import build_app
from pyhv.hostd.inventory import Inventory
from pyhv.hostd.manager import Manager
from pyhv.hostd.statedir import StateDir

BACKLOG = 128


def parse_listen(text: str) -> tuple[str, int] | None:
    if text == "none":
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--listen {text!r}: expected HOST:PORT (or none)")
    return host.strip("[]") or "127.0.0.1", int(port)


def bind_unix(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()                       # ours: the daemon lock is held
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        s.bind(str(path))
    except OSError as e:
        s.close()
        raise ConfigError(f"cannot create the API socket {path}: {e.strerror or e}"
                          ) from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    s.listen(BACKLOG)                        # clients queue until uvicorn accepts
    return s


def bind_tcp(addr: tuple[str, int]) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(addr)
    except OSError as e:
        s.close()
        raise ConfigError(f"--listen {addr[0]}:{addr[1]}: {e.strerror or e}") from None
    s.listen(BACKLOG)
    return s


def serve(state: StateDir, listen: tuple[str, int] | None, socket_path: Path | None,
          memory_capacity: int | None) -> int:
    import uvicorn

    os.umask(0o077)                          # logs, inventory, token: the user's only
    state.create()
    state.lock()                             # held until the process ends
    token = state.token(create=True)
    inventory = Inventory(state.db)
    manager = Manager(state, inventory, memory_capacity)
    sock_path = socket_path or state.socket
    sockets = [bind_unix(sock_path)]
    if listen is not None:
        sockets.append(bind_tcp(listen))
    manager.open()
    try:
        tcp = sockets[1].getsockname() if len(sockets) > 1 else None
        info = {"pid": os.getpid(), "socket": str(sock_path),
                "listen": f"{tcp[0]}:{tcp[1]}" if tcp else None}
        tmp = state.info_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info) + "\n")
        tmp.replace(state.info_file)
        app = build_app(manager, token)
        config = uvicorn.Config(app, log_level="warning", access_log=False,
                                lifespan="off", ws="websockets-sansio",
                                timeout_graceful_shutdown=2)
        server = uvicorn.Server(config)
        # uvicorn stops on SIGTERM/SIGINT, then raises the signal again under the
        # handler that was there before; a no-op one lets the cleanup below run
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda _n, _f: None)
        asyncio.run(server.serve(sockets=sockets))
    finally:
        manager.close()
        inventory.close()
        for s in sockets:
            s.close()
        for p in (state.info_file, sock_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return 0
