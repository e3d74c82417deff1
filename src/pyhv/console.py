"""The guest's console output on its way to the user: what pyhv shows, keeps and watches.

Design: the UART hands every transmitted byte to `Console.write`. The console
- forwards it to a sink (the terminal, a pipe, a test's buffer) as it comes, so a prompt
  without a newline appears even if the guest then computes without exiting;
- keeps the last lines (`tail()`), which pyhv prints when a run times out or crashes;
- watches for Linux's panic banner (`Kernel panic - not syncing: ...`) and for the end of
  the panic report, calling `on_panic` once the report is complete;
- with `hide_exit_marker`, swallows the `@@PYHV-EXIT n@@` line that pyhv's /init prints
  after a `--command` and records n in `exit_status`; what the guest prints after it (its
  shutdown) is dropped too. Output is held back only while it could still turn out to be
  that line (it starts with `@`), never longer than a line.

Invariants: bytes reach the sink in the order the guest sent them, minus only a complete
marker line; memory use is bounded (a line longer than MAX_LINE is cut for `tail()` and
the panic check, never for the sink).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable

MAX_LINE = 4096
TAIL_LINES = 20
PANIC_RE = re.compile(rb"Kernel panic - not syncing: ?(.*)")
PANIC_END = b"---[ end Kernel panic"
MARKER_RE = re.compile(rb"^@@PYHV-EXIT (\d+)@@\r?$")
MARKER_PREFIX = b"@@PYHV-EXIT "
MAX_MARKER = 32


class Console:
    def __init__(self, sink: Callable[[bytes], None], *, hide_exit_marker: bool = False,
                 on_panic: Callable[[str], None] | None = None) -> None:
        self.sink = sink
        self.hide_exit_marker = hide_exit_marker
        self.on_panic = on_panic
        self.exit_status: int | None = None
        self.panic: str | None = None
        self.bytes_out = 0
        self.muted = False               # set after the exit marker: output is dropped
        self._out = bytearray()          # waiting for flush
        self._line = bytearray()         # the current line (for tail/panic/marker)
        self._held = bytearray()         # part of the current line held back (marker?)
        self._lines: deque[bytes] = deque(maxlen=TAIL_LINES)
        self._panic_reported = False

    def write(self, data: bytes) -> None:
        for b in data:                   # the UART sends one byte at a time
            self._byte(b)
        self.flush()                     # at once: a guest may print a prompt and spin

    def _byte(self, b: int) -> None:
        self.bytes_out += 1
        if b == 0x0A:
            self._end_line()
            return
        if len(self._line) < MAX_LINE:
            self._line.append(b)
        if self.hide_exit_marker and (self._held or (not self._line[:-1] and b == 0x40)):
            self._held.append(b)
            if (len(self._held) > MAX_MARKER
                    or not MARKER_PREFIX.startswith(bytes(self._held[:len(MARKER_PREFIX)]))):
                self._out += self._held      # not the marker after all
                self._held.clear()
            return
        self._out.append(b)

    def _end_line(self) -> None:
        line = bytes(self._line)
        self._line.clear()
        if self._held:
            m = MARKER_RE.match(bytes(self._held))
            if m is not None:
                self.exit_status = int(m.group(1)) & 0xFF
                self._held.clear()
                self.flush()
                self.muted = True        # what follows is the guest shutting down
                return
            self._out += self._held
            self._held.clear()
        self._out.append(0x0A)
        self._lines.append(line.rstrip(b"\r"))
        self._watch(line)

    def _watch(self, line: bytes) -> None:
        if self.panic is None:
            m = PANIC_RE.search(line)
            if m is not None:
                self.panic = line[m.start():].decode("utf-8", "replace").strip()
        elif PANIC_END in line and not self._panic_reported:
            self._panic_reported = True
            if self.on_panic is not None:
                self.on_panic(self.panic)

    def flush(self) -> None:
        if self._out and self.muted:
            self._out.clear()
        if self._out:
            data = bytes(self._out)
            self._out.clear()
            self.sink(data)

    def finish(self) -> None:
        """The run is over: release anything held back and flush."""
        if self._held:
            self._out += self._held
            self._held.clear()
        if self._line:
            self._lines.append(bytes(self._line).rstrip(b"\r"))
            self._line.clear()
        self.flush()

    def tail(self, n: int = 10) -> list[str]:
        """The last n complete lines (and the partial one), decoded for messages."""
        lines = list(self._lines)
        if self._line:
            lines.append(bytes(self._line))
        return [ln.decode("utf-8", "replace") for ln in lines[-n:]]
