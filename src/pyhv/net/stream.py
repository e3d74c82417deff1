"""Stream back ends: frames over one connected byte stream (TCP or a Unix socket).

The wire format is QEMU's `-netdev stream` and `-netdev socket,listen=|connect=` and
passt's: each frame preceded by its length, 4 bytes big-endian (pyhv.net.framing). Two
pyhv VMs, or pyhv and QEMU, share one L2 segment this way: one side listens, the other
connects.

Modes:
- `connect`: connect once at start (a refused connection is a clear error before the
  guest runs); when the peer goes away the link goes down and stays down;
- `listen`: bind and listen at start; the link is up while one peer is connected; when it
  goes away the next connection is accepted (one peer at a time: a second connection while
  one is up is closed at once);
- an already connected socket (`StreamBackend.adopt`, what the passt back end uses).

Transmit: `send` (device thread) writes header and frame with one non-blocking sendmsg.
What the socket does not take at once is kept, with the frames after it, in a transmit
queue of at most TX_MAX_BYTES that the I/O thread flushes when the socket is writable;
`writable` is False while the queue holds more than TX_MAX_BYTES - one frame, and
`on_writable` fires when it has drained below half after a `writable` that said False
or a refused `send` (so a device that looked and stopped is always called back). A
frame is never split between the queue and a later frame: the stream stays in step
whatever the socket takes.

Receive: the I/O thread reads up to READ_CHUNK bytes at a time into one reused buffer and
feeds a Deframer; a lost connection drops the partial frame (the next connection starts
in step). Invariants of pyhv.net.backend hold: bounded memory, nothing blocks on the peer.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
from collections import deque

from pyhv.errors import HostError
from pyhv.net.backend import READ_CHUNK, TX_MAX_BYTES, Buffer, NetBackend
from pyhv.net.framing import MAX_FRAME, Deframer, frame_header

Address = tuple[str, int] | str          # (host, port) or a Unix socket path


def describe(addr: Address) -> str:
    return addr if isinstance(addr, str) else f"{addr[0]}:{addr[1]}"


def _family(addr: Address) -> int:
    if isinstance(addr, str):
        return socket.AF_UNIX
    return socket.AF_INET6 if ":" in addr[0] else socket.AF_INET


class StreamBackend(NetBackend):
    kind = "stream"

    def __init__(self, mode: str, addr: Address | None = None, *,
                 sock: socket.socket | None = None, max_frame: int = MAX_FRAME) -> None:
        if mode not in ("connect", "listen", "adopt"):
            raise ValueError(f"stream mode {mode!r}")
        label = "connected socket" if addr is None else describe(addr)
        super().__init__(f"stream {mode} {label}", max_frame=max_frame)
        self.mode = mode
        self.addr = addr
        self._sock: socket.socket | None = sock
        self._listener: socket.socket | None = None
        self._unlink: str | None = None          # a Unix socket file this back end made
        self._deframer = Deframer(max_frame)
        self._rbuf = bytearray(READ_CHUNK)
        self._txq: deque[memoryview] = deque()    # whole frames' bytes, the first partly sent
        self._txq_bytes = 0
        self._tx_blocked = False                  # writable went False; on_writable owed

    @classmethod
    def adopt(cls, sock: socket.socket, description: str) -> StreamBackend:
        b = cls("adopt", sock=sock)
        b.description = description
        return b

    # ------------------------------------------------------------------ set-up

    def _opened(self) -> None:
        if self.mode == "adopt":
            assert self._sock is not None
            self._sock.setblocking(False)
            self._set_link(True)
            return
        assert self.addr is not None
        fam = _family(self.addr)
        if self.mode == "connect":
            s = socket.socket(fam, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.settimeout(5.0)
                s.connect(self.addr)
            except OSError as e:
                s.close()
                raise HostError(f"--net socket: cannot connect to {describe(self.addr)}: "
                                f"{e.strerror or e}") from None
            s.setblocking(False)
            self._tune(s)
            self._sock = s
            self._set_link(True)
            return
        s = socket.socket(fam, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if fam != socket.AF_UNIX:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(self.addr)
            s.listen(1)
        except OSError as e:
            s.close()
            raise HostError(f"--net socket: cannot listen on {describe(self.addr)}: "
                            f"{e.strerror or e}") from None
        if isinstance(self.addr, str):
            self._unlink = self.addr
        s.setblocking(False)
        self._listener = s

    @staticmethod
    def _tune(s: socket.socket) -> None:
        if s.family != socket.AF_UNIX:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # ------------------------------------------------------------------ transmit

    @property
    def writable(self) -> bool:
        """Room for one more frame of any size; False owes an `on_writable` later."""
        with self._tx_lock:
            if self._txq_bytes <= TX_MAX_BYTES - (self.max_frame + 4):
                return True
            self._tx_blocked = True
            return False

    def _send(self, frame: Buffer) -> bool:
        s = self._sock
        if s is None or not self._link_up:
            return False
        n = len(frame) + 4
        if self._txq:
            if self._txq_bytes + n > TX_MAX_BYTES:
                self._tx_blocked = True
                return False
            self._txq.append(memoryview(frame_header(len(frame)) + bytes(frame)))
            self._txq_bytes += n
            return True
        try:
            sent = s.sendmsg([frame_header(len(frame)), frame])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return False                       # the I/O thread sees the hang-up
        if sent < n:
            rest = (frame_header(len(frame)) + bytes(frame))[sent:]
            self._txq.append(memoryview(rest))
            self._txq_bytes += len(rest)
            self._wake()                       # poll for POLLOUT
        return True

    def _flush(self) -> None:
        """On the I/O thread: write the queue until the socket stops taking it."""
        owed = False
        with self._tx_lock:
            s = self._sock
            while self._txq and s is not None:
                head = self._txq[0]
                try:
                    sent = s.send(head)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break                      # POLLHUP/POLLERR follow
                self._txq_bytes -= sent
                if sent < len(head):
                    self._txq[0] = head[sent:]
                    break
                self._txq.popleft()
            if self._tx_blocked and self._txq_bytes <= TX_MAX_BYTES // 2:
                self._tx_blocked = False
                owed = True
        if owed:
            self._on_writable()

    # ------------------------------------------------------------------ the I/O thread

    def _poll_set(self) -> list[tuple[int, int]]:
        if self._sock is not None:
            ev = select.POLLIN if self._want_rx() else 0
            if self._txq:
                ev |= select.POLLOUT
            return [(self._sock.fileno(), ev)]   # POLLHUP/POLLERR are always reported
        if self._listener is not None:
            return [(self._listener.fileno(), select.POLLIN)]
        return []

    def _ready(self, fd: int, events: int) -> None:
        if self._listener is not None and fd == self._listener.fileno():
            self._accept()
            return
        s = self._sock
        if s is None or fd != s.fileno():
            return
        if events & select.POLLOUT:
            self._flush()
        if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
            self._read(s)

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            s, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        if self._sock is not None:             # one peer at a time
            s.close()
            return
        s.setblocking(False)
        self._tune(s)
        with self._tx_lock:
            self._sock = s
            self._deframer.reset()
        self._set_link(True)

    def _read(self, s: socket.socket) -> None:
        try:
            n = s.recv_into(self._rbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._hang_up(e.strerror or str(e))
            return
        if n == 0:
            self._hang_up("the peer closed the connection")
            return
        d = self._deframer
        over, runts = d.oversize, d.runts
        for frame in d.feed(memoryview(self._rbuf)[:n]):
            self._deliver(frame)
        self.stats.rx_oversize += d.oversize - over
        self.stats.rx_runts += d.runts - runts

    def _hang_up(self, why: str) -> None:
        owed = False
        with self._tx_lock:
            s, self._sock = self._sock, None
            self._txq.clear()
            self._txq_bytes = 0
            owed, self._tx_blocked = self._tx_blocked, False
        if s is not None:
            s.close()
        self._deframer.reset()
        self._set_link(False, why)
        if owed:
            self._on_writable()

    def _release(self) -> None:
        for s in (self._sock, self._listener):
            if s is not None:
                s.close()
        self._sock = self._listener = None
        if self._unlink is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._unlink)
            self._unlink = None
