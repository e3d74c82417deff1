"""The migration stream's framing: typed records, each with its length and a CRC-32.

Design: both directions of a migration connection are a sequence of records

    u8 type | 3 bytes zero | u32 length | u32 crc32(the 8 bytes before) | u32 crc32(payload)
    | payload

(little-endian). JSON records (HELLO, REPLY, ROUND, STATE, ABORT) carry a UTF-8 JSON
object; PAGES carries guest pages (pyhv.migration.pages), DISK a disk chunk
(pyhv.migration.storage). A `Channel` wraps a connected
socket: `send(type, payload)` and `recv()` -> (type, payload), `send_json` / `recv_json`.

Invariants: a record is accepted only whole and with both checksums right: a short read
(the peer went away), an unknown type, a length over MAX_RECORD, non-zero padding or a
checksum mismatch raise `MigrationError` naming the record's offset in the stream, and
nothing of that record is used. The header has its own checksum, checked before the
payload is read, so a damaged length is refused at once instead of waiting for bytes
that never come. Every read and write has a timeout (the socket's), so a
silent peer ends the migration instead of hanging it.
"""

from __future__ import annotations

import json
import socket
import struct
import zlib
from typing import Any

from pyhv.errors import PyhvError

HEAD = struct.Struct("<B3xIII")
MAX_RECORD = 4 << 20          # a PAGES record holds at most 256 pages (+ its index)

HELLO = 1     # source -> destination: the stream header (pyhv.migration.header)
REPLY = 2     # destination -> source: {"ok": bool, "error"?: str, ...}: to the header,
              # to each ROUND once its pages are in RAM, "running" at the end
PAGES = 3     # source -> destination: a batch of RAM pages (pyhv.migration.pages)
ROUND = 4     # source -> destination: a round ended {"round": n, "pages": n}
STATE = 5     # source -> destination: the VmState and the switch-over's timestamps
ABORT = 6     # source -> destination: the source gave up {"error": str}
DISK = 7      # source -> destination: a chunk of a disk (--copy-storage,
              # pyhv.migration.storage)
NAMES = {HELLO: "HELLO", REPLY: "REPLY", PAGES: "PAGES", ROUND: "ROUND", STATE: "STATE",
         ABORT: "ABORT", DISK: "DISK"}


class MigrationError(PyhvError):
    """A migration failed; the message says where and why (one line)."""


def _crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def encode(kind: int, payload: bytes) -> bytes:
    """One record's bytes."""
    if kind not in NAMES:
        raise ValueError(f"unknown record type {kind}")
    if len(payload) > MAX_RECORD:
        raise ValueError(f"record of {len(payload)} bytes is over {MAX_RECORD}")
    first = HEAD.pack(kind, len(payload), 0, 0)[:8]
    return HEAD.pack(kind, len(payload), _crc(first), _crc(payload)) + payload


class Channel:
    """Records over a connected stream socket, with counts of the bytes each way."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.sent = 0          # bytes written
        self.received = 0      # bytes read

    def send(self, kind: int, payload: bytes) -> int:
        data = encode(kind, payload)
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise MigrationError(f"{self.peer} stopped reading the stream") from None
        except OSError as e:
            raise MigrationError(f"the connection to {self.peer} broke: "
                                 f"{e.strerror or e}") from None
        self.sent += len(data)
        return len(data)

    def send_json(self, kind: int, obj: dict[str, Any]) -> int:
        return self.send(kind, json.dumps(obj, separators=(",", ":")).encode())

    def _read(self, n: int, what: str) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            except TimeoutError:
                raise MigrationError(f"{self.peer} sent nothing for "
                                     f"{self.sock.gettimeout():g} s ({what})") from None
            except OSError as e:
                raise MigrationError(f"the connection to {self.peer} broke ({what}): "
                                     f"{e.strerror or e}") from None
            if not chunk:
                raise MigrationError(f"{self.peer} closed the connection ({what}, "
                                     f"stream offset {self.received + len(buf)})")
            buf += chunk
        self.received += n
        return bytes(buf)

    def recv(self) -> tuple[int, bytes]:
        at = self.received
        head = self._read(HEAD.size, "a record header")
        kind, length, hcrc, crc = HEAD.unpack(head)
        if head[1:4] != b"\0\0\0" or kind not in NAMES or _crc(head[:8]) != hcrc:
            raise MigrationError(f"corrupt stream from {self.peer}: bad record header at "
                                 f"offset {at} (type {kind})")
        if length > MAX_RECORD:
            raise MigrationError(f"corrupt stream from {self.peer}: a {NAMES[kind]} record "
                                 f"of {length} bytes at offset {at} (at most {MAX_RECORD})")
        payload = self._read(length, f"a {NAMES[kind]} record")
        if _crc(payload) != crc:
            raise MigrationError(f"corrupt stream from {self.peer}: the {NAMES[kind]} record "
                                 f"at offset {at} fails its checksum")
        return kind, payload

    def recv_json(self, expect: tuple[int, ...]) -> tuple[int, dict[str, Any]]:
        kind, payload = self.recv()
        if kind not in expect:
            raise MigrationError(f"{self.peer} sent a {NAMES[kind]} record where "
                                 f"{' or '.join(NAMES[k] for k in expect)} belongs")
        return kind, decode_json(kind, payload, self.peer)

    def close(self) -> None:
        self.sock.close()


def decode_json(kind: int, payload: bytes, peer: str) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MigrationError(f"{peer} sent a malformed {NAMES[kind]} record: {e}") from None
    if not isinstance(obj, dict):
        raise MigrationError(f"{peer} sent a {NAMES[kind]} record that is not an object")
    return obj
