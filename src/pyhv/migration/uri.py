"""Migration addresses: `tcp:HOST:PORT` (HOST a name, an IPv4 address or [IPv6]).

`parse(uri)` -> (host, port) or ConfigError naming what is wrong; `listen(uri)` binds a
listening socket (port 0: the kernel picks one; `bound(sock)` gives the URI to print),
`connect(uri, timeout)` a connected one. Both set TCP_NODELAY: the stream's small
records (the ack, the state) must not wait behind Nagle's algorithm at the switch-over.
"""

from __future__ import annotations

import socket

from pyhv.errors import ConfigError
from pyhv.migration.stream import MigrationError

SCHEME = "tcp:"


def parse(uri: str) -> tuple[str, int]:
    if not uri.startswith(SCHEME):
        raise ConfigError(f"migration address {uri!r}: expected tcp:HOST:PORT")
    rest = uri[len(SCHEME):]
    if rest.startswith("["):
        host, sep, port_text = rest[1:].partition("]:")
    else:
        host, sep, port_text = rest.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"migration address {uri!r}: expected tcp:HOST:PORT "
                          "(PORT 0 to 65535, an IPv6 HOST in brackets)")
    return host, int(port_text)


def listen(uri: str) -> socket.socket:
    host, port = parse(uri)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--incoming {uri}: cannot resolve {host!r}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    s = socket.socket(family, kind, proto)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
        s.listen(1)
    except OSError as e:
        s.close()
        raise ConfigError(f"--incoming {uri}: cannot listen: {e.strerror or e}") from None
    return s


def bound(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


def connect(uri: str, timeout: float) -> socket.socket:
    host, port = parse(uri)
    try:
        s = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise MigrationError(f"cannot connect to {uri}: {e.strerror or e}") from None
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s
