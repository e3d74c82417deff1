"""Guest console output to a file descriptor, never blocking the run loop.

Design: the run-loop thread (which runs the UART, hence the console) only appends to a
bounded buffer under a lock (`write`); a writer thread (`pyhv-output`) moves the buffer
to the descriptor with ordinary blocking writes. A terminal that scrolls slowly or a
pipe that nobody reads stalls only the writer: the vCPU, `--timeout` and signals go on.
The descriptor's own flags are left alone (stdout's file description is shared with
the shell and the other processes of a pipeline, so pyhv does not make it non-blocking).

Policy when output cannot keep up:
- the buffer is full (the reader is too slow or has stopped reading): new output is
  dropped and counted in `dropped`; `on_drop` is called once, at the first drop;
- the reader is gone (EPIPE: `pyhv run ... | head -c 10`): the writer stops, all later
  output is dropped, and `on_closed` is called once (the run command then ends the run
  quietly, with the status of a tool killed by SIGPIPE);
- any other write error (EIO, ENOSPC...): the same as a reader gone, reported through
  `on_error` with the error instead.
`close(grace_s)` drains at the end: it waits while bytes keep moving and gives up once
none has moved for `grace_s`, counting what is left as dropped, so a reader that never
reads cannot hold pyhv forever.

Invariants: `write()` never waits for I/O; what reaches the descriptor is the written
bytes in order, with gaps only where bytes were counted in `dropped`; callbacks run on
the thread that noticed (on_drop: the writer of the bytes; on_closed/on_error: the
writer thread) and each runs at most once.
"""

from __future__ import annotations

import errno
import os
import select
import threading
import time
from collections.abc import Callable

LIMIT = 256 << 10            # bytes buffered for a slow reader before output is dropped
CHUNK = 64 << 10             # at most this much per os.write
DRAIN_GRACE_S = 1.0          # close(): give up after this long without progress


class OutputPump:
    """A bounded, non-blocking byte stream to `fd` through a writer thread."""

    def __init__(self, fd: int, *, limit: int = LIMIT,
                 on_drop: Callable[[], None] = lambda: None,
                 on_closed: Callable[[], None] = lambda: None,
                 on_error: Callable[[OSError], None] = lambda _e: None) -> None:
        self.fd = fd
        self.limit = limit
        self.on_drop = on_drop
        self.on_closed = on_closed
        self.on_error = on_error
        self.dropped = 0
        self.written = 0
        self.closed_by_reader = False
        self.error: OSError | None = None
        self._buf = bytearray()
        self._inflight = 0             # bytes taken from the buffer, not yet written
        self._cond = threading.Condition(threading.Lock())
        self._stopping = False
        self._dead = False             # the descriptor takes no more bytes
        self._warned = False
        self._thread = threading.Thread(target=self._writer, name="pyhv-output", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ producer side

    def write(self, data: bytes) -> None:
        """Queue `data` (any thread); never waits for the reader."""
        warn = False
        with self._cond:
            if self._dead:
                self.dropped += len(data)
                return
            room = self.limit - len(self._buf)
            if room < len(data):
                self.dropped += len(data) - max(room, 0)
                data = data[:max(room, 0)]
                warn = not self._warned
                self._warned = True
            if data:
                was_empty = not self._buf
                self._buf += data
                if was_empty:
                    self._cond.notify()
        if warn:
            self.on_drop()

    # ------------------------------------------------------------------ writer thread

    def _writer(self) -> None:
        while True:
            with self._cond:
                while not self._buf and not self._stopping:
                    self._cond.wait()
                if not self._buf:
                    return
                chunk = bytes(self._buf[:CHUNK])
                del self._buf[:CHUNK]
                self._inflight = len(chunk)
            try:
                self._write_all(chunk)
            except OSError as e:
                with self._cond:
                    if self._dead:             # close() gave up on us and counted all
                        return
                    self._dead = True
                    self.dropped += len(self._buf) + self._inflight
                    self._buf.clear()
                    self._inflight = 0
                if e.errno == errno.EPIPE:
                    self.closed_by_reader = True
                    self.on_closed()
                else:
                    self.error = e
                    self.on_error(e)
                return

    def _write_all(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:       # someone else made the descriptor non-blocking
                select.select([], [self.fd], [], 1.0)
                continue
            self.written += n
            view = view[n:]
            self._inflight = len(view)

    # ------------------------------------------------------------------ the end

    def close(self, grace_s: float = DRAIN_GRACE_S) -> None:
        """Write out what is buffered, waiting while bytes keep moving; give up after
        `grace_s` without progress (what is left is counted as dropped)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        last = self.written
        stalled_since = time.monotonic()
        while self._thread.is_alive():
            self._thread.join(timeout=min(0.05, grace_s))
            if self.written != last:
                last = self.written
                stalled_since = time.monotonic()
            elif time.monotonic() - stalled_since >= grace_s:
                break
        with self._cond:
            self._dead = True
            self.dropped += len(self._buf)
            self._buf.clear()
            if self._thread.is_alive():      # stuck in a write nobody will read
                self.dropped += self._inflight
                self._inflight = 0
