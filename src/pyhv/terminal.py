"""The user's side of the serial console: stdin into the guest, the terminal kept sane.

Design: on a terminal, pyhv puts stdin in raw mode so that every key (Ctrl-C included)
goes to the guest, as on a real serial line; the escape key Ctrl-] (the one virsh
console uses) ends the run. The previous terminal settings are restored by `close()`,
which the run command calls from a `finally`, and by an atexit hook as a last resort,
so every exit path (guest exit, timeout, crash, Ctrl-], an exception) gives the terminal
back. On a pipe or file, input is forwarded as it comes and end-of-file only stops the
reader (the guest keeps running).

A daemon thread reads stdin with select() and a short timeout so that `close()` can stop
it; input goes to `on_input` (the `InputGate`'s `feed`, which blocks while the guest is
not taking input, so pyhv stops reading stdin: backpressure, never loss), followed by
`on_wake` (which kicks the vCPU so a halted guest sees the byte at once).

Invariants: only the reader thread reads fd 0; `close()` is idempotent.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import sys
import termios
import threading
import tty
from collections.abc import Callable
from typing import Any

ESCAPE = 0x1D          # Ctrl-]
ESCAPE_NAME = "Ctrl-]"


class Terminal:
    def __init__(self, on_input: Callable[[bytes], object], on_escape: Callable[[], None],
                 on_wake: Callable[[], None] = lambda: None, *, fd: int | None = None) -> None:
        self.fd = sys.stdin.fileno() if fd is None else fd
        self.on_input = on_input
        self.on_escape = on_escape
        self.on_wake = on_wake
        self.is_tty = os.isatty(self.fd)
        self._saved: list[Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self) -> None:
        if self.is_tty:
            self._saved = termios.tcgetattr(self.fd)
            atexit.register(self.close)
            tty.setraw(self.fd, termios.TCSANOW)
            # Keep output post-processing: a bare-metal guest's "\n" still starts a line.
            mode = termios.tcgetattr(self.fd)
            mode[1] |= termios.OPOST | termios.ONLCR
            termios.tcsetattr(self.fd, termios.TCSANOW, mode)
        self._thread = threading.Thread(target=self._reader, name="pyhv-stdin", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._saved is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def _reader(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.fd], [], [], 0.1)
                if not ready:
                    continue
                data = os.read(self.fd, 4096)
            except (OSError, ValueError):
                return
            if not data:
                return                      # end of input: the guest runs on
            if self.is_tty and ESCAPE in data:
                head = data[:data.index(ESCAPE)]
                if head:
                    self.on_input(head)
                self.on_escape()
                return
            self.on_input(data)
            self.on_wake()


class InputGate:
    """Holds console input until the guest listens, then passes it on in order, losing
    nothing.

    A booting kernel resets the UART's FIFOs and ignores bytes that arrive before a
    program opens the console, so input piped in at start-up would be lost. The gate
    buffers it until `open()`; the run command opens it when the guest enables the UART's
    receive interrupt (Linux does when /dev/console is opened) or at once for guests that
    poll. Backpressure, not loss: while `limit` bytes wait (the guest is not listening
    yet, or reads slower than input arrives), `feed()` blocks the caller, the stdin
    reader thread, so pyhv stops reading stdin and a writer into the pipe waits as it
    would for any slow reader. `close()` (the run is over) releases a blocked `feed()`;
    only bytes fed after that are dropped, and counted in `dropped`.

    Threads: `feed()` from the stdin reader; `open()` and `pump()` from the run loop;
    `close()` from whoever ends the run.
    """

    def __init__(self, feed: Callable[[bytes], int], *, is_open: bool = False,
                 limit: int = 1 << 20) -> None:
        self._feed = feed
        self._cond = threading.Condition(threading.Lock())
        self._held = bytearray()
        self.is_open = is_open
        self.limit = limit
        self.closed = False
        self.dropped = 0

    @property
    def held(self) -> int:
        return len(self._held)

    def feed(self, data: bytes) -> None:
        """Queue `data`; blocks while `limit` bytes are held, until the guest takes some
        or the gate is closed."""
        with self._cond:
            while data:
                if self.closed:
                    self.dropped += len(data)
                    return
                if self.is_open and not self._held:
                    taken = self._feed(data)        # straight to the UART when it has room
                    data = data[taken:]
                    if not data:
                        return
                room = self.limit - len(self._held)
                if room <= 0:
                    self._cond.wait()               # backpressure: stop reading stdin
                    continue
                self._held += data[:room]
                data = data[room:]

    def open(self) -> None:
        self.is_open = True
        self.pump()

    def pump(self) -> None:
        """Pass held bytes on as far as the UART accepts them (run-loop thread)."""
        if not self._held:                          # unlocked peek: feed() appends later
            return
        with self._cond:
            if not self.is_open or not self._held:
                return
            taken = self._feed(bytes(self._held))
            if taken:
                del self._held[:taken]
                self._cond.notify_all()

    def close(self) -> None:
        """The run is over: release a blocked `feed()`; later input is dropped."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
