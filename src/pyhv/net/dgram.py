"""Datagram back ends: one frame per datagram (UDP or a Unix datagram socket).

The wire format of QEMU's `-netdev dgram` and `-netdev socket,udp=..,localaddr=..`: each
datagram is exactly one Ethernet frame, no header. The socket is bound to the local
address and sends to the remote one; datagrams from anyone else are ignored (counted as
`rx_foreign`), so a stray sender on the host cannot inject frames.

Frame size: a UDP datagram carries at most 65507 bytes over IPv4 (65527 over IPv6), so
these are the back end's max_frame there (larger frames are refused and counted as
tx_invalid, as QEMU's sendto fails for them); a Unix datagram socket carries MAX_FRAME.
Use a guest MTU of 65493 or less on UDP, or a Unix path, or a stream.

Transmit is one non-blocking sendto per frame; a full socket buffer drops the frame (a
datagram network loses frames, it never waits). `writable` is always True.
Receive reads one datagram into a MAX_FRAME + 1 buffer with MSG_TRUNC, so a longer
datagram is recognised by its real length and dropped as oversize, never cut short.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket

from pyhv.errors import HostError
from pyhv.net.backend import Buffer, NetBackend
from pyhv.net.framing import MAX_FRAME, MIN_FRAME
from pyhv.net.stream import Address, _family, describe

UDP4_MAX = 65507       # 65535 - 20 (IPv4 header) - 8 (UDP header)
UDP6_MAX = 65527       # 65535 - 8 (the IPv6 payload length counts the UDP header)


def max_datagram_frame(family: int) -> int:
    """The largest frame one datagram carries: UDP's limits, or MAX_FRAME on Unix."""
    if family == socket.AF_INET:
        return UDP4_MAX
    if family == socket.AF_INET6:
        return UDP6_MAX
    return MAX_FRAME


class DgramBackend(NetBackend):
    kind = "dgram"

    def __init__(self, local: Address, remote: Address, *,
                 max_frame: int | None = None) -> None:
        if max_frame is None:
            max_frame = max_datagram_frame(_family(local))
        super().__init__(f"dgram {describe(local)} -> {describe(remote)}",
                         max_frame=max_frame)
        if _family(local) != _family(remote):
            raise HostError(f"--net socket: {describe(local)} and {describe(remote)} "
                            "are of different address families")
        self.local = local
        self.remote = remote
        self._sock: socket.socket | None = None
        self._unlink: str | None = None
        self._rbuf = bytearray(max_frame + 1)
        self.rx_foreign = 0

    def _opened(self) -> None:
        s = socket.socket(_family(self.local), socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            if s.family != socket.AF_UNIX:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(self.local)
        except OSError as e:
            s.close()
            raise HostError(f"--net socket: cannot bind {describe(self.local)}: "
                            f"{e.strerror or e}") from None
        if isinstance(self.local, str):
            self._unlink = self.local
        s.setblocking(False)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, opt, 1 << 20)
        self._sock = s
        self._set_link(True)

    def _send(self, frame: Buffer) -> bool:
        s = self._sock
        if s is None:
            return False
        try:
            s.sendto(frame, self.remote)
        except OSError:
            return False           # buffer full, nobody listening (ECONNREFUSED), ...
        return True

    def _poll_set(self) -> list[tuple[int, int]]:
        if self._sock is None:
            return []
        return [(self._sock.fileno(), select.POLLIN if self._want_rx() else 0)]

    def _ready(self, fd: int, events: int) -> None:
        s = self._sock
        if s is None:
            return
        for _ in range(64):                     # then let poll look at the wake pipe
            try:
                n, _anc, _flags, src = s.recvmsg_into([self._rbuf], 0, socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue                        # an ICMP error from an earlier send
            if src != self.remote and not (isinstance(self.remote, tuple)
                                           and _same_inet(src, self.remote)):
                self.rx_foreign += 1
                continue
            if n > self.max_frame:
                self.stats.rx_oversize += 1
            elif n < MIN_FRAME:
                self.stats.rx_runts += 1
            else:
                self._deliver(bytes(self._rbuf[:n]))
            if not self.rx_room():
                return

    def _release(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._unlink is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._unlink)
            self._unlink = None


def _same_inet(src: object, remote: tuple[str, int]) -> bool:
    if not isinstance(src, tuple) or len(src) < 2:
        return False
    try:
        want = socket.getaddrinfo(remote[0], remote[1], type=socket.SOCK_DGRAM)
    except OSError:
        return False
    return any(ai[4][0] == src[0] and ai[4][1] == src[1] for ai in want)
