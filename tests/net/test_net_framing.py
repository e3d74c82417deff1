"""The stream framing (Deframer) and the bounded frame queue, with hypothesis.

Any stream of frames of any length (runts, every size up to MAX_FRAME, oversize), cut
into any chunks, comes out as exactly the in-limit frames in order, with the others
counted; the Deframer never holds more than one partial frame.
"""

from __future__ import annotations

import struct

from hypothesis import example, given
from hypothesis import strategies as st

from pyhv.net.framequeue import FrameQueue
from pyhv.net.framing import MAX_FRAME, MIN_FRAME, Deframer, encode

SIZES = st.one_of(st.integers(0, 80), st.integers(1500, 1530),
                  st.integers(MAX_FRAME - 20, MAX_FRAME + 20), st.integers(0, MAX_FRAME))


def _frame(n: int, tag: int) -> bytes:
    return bytes((tag + i) & 0xFF for i in range(n))


@given(st.lists(SIZES, max_size=8), st.lists(st.integers(1, 70000), min_size=1, max_size=20))
@example([MAX_FRAME, MAX_FRAME + 1, MIN_FRAME - 1, MIN_FRAME], [1])
@example([65536, 0, 14], [3, 5, 65539])
def test_deframer_any_chunking(sizes: list[int], cuts: list[int]) -> None:
    frames = [_frame(n, i) for i, n in enumerate(sizes)]
    stream = b"".join(encode(f) for f in frames)
    d = Deframer()
    out: list[bytes] = []
    pos, k = 0, 0
    while pos < len(stream):
        step = cuts[k % len(cuts)]
        k += 1
        out += d.feed(stream[pos:pos + step])
        assert d.buffered <= MAX_FRAME + 4
        pos += step
    assert out == [f for f in frames if MIN_FRAME <= len(f) <= MAX_FRAME]
    assert d.oversize == sum(len(f) > MAX_FRAME for f in frames)
    assert d.runts == sum(len(f) < MIN_FRAME for f in frames)
    assert d.buffered == 0


@given(st.binary(max_size=4096), st.integers(1, 300))
def test_deframer_garbage_never_raises_and_stays_bounded(data: bytes, step: int) -> None:
    d = Deframer()
    for i in range(0, len(data), step):
        for f in d.feed(data[i:i + step]):
            assert MIN_FRAME <= len(f) <= MAX_FRAME
        assert d.buffered <= MAX_FRAME + 4


def test_oversize_length_is_skipped_without_buffering() -> None:
    d = Deframer()
    huge = 0xFFFFFFF0
    assert d.feed(struct.pack("!I", huge) + b"x" * 100_000) == []
    assert d.oversize == 1 and d.buffered == 0


def test_reset_forgets_a_partial_frame() -> None:
    d = Deframer()
    d.feed(encode(_frame(100, 1))[:50])
    d.reset()
    assert d.feed(encode(_frame(60, 2))) == [_frame(60, 2)]


@given(st.lists(st.one_of(st.integers(0, 2000).map(lambda n: ("put", n)),
                          st.just(("get", 0))), max_size=200))
def test_frame_queue_bounds_and_order(ops: list[tuple[str, int]]) -> None:
    q = FrameQueue(max_frames=8, max_bytes=5000)
    model: list[bytes] = []
    for i, (op, n) in enumerate(ops):
        if op == "put":
            f = _frame(n, i)
            fits = len(model) < 8 and sum(map(len, model)) + n <= 5000
            assert q.put(f) == (fits, fits and not model)
            if fits:
                model.append(f)
        else:
            assert q.get() == (model.pop(0) if model else None)
        assert len(q) == len(model) <= 8
        assert q.bytes == sum(map(len, model)) <= 5000
