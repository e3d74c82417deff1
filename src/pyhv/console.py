"""The guest's console output on its way to the user: what pyhv shows, keeps and watches.

Design: the UART hands every transmitted byte to `Console.write`. The console
- forwards it to a sink (pyhv.outflow's pump to stdout, a test's buffer) as it comes, so a
  prompt without a newline appears even if the guest then computes without exiting;
- keeps the last lines (`tail()`), which pyhv prints when a run times out or crashes;
- watches for Linux's panic banner (`Kernel panic - not syncing: ...`) and for the end of
  the panic report, calling `on_panic` once the report is complete;
- with an `exit_marker` (pyhv.exitmarker: `--command`), finds that marker anywhere in the
  output, even in the middle of a line, records its status in `exit_status` and passes
  on neither the marker nor anything after it (the guest shutting down). Output is held
  back only while it could still turn out to be the marker (a few dozen bytes at most).

Invariants: bytes reach the sink in the order the guest sent them, minus only the marker
and what follows it; memory use is bounded (a line longer than MAX_LINE is cut for
`tail()` and the panic check, never for the sink).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable

from pyhv.exitmarker import ExitMarker

MAX_LINE = 4096
TAIL_LINES = 20
PANIC_RE = re.compile(rb"Kernel panic - not syncing: ?(.*)")
PANIC_END = b"---[ end Kernel panic"


class Console:
    def __init__(self, sink: Callable[[bytes], None], *, exit_marker: ExitMarker | None = None,
                 on_panic: Callable[[str], None] | None = None) -> None:
        self.sink = sink
        self.on_panic = on_panic
        self.exit_status: int | None = None
        self.panic: str | None = None
        self.bytes_out = 0
        self.muted = False               # set after the exit marker: output is dropped
        self._scanner = exit_marker.scanner() if exit_marker is not None else None
        self._line = bytearray()         # the current line (for tail/panic)
        self._lines: deque[bytes] = deque(maxlen=TAIL_LINES)
        self._panic_reported = False

    def write(self, data: bytes) -> None:
        self.bytes_out += len(data)
        for b in data:                   # the UART sends one byte at a time
            if b == 0x0A:
                self._end_line()
            elif len(self._line) < MAX_LINE:
                self._line.append(b)
        if self.muted:
            return
        sc = self._scanner
        if sc is not None:
            data = sc.feed(data)
            if sc.status is not None:
                self.exit_status = sc.status
                self.muted = True        # what follows is the guest shutting down
        if data:
            self.sink(data)              # at once: a guest may print a prompt and spin

    def _end_line(self) -> None:
        line = bytes(self._line)
        self._line.clear()
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

    def finish(self) -> None:
        """The run is over: release anything held back (it was not the marker)."""
        if self._scanner is not None and not self.muted:
            rest = self._scanner.finish()
            if rest:
                self.sink(rest)

    def tail(self, n: int = 10) -> list[str]:
        """The last n complete lines (and the partial one), decoded for messages."""
        lines = list(self._lines)
        if self._line:
            lines.append(bytes(self._line))
        return [ln.decode("utf-8", "replace") for ln in lines[-n:]]
