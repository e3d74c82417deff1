"""Auto-converge: slow the source's vCPUs when the guest dirties RAM faster than the
link carries it, so that pre-copy converges.

Design (QEMU's cpu-throttle idea): a thread pauses the VM for `fraction` of every
PERIOD_S and lets it run the rest, through the Runner's pause/resume (a safe point:
between exits). `adjust(dirty_bps, link_bps)` is called after each round: when the
guest dirtied more than DIRTY_SHARE of what the link carried, the fraction rises by
STEP (from INITIAL), up to MAX; it never falls during one migration. `stop()` ends the
thread and leaves the VM running (resumed) unless someone else paused it meanwhile.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyhv.runner import Runner

PERIOD_S = 0.02
INITIAL = 0.2
STEP = 0.1
MAX = 0.99
DIRTY_SHARE = 0.5


class Throttle:
    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.fraction = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.paused_s = 0.0

    def adjust(self, dirty_bps: float, link_bps: float) -> None:
        if dirty_bps <= DIRTY_SHARE * link_bps:
            return
        self.fraction = INITIAL if self.fraction == 0 else min(MAX, self.fraction + STEP)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="pyhv-throttle",
                                            daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            off = PERIOD_S * self.fraction
            self.runner.pause()
            self._stop.wait(off)
            self.paused_s += off
            self.runner.resume()
            self._stop.wait(PERIOD_S - off)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
