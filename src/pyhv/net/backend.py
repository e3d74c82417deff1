"""The network back-end interface: how a virtual NIC reaches a network.

A back end carries whole Ethernet frames (no virtio header, no FCS) between one guest
NIC and something outside the guest: passt (`user`), a host tap device (`tap`), or
another VM through a socket (`stream`, `dgram`). The NIC device only ever sees this
interface:

    b.start(notify, on_link, on_writable)
                         start the back end's I/O thread; `notify()` is called from that
                         thread whenever the receive queue goes from empty to non-empty
                         (the device then kicks whatever thread feeds the guest);
                         `on_writable()` when `writable` turns true again
    b.send(frame)        hand one frame to the network: never blocks; False when the frame
                         was dropped (link down, peer not keeping up, frame out of limits)
    b.writable           whether `send` has room now: a device that sees False leaves the
                         guest's frames in its queue until `on_writable` (flow control
                         instead of loss; a stream peer that is slow slows the guest's
                         transmissions, it never blocks them)
    b.recv()             the next frame from the network, or None
    b.link_up            whether a peer is there (a stream with no connection is down)
    b.close()            stop the thread, release sockets, fds, helper processes and
                         socket files; idempotent, and safe before start()
    b.stats              counters (NetStats), for `--stats` and tests

Threads: each back end owns one I/O thread (`pyhv-net-<kind>`) that waits with poll(2)
on its descriptors and a wake pipe; it reads frames into a bounded FrameQueue and flushes
a stream's pending output. While the receive queue is full the thread stops reading
(`rx_room` is False), so the peer's data waits in the kernel (a stream is flow-controlled,
a datagram socket or tap drops in the kernel); `recv` wakes the thread when it has made
room. `send` is called by the device's thread and writes directly
when it can (non-blocking), so the common path costs one system call; what a stream
socket does not take at once waits in a bounded transmit queue that the I/O thread
flushes. Nothing ever blocks on the peer: a peer that stops reading costs dropped
frames, never a stuck vCPU.

Invariants:
- every frame delivered by `recv` is MIN_FRAME..max_frame bytes, exactly as the peer
  sent it; everything else a peer sends is dropped and counted, never raised;
- memory is bounded: the receive queue (FrameQueue), the frames of one read that did not
  fit in it (`_pending`: at most READ_CHUNK bytes, the reader stops until they are
  queued), the transmit queue (TX_MAX_BYTES), one read buffer and one partial frame per
  back end, whatever the peer or the guest do; a full receive queue loses nothing in
  pyhv (a stream is flow-controlled, a datagram socket's or tap's kernel queue drops);
- an error in the I/O thread (a pyhv bug) takes the link down and is kept in `failure`
  for the device to report; it never kills the process or blocks `close`;
- after `close()` returns, the thread has ended and every host resource the back end
  acquired (descriptors, child processes, files it created) is released.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields

from pyhv.net.framequeue import FrameQueue
from pyhv.net.framing import MAX_FRAME, MIN_FRAME

TX_MAX_BYTES = 4 << 20          # a stream's transmit queue (bytes the peer has not read)
READ_CHUNK = 256 << 10          # one read from a stream socket
JOIN_TIMEOUT_S = 5.0

Buffer = bytes | bytearray | memoryview


@dataclass
class NetStats:
    tx_frames: int = 0          # handed to the network
    tx_bytes: int = 0
    tx_dropped: int = 0         # lost on the way out: link down, peer too slow, send error
    tx_invalid: int = 0         # refused: shorter than MIN_FRAME or longer than max_frame
    rx_frames: int = 0          # queued for the guest
    rx_bytes: int = 0
    rx_oversize: int = 0        # from the peer, longer than MAX_FRAME: dropped
    rx_runts: int = 0           # from the peer, shorter than MIN_FRAME: dropped
    rx_own: int = 0             # multicast frames of our own, looped back: dropped
    link_changes: int = 0       # connections made and lost

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class NetBackend:
    """Base of every back end; subclasses supply the descriptors and the transfers."""

    kind = "?"

    def __init__(self, description: str, *, max_frame: int = MAX_FRAME,
                 rx_queue: FrameQueue | None = None) -> None:
        self.description = description        # for messages: "stream 127.0.0.1:5555"
        self.max_frame = max_frame
        self.stats = NetStats()
        self.rx = rx_queue if rx_queue is not None else FrameQueue()
        self.failure: str | None = None       # an internal error in the I/O thread
        self.link_error: str | None = None    # why the link last went down
        self._link_up = False
        self._notify: Callable[[], None] = _nothing
        self._on_link: Callable[[bool], None] = _nothing_bool
        self._on_writable: Callable[[], None] = _nothing
        self._rx_paused = False
        self._pending: deque[bytes] = deque()    # read, not queued yet: one read's worth
        self._tx_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._closed = False
        self._wake_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # ------------------------------------------------------------------ the interface

    def start(self, notify: Callable[[], None] | None = None,
              on_link: Callable[[bool], None] | None = None,
              on_writable: Callable[[], None] | None = None) -> None:
        """Start receiving. The callbacks run on the I/O thread."""
        if self._thread is not None or self._closed:
            raise RuntimeError(f"{self.description}: start() twice or after close()")
        if notify is not None:
            self._notify = notify
        if on_link is not None:
            self._on_link = on_link
        if on_writable is not None:
            self._on_writable = on_writable
        self._opened()
        self._thread = threading.Thread(target=self._run, name=f"pyhv-net-{self.kind}",
                                        daemon=True)
        self._thread.start()

    def send(self, frame: Buffer) -> bool:
        """One frame to the network; never blocks. False: dropped (and counted)."""
        n = len(frame)
        st = self.stats
        with self._tx_lock:
            if n < MIN_FRAME or n > self.max_frame:
                st.tx_invalid += 1
                return False
            if self._closed or not self._send(frame):
                st.tx_dropped += 1
                return False
            st.tx_frames += 1
            st.tx_bytes += n
            return True

    def recv(self) -> bytes | None:
        frame = self.rx.get()
        if self._rx_paused and (len(self.rx) <= self.rx.max_frames // 2
                                and self.rx.bytes <= self.rx.max_bytes // 2):
            self._rx_paused = False
            self._wake()
        return frame

    def rx_room(self) -> bool:
        """Whether the receive queue can take a frame of any size now."""
        return (len(self.rx) < self.rx.max_frames
                and self.rx.bytes + self.max_frame <= self.rx.max_bytes)

    def _want_rx(self) -> bool:
        """For `_poll_set` (I/O thread): read now, or pause until `recv` makes room.
        Frames read but not queued yet (`_pending`) go first, in order."""
        self._rx_paused = True          # before looking: a recv from now on wakes us
        while self._pending and self._put(self._pending[0]):
            self._pending.popleft()
        if not self._pending and self.rx_room():
            self._rx_paused = False
            return True
        return False

    @property
    def writable(self) -> bool:
        return True

    @property
    def link_up(self) -> bool:
        return self._link_up

    def close(self) -> None:
        if self._closed:
            return
        with self._tx_lock:
            self._closed = True
        self._closing = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(JOIN_TIMEOUT_S)
        try:
            self._release()
        finally:
            with self._wake_lock:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1

    def __enter__(self) -> NetBackend:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ for subclasses

    def _opened(self) -> None:
        """Called by `start` before the I/O thread starts (connect, spawn helpers)."""

    def _send(self, frame: Buffer) -> bool:
        """Transmit under the tx lock; False when the frame was not taken."""
        raise NotImplementedError

    def _poll_set(self) -> list[tuple[int, int]]:
        """(fd, poll events) the I/O thread waits on now (called on the I/O thread)."""
        raise NotImplementedError

    def _ready(self, fd: int, events: int) -> None:
        """An fd from `_poll_set` is ready (called on the I/O thread)."""
        raise NotImplementedError

    def _release(self) -> None:
        """Free every resource, once, after the I/O thread has ended."""

    def _wake(self) -> None:
        """Make the I/O thread rebuild its poll set (or notice `close`)."""
        with self._wake_lock:
            if self._wake_w < 0:
                return                 # closed: nobody to wake (and the fd may be reused)
            # BlockingIOError: wake-ups are pending already, the thread will look
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"\0")

    def _deliver(self, frame: bytes) -> None:
        """A frame from the peer (already within limits): queue it for the guest, or
        keep it in `_pending` while the queue is full (the reader then stops reading)."""
        if self._pending or not self._put(frame):
            self._pending.append(frame)

    def _put(self, frame: bytes) -> bool:
        accepted, was_empty = self.rx.put(frame)
        if not accepted:
            return False
        self.stats.rx_frames += 1
        self.stats.rx_bytes += len(frame)
        if was_empty:
            self._notify()
        return True

    def _set_link(self, up: bool, why: str | None = None) -> None:
        if up == self._link_up:
            return
        self._link_up = up
        self.stats.link_changes += 1
        if not up:
            self.link_error = why
        self._on_link(up)

    # ------------------------------------------------------------------ the I/O thread

    def _run(self) -> None:
        try:
            while not self._closing:
                poller = select.poll()
                poller.register(self._wake_r, select.POLLIN)
                for fd, events in self._poll_set():
                    poller.register(fd, events)
                for fd, events in poller.poll():
                    if self._closing:
                        return
                    if fd == self._wake_r:
                        _drain(self._wake_r)
                    else:
                        self._ready(fd, events)
        except Exception as e:  # noqa: BLE001 - a pyhv bug: keep it for the device to report
            self.failure = (f"{self.description}: I/O thread failed: {type(e).__name__}: {e}\n"
                            + traceback.format_exc())
            self._set_link(False, "internal error")


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _nothing() -> None:
    pass


def _nothing_bool(_up: bool) -> None:
    pass
