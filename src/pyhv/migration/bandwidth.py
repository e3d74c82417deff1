"""Bandwidth: measure what the link carries, and hold a sender to a limit.

`Meter` times one round's transfer: `rate()` is bytes per second over the round so far
(the effective rate, encoding included: what matters for the downtime estimate).
`Limiter(limit)` sleeps the sender so that the bytes sent since `start()` never get ahead
of `limit` bytes per second (None: no limit); `throttle(sent)` is called after each
record. Units: bytes and seconds; the CLI's MBPS is 10^6 bytes per second.
"""

from __future__ import annotations

import time

MB = 1_000_000


class Meter:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.bytes = 0

    def add(self, n: int) -> None:
        self.bytes += n

    def elapsed(self) -> float:
        return max(time.monotonic() - self.t0, 1e-6)

    def rate(self) -> float:
        return self.bytes / self.elapsed()


class Limiter:
    def __init__(self, limit: float | None) -> None:
        self.limit = limit
        self.t0 = time.monotonic()
        self.sent = 0

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.sent = 0

    def throttle(self, n: int) -> None:
        self.sent += n
        if self.limit is None:
            return
        ahead = self.sent / self.limit - (time.monotonic() - self.t0)
        if ahead > 0:
            time.sleep(ahead)
