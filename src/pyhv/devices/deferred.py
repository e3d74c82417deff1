"""Calls handed to the run-loop thread from other threads (device I/O threads).

Design: device models are touched only on the run-loop thread (pyhv.runner), but some
work happens elsewhere (a disk request on an I/O thread). Such a thread `post`s a
callable here; the run loop runs everything posted in `run_pending()` (the machine's
`poll_devices`, after every exit and while idle). `post` also calls the `waker` (the
runner sets it to its kick: it wakes an idle loop and stops a running vCPU at the next
block), so a completion reaches the guest promptly even while it computes or halts.

Invariants: calls run in the order they were posted, on the thread that calls
`run_pending`; `post` never blocks (a deque append and the waker); the deque holds at
most what the devices have in flight (each device bounds that by its queue size).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable


class DeferredCalls:
    def __init__(self) -> None:
        self._calls: deque[Callable[[], None]] = deque()
        self.waker: Callable[[], None] = lambda: None

    def post(self, fn: Callable[[], None]) -> None:
        """Any thread: run fn on the run-loop thread soon."""
        self._calls.append(fn)
        self.waker()

    def run_pending(self) -> int:
        """Run-loop thread: run what was posted; returns how many ran."""
        n = 0
        calls = self._calls
        while calls:
            calls.popleft()()
            n += 1
        return n
