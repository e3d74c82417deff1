"""The timer queue: deadline order, cancel, and bounded size under a hostile guest."""

from __future__ import annotations

from pyhv.clock import TimerQueue, VirtualClock


def test_fires_in_deadline_order_once() -> None:
    c = VirtualClock()
    q = TimerQueue(c)
    seen: list[str] = []
    q.schedule(30, lambda: seen.append("c"))
    q.schedule(10, lambda: seen.append("a"))
    q.schedule(20, lambda: seen.append("b"))
    assert q.next_deadline() == 10
    c.advance(25)
    assert q.fire_due() == 2 and seen == ["a", "b"]
    c.advance(100)
    assert q.fire_due() == 1 and q.fire_due() == 0
    assert seen == ["a", "b", "c"] and q.next_deadline() is None and len(q) == 0


def test_cancelled_timer_never_fires() -> None:
    c = VirtualClock()
    q = TimerQueue(c)
    fired: list[int] = []
    h = q.schedule(10, lambda: fired.append(1))
    q.schedule(20, lambda: fired.append(2))
    q.cancel(h)
    assert q.next_deadline() == 20
    c.advance(50)
    q.fire_due()
    assert fired == [2]


def test_reprogramming_in_a_loop_stays_bounded() -> None:
    """A guest rewriting RTC/PIT registers re-arms and cancels timers far in the future;
    the cancelled entries must not pile up (they used to, until their deadline)."""
    c = VirtualClock()
    q = TimerQueue(c)
    for _ in range(100_000):
        q.cancel(q.schedule(10**9, lambda: None))
    assert len(q) == 0
    assert len(q._heap) < 200 and len(q._cancelled) < 200


def test_cancel_after_firing_is_a_no_op() -> None:
    c = VirtualClock()
    q = TimerQueue(c)
    handles = [q.schedule(1, lambda: None) for _ in range(1000)]
    c.advance(5)
    assert q.fire_due() == 1000
    for h in handles:
        q.cancel(h)                       # a device cancelling a timer that already fired
    assert not q._cancelled and not q._heap
