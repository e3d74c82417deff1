"""The console's way to stdout (pyhv.outflow) over real pipes: a reader that never reads
cannot block the writer, a reader that reads gets every byte in order, a reader that
leaves is noticed once."""

from __future__ import annotations

import os
import threading

from pyhv.outflow import OutputPump


def pattern(n: int, start: int = 0) -> bytes:
    return bytes((start + i) % 251 for i in range(n))


def test_an_unread_pipe_never_blocks_write() -> None:
    """Far more than the pipe and the buffer hold: every write() returns, the excess is
    dropped and counted, on_drop is called exactly once, close() gives up."""
    r, w = os.pipe()
    warnings: list[int] = []
    pump = OutputPump(w, limit=32 << 10, on_drop=lambda: warnings.append(1))
    try:
        total = 0
        for i in range(64):                       # 4 MiB against 64 KiB + 32 KiB
            pump.write(pattern(64 << 10, i))
            total += 64 << 10
        pump.close(grace_s=0.2)
        assert warnings == [1]
        assert pump.dropped > 0 and pump.written + pump.dropped == total
    finally:
        os.close(r)
        os.close(w)


def test_a_reading_reader_gets_every_byte_in_order() -> None:
    r, w = os.pipe()
    got = bytearray()

    def reader() -> None:
        while chunk := os.read(r, 1 << 16):
            got.extend(chunk)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    data = pattern(3 << 20)
    pump = OutputPump(w, limit=len(data))         # room for all: nothing may be dropped
    for i in range(0, len(data), 997):            # the UART's way: small pieces
        pump.write(data[i:i + 997])
    pump.close(grace_s=10)
    os.close(w)
    t.join(10)
    os.close(r)
    assert pump.dropped == 0
    assert bytes(got) == data


def test_a_reader_that_leaves_is_noticed_once_and_quietly() -> None:
    r, w = os.pipe()
    closed = threading.Event()
    calls: list[int] = []

    def on_closed() -> None:
        calls.append(1)
        closed.set()

    pump = OutputPump(w, on_closed=on_closed,
                      on_error=lambda e: calls.append(100))
    try:
        pump.write(b"x" * 10)
        assert os.read(r, 10) == b"x" * 10       # `| head -c 10`
        os.close(r)
        pump.write(b"more output")
        assert closed.wait(10)
        pump.write(b"even more")                  # after the end: dropped, no error
        pump.close(grace_s=0.2)
    finally:
        os.close(w)
    assert calls == [1] and pump.closed_by_reader
