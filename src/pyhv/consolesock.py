"""`pyhv run --console-sock PATH`: the VM's serial console on a UNIX stream socket.

What the host daemon (pyhv.hostd) needs to reach the console of a VM it started in the
background: every client that connects receives the guest's console output from then
on, and what a client sends is the guest's console input (as if typed on the terminal).
The run's stdout gets the output too (the daemon sends it to the VM's log).

Design: a listening socket (mode 0600, as the control API's) served by an accept
thread; each client has a reader thread (its bytes go to `on_input`) and an
`OutputPump` (pyhv.outflow) writing the output to it, so a client that stops reading
never blocks the run loop: its output is dropped past the pump's limit, as stdout's is.
The run command sets `on_input` while a machine runs (the input gate's `feed` and a kick
of the vCPU) and clears it between machines (a guest reset): input sent then is dropped.

Invariants: `write()` never waits for I/O; `close()` stops accepting, closes every
client and removes the socket file; a client that disconnects is forgotten.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from pyhv import privatesock
from pyhv.errors import ConfigError
from pyhv.outflow import OutputPump

MAX_CLIENTS = 8


class _Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pump = OutputPump(sock.fileno())


class ConsoleSocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        privatesock.check_length(path, "console socket")
        if path.exists() or path.is_symlink():
            raise ConfigError(f"--console-sock {path}: the path exists")
        self.on_input: Callable[[bytes], None] | None = None
        self._clients: list[_Client] = []
        self._lock = threading.Lock()
        self._closed = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener = self._listener
        privatesock.bind(path, "console socket", lambda: listener.bind(str(path)),
                         lambda: listener.listen(MAX_CLIENTS), listener.close)
        self._thread = threading.Thread(target=self._accept, name="pyhv-console-accept",
                                        daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> None:
        """The guest's output to every client (run-loop thread; never blocks)."""
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            c.pump.write(data)

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._clients)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return                       # closed
            with self._lock:
                if self._closed or len(self._clients) >= MAX_CLIENTS:
                    sock.close()
                    continue
                client = _Client(sock)
                self._clients.append(client)
            threading.Thread(target=self._reader, args=(client,), daemon=True,
                             name="pyhv-console-client").start()

    def _reader(self, client: _Client) -> None:
        try:
            while True:
                try:
                    data = client.sock.recv(4096)
                except OSError:
                    break
                if not data:
                    break
                target = self.on_input
                if target is not None:
                    target(data)
        finally:
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        with self._lock:
            if client not in self._clients:
                return
            self._clients.remove(client)
        client.pump.close(grace_s=0.2)
        with contextlib.suppress(OSError):
            client.sock.shutdown(socket.SHUT_RDWR)
        client.sock.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            clients = list(self._clients)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for c in clients:
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RDWR)   # wakes its reader, which drops it
        self._thread.join(timeout=2.0)
        with contextlib.suppress(OSError):
            self.path.unlink()
