"""Guest time: a clock the devices read and a queue of timers the run loop fires.

Design: timer devices (8254 PIT, CMOS RTC, later the local APIC timer) never read the
host clock themselves. They read `clock.now_ns()` and arm callbacks on a `TimerQueue`.
The run loop asks the queue for the next deadline, makes the engine return by then
(KVM: a host timer kicks the vCPU; the software CPU: it stops itself), and calls
`fire_due()` after each exit.

Two clocks:
- `HostClock`: guest time is host monotonic time (what a hardware engine gives).
- `VirtualClock`: guest time advances only when the engine says the guest made progress
  (`advance(ns)`, e.g. from executed instructions) or when the guest halts and the run
  loop skips to the next deadline (`skip_to`). A slow software CPU then still sees a
  sensible timer rate instead of a storm of overdue ticks starving everything else.

Invariants: `now_ns()` never goes backwards (but `restore`, which sets a machine's
clock to a saved time before it runs); callbacks run on the run-loop thread, in
deadline order, each at most once per arming.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Protocol


class Clock(Protocol):
    def now_ns(self) -> int: ...


class HostClock:
    """Guest time = host monotonic time since the clock was created."""

    def __init__(self) -> None:
        self._t0 = time.monotonic_ns()

    def now_ns(self) -> int:
        return time.monotonic_ns() - self._t0

    def restore(self, now_ns: int) -> None:
        """Continue from a saved guest time (a snapshot or migration, before the run)."""
        self._t0 = time.monotonic_ns() - now_ns


class VirtualClock:
    """Guest time that advances with guest progress, not with the host's wall clock."""

    def __init__(self) -> None:
        self._now = 0
        self._lock = threading.Lock()

    def now_ns(self) -> int:
        return self._now

    def advance(self, ns: int) -> None:
        if ns > 0:
            with self._lock:
                self._now += ns

    def restore(self, now_ns: int) -> None:
        """Continue from a saved guest time (a snapshot or migration, before the run)."""
        with self._lock:
            self._now = now_ns

    def skip_to(self, t_ns: int) -> None:
        """Jump forward to t_ns (HLT with a timer armed); never backwards."""
        with self._lock:
            if t_ns > self._now:
                self._now = t_ns


class TimerQueue:
    """Deadline-ordered one-shot callbacks on a Clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._heap: list[tuple[int, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cancelled: set[int] = set()
        self._live: set[int] = set()      # armed, neither fired nor cancelled
        self._lock = threading.Lock()
        self.fired = 0

    def schedule(self, deadline_ns: int, callback: Callable[[], None]) -> int:
        """Arm callback at deadline_ns (guest time); returns a handle for cancel()."""
        handle = next(self._seq)
        with self._lock:
            heapq.heappush(self._heap, (deadline_ns, handle, callback))
            self._live.add(handle)
        return handle

    def cancel(self, handle: int) -> None:
        """Disarm a timer; a handle that already fired or was cancelled is ignored.

        Cancelled entries leave the heap lazily, but never outnumber the live ones by
        much: a guest reprogramming a timer in a loop cannot grow the queue without bound.
        """
        with self._lock:
            if handle not in self._live:
                return
            self._live.discard(handle)
            self._cancelled.add(handle)
            if len(self._cancelled) > 64 and len(self._cancelled) * 2 > len(self._heap):
                self._heap = [e for e in self._heap if e[1] not in self._cancelled]
                heapq.heapify(self._heap)
                self._cancelled.clear()

    def __len__(self) -> int:
        """Armed timers."""
        return len(self._live)

    def next_deadline(self) -> int | None:
        with self._lock:
            while self._heap and self._heap[0][1] in self._cancelled:
                self._cancelled.discard(heapq.heappop(self._heap)[1])
            return self._heap[0][0] if self._heap else None

    def fire_due(self) -> int:
        """Run every callback whose deadline has passed; returns how many ran."""
        now = self.clock.now_ns()
        ran = 0
        while True:
            with self._lock:
                if not self._heap or self._heap[0][0] > now:
                    break
                _, handle, cb = heapq.heappop(self._heap)
                if handle in self._cancelled:
                    self._cancelled.discard(handle)
                    continue
                self._live.discard(handle)
            cb()
            ran += 1
        self.fired += ran
        return ran
