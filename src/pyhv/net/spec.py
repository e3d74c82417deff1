"""`--net` and `--mac`: what the user asked for, checked before anything starts.

    --net user                          passt (pyhv.net.passt)
    --net tap=NAME                      a host tap device (pyhv.net.tap)
    --net socket=listen:ADDR            a stream: wait for one peer (pyhv.net.stream)
    --net socket=connect:ADDR           a stream: connect to a listening peer
    --net socket=udp:LOCAL@REMOTE       datagrams between two addresses (pyhv.net.dgram)
    --net none                          no NIC (the default)

ADDR is HOST:PORT, [IPV6]:PORT, or a Unix socket path (anything with a '/'). The stream
and datagram forms speak QEMU's `-netdev stream`/`socket` and `-netdev dgram` wire
formats, so the peer can be another pyhv or QEMU.

`--mac` takes six hex octets (':' or '-' between them); a multicast or all-zero address
is refused. Without it the NIC gets 52:54:00 (QEMU's prefix) and three random octets,
so two VMs on one segment never share an address by accident.

Every error is a ConfigError with one line naming the option; `NetSpec.open()` creates
the back end (not started).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from pyhv.errors import ConfigError
from pyhv.net.backend import NetBackend
from pyhv.net.stream import Address

KINDS = ("user", "tap", "socket", "none")
DEFAULT_MAC_PREFIX = bytes.fromhex("525400")


@dataclass(frozen=True)
class NetSpec:
    kind: str                       # user | tap | stream | dgram | none
    mode: str = ""                  # stream: listen | connect
    name: str = ""                  # tap name
    addr: Address | None = None     # stream address, or dgram local
    remote: Address | None = None   # dgram remote
    text: str = "none"

    def open(self) -> NetBackend | None:
        if self.kind == "none":
            return None
        if self.kind == "user":
            from pyhv.net.passt import PasstBackend
            return PasstBackend()
        if self.kind == "tap":
            from pyhv.net.tap import TapBackend
            return TapBackend(self.name)
        if self.kind == "stream":
            from pyhv.net.stream import StreamBackend
            return StreamBackend(self.mode, self.addr)
        from pyhv.net.dgram import DgramBackend
        assert self.addr is not None and self.remote is not None
        return DgramBackend(self.addr, self.remote)


def parse_address(text: str, what: str) -> Address:
    if "/" in text:
        if len(os.fsencode(text)) >= 108:
            raise ConfigError(f"{what}: Unix socket path {text!r} is too long (107 bytes "
                              "at most)")
        return text
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not m:
        raise ConfigError(f"{what}: {text!r} is not HOST:PORT, [IPV6]:PORT or a Unix "
                          "socket path (with a '/')")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise ConfigError(f"{what}: port {port} is out of range (1-65535)")
    return (host, port)


def parse_net(text: str) -> NetSpec:
    what = f"--net {text}"
    kind, eq, value = text.partition("=")
    if kind in ("none", "user") and not eq:
        return NetSpec(kind, text=text)
    if kind == "tap" and eq:
        from pyhv.net.tap import check_tap_name
        try:
            check_tap_name(value)
        except Exception as e:          # HostError from the shared check: a config error here
            raise ConfigError(str(e)) from None
        return NetSpec("tap", name=value, text=text)
    if kind == "socket" and eq:
        mode, colon, rest = value.partition(":")
        if mode in ("listen", "connect") and colon:
            return NetSpec("stream", mode=mode, addr=parse_address(rest, what), text=text)
        if mode == "udp" and colon:
            local, at, remote = rest.partition("@")
            if not at:
                raise ConfigError(f"{what}: expected socket=udp:LOCAL@REMOTE "
                                  "(e.g. udp:127.0.0.1:5000@127.0.0.1:5001)")
            return NetSpec("dgram", addr=parse_address(local, what),
                           remote=parse_address(remote, what), text=text)
        raise ConfigError(f"{what}: expected socket=listen:ADDR, socket=connect:ADDR or "
                          "socket=udp:LOCAL@REMOTE")
    raise ConfigError(f"{what}: expected user, tap=NAME, socket=listen:ADDR, "
                      "socket=connect:ADDR, socket=udp:LOCAL@REMOTE or none")


def parse_mac(text: str | None) -> bytes:
    """`--mac` -> 6 bytes; None -> 52:54:00 and three random octets."""
    if text is None:
        return DEFAULT_MAC_PREFIX + os.urandom(3)
    parts = re.split(r"[:-]", text)
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9A-Fa-f]{1,2}", p) for p in parts):
        raise ConfigError(f"--mac {text!r}: expected six hex octets, e.g. 52:54:00:12:34:56")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise ConfigError(f"--mac {text}: a multicast address cannot be a NIC's address")
    if mac == bytes(6):
        raise ConfigError(f"--mac {text}: the all-zero address cannot be a NIC's address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)
