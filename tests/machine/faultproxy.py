"""A TCP proxy that breaks a migration stream at a chosen record (tests/machine/
test_migration_faults.py).

`FaultProxy(target, fault)` listens on 127.0.0.1 (`uri`), accepts one connection, connects
to `target` and forwards whole records (pyhv.migration.stream's framing) both ways. A
`Fault(direction, kind, nth, pos, action)` picks one record: the nth record of that type
in that direction ("out": source to destination, "back": the answers); pos is a byte
offset inside the record (negative: from its end; None: its middle). "flip" inverts
that byte's bits and forwards the record; "cut" forwards the bytes before it and closes
both connections. `fired` tells whether the fault was reached; `out` holds the bytes
forwarded source to destination. Deterministic: the fault point is named by the record
structure, not by time or chance.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass

from pyhv.migration.stream import HEAD


@dataclass(frozen=True)
class Fault:
    direction: str          # "out" or "back"
    kind: int
    nth: int = 1
    pos: int | None = 0
    action: str = "flip"    # or "cut"

    def __str__(self) -> str:
        from pyhv.migration.stream import NAMES
        where = "mid" if self.pos is None else self.pos
        return f"{self.action}-{self.direction}-{NAMES[self.kind]}{self.nth}@{where}"


class FaultProxy:
    def __init__(self, target: str, fault: Fault | None) -> None:
        self.target = target
        self.fault = fault
        self.fired = False
        self.out = bytearray()
        self._listen = socket.create_server(("127.0.0.1", 0))
        self._listen.settimeout(30)
        self.uri = f"tcp:127.0.0.1:{self._listen.getsockname()[1]}"
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            a, _ = self._listen.accept()
        except OSError:
            return
        host, _, port = self.target[len("tcp:"):].rpartition(":")
        try:
            b = socket.create_connection((host, int(port)), timeout=30)
        except OSError:
            a.close()
            return
        self._socks = [a, b]
        back = threading.Thread(target=self._pump, args=(b, a, "back"), daemon=True)
        back.start()
        self._pump(a, b, "out")
        back.join(5)            # the destination's last answer (its reason) goes back
        self.close()

    @staticmethod
    def _read(s: socket.socket, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = s.recv(n - len(buf))
            except OSError:
                return None
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        seen: dict[int, int] = {}
        while True:
            head = self._read(src, HEAD.size)
            if head is None:
                break
            kind, length, _, _ = HEAD.unpack(head)
            payload = self._read(src, length)
            if payload is None:
                break
            rec = bytearray(head + payload)
            seen[kind] = seen.get(kind, 0) + 1
            f = self.fault
            if (f is not None and not self.fired and f.direction == direction
                    and f.kind == kind and f.nth == seen[kind]):
                self.fired = True
                pos = len(rec) // 2 if f.pos is None else f.pos % len(rec)
                if f.action == "cut":
                    self._send(dst, rec[:pos], direction)
                    self.close()
                    return
                rec[pos] ^= 0xFF
            if not self._send(dst, rec, direction):
                break
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _send(self, dst: socket.socket, data: bytes | bytearray, direction: str) -> bool:
        if direction == "out":
            self.out += data
        try:
            dst.sendall(data)
        except OSError:
            return False
        return True

    def close(self) -> None:
        for s in (*self._socks, self._listen):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
