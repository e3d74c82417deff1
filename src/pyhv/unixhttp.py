"""An `http.client` connection over a UNIX socket, for pyhv's HTTP/JSON clients.

Used by the VM control API's client (pyhv.vmclient) and the host daemon's client
(pyhv.hostd.client). Invariant: `connect()` applies the connection's timeout to the
socket before connecting, and a failed connect closes the socket before raising.
"""

from __future__ import annotations

import http.client
import socket
from pathlib import Path


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str | Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = str(path)

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.socket_path)
        except OSError:
            s.close()
            raise
        self.sock = s
