"""The console between the UART and the user: the exit marker, panic watch, tail, and
the input gate (with a real pipe and the real stdin reader thread)."""

from __future__ import annotations

import os
import threading
import time

from hypothesis import example, given
from hypothesis import strategies as st

from pyhv.console import Console
from pyhv.exitmarker import ExitMarker
from pyhv.terminal import InputGate, Terminal

MARKER = ExitMarker("0123456789abcdef")


def run(data: bytes, *, marker: ExitMarker | None = MARKER,
        chunks: int = 1) -> tuple[bytes, Console]:
    out = bytearray()
    c = Console(out.extend, exit_marker=marker)
    step = max(1, len(data) // chunks)
    for i in range(0, len(data), step):
        c.write(data[i:i + step])
    c.finish()
    return bytes(out), c


def test_marker_line_is_hidden_and_parsed() -> None:
    out, c = run(b"hello\r\n" + MARKER.text(7) + b"\r\n[ 1.5] reboot: System halted\r\n")
    assert out == b"hello\r\n"
    assert c.exit_status == 7


def test_marker_mid_line_ends_the_output() -> None:
    """`printf abc`: the marker follows the output on the same line."""
    out, c = run(b"abc" + MARKER.text(0) + b"\r\n@@PYHV-EXIT 0@@\r\n")
    assert (out, c.exit_status) == (b"abc", 0)


def test_marker_is_shown_when_not_hiding() -> None:
    data = b"a\n" + MARKER.text(3) + b"\n"
    out, c = run(data, marker=None)
    assert out == data and c.exit_status is None


def test_marker_lookalikes_are_output() -> None:
    """Only this run's marker counts: the plain /init marker, another nonce, a bad
    status or a cut-off marker are the command's output, and nothing after is muted."""
    data = (b"@home\n@@PYHV-EXIT 0@@\n" + ExitMarker("fedcba9876543210").text(1)
            + b"\n" + MARKER.prefix + b"x@@\n" + MARKER.prefix + b"1234@@\n"
            + MARKER.prefix[:-3] + b"\n@" + b"@" * 100 + b"\nafter\n")
    out, c = run(data)
    assert out == data and c.exit_status is None


def test_exit_status_is_a_byte() -> None:
    _, c = run(MARKER.text(300) + b"\n")
    assert c.exit_status == 300 & 0xFF


@given(st.binary(max_size=300), st.integers(min_value=0, max_value=255),
       st.binary(max_size=40), st.integers(min_value=1, max_value=9))
@example(b"abc@@PYHV-EXIT-0123", 0, b"", 3)
@example(b"@", 5, b"\r\n@@PYHV-EXIT 5@@\r\n", 7)
def test_output_before_the_marker_passes_exactly(before: bytes, status: int, after: bytes,
                                                 chunks: int) -> None:
    """Whatever precedes the marker, however the UART's bytes are grouped, is passed on
    unchanged; the status is found; nothing after the marker is passed on."""
    data = before + MARKER.text(status) + after
    out, c = run(data, chunks=chunks)
    assert c.exit_status == status
    assert out == before


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=7))
def test_output_without_marker_passes_unchanged(data: bytes, chunks: int) -> None:
    out, c = run(data, chunks=chunks)
    assert out == data and c.exit_status is None


def test_the_wrapper_prints_no_marker_itself() -> None:
    """The wrapper reaches the guest (base64 on the command line): printing its text,
    decoded, must not end the run."""
    script = MARKER.wrap("printf abc; exit 3").encode()
    assert MARKER.nonce.encode() in script
    assert MARKER.parse(script) is None
    assert ExitMarker().wrap("true") == "true"        # the plain marker: no wrapper


def test_partial_line_is_passed_on_at_once() -> None:
    out = bytearray()
    c = Console(out.extend, exit_marker=MARKER)
    c.write(b"pyhv:/# ")
    assert out == b"pyhv:/# "       # a prompt shows without a newline or a flush
    c.write(b"@@PYH")
    assert out == b"pyhv:/# "       # held while it may be the marker, even mid-line
    c.write(b"W")
    assert out == b"pyhv:/# @@PYHW"  # not the marker after all: passed on in order


def test_panic_reported_once_when_report_ends() -> None:
    seen: list[str] = []
    c = Console(lambda _b: None, on_panic=seen.append)
    c.write(b"[ 1.0] Kernel panic - not syncing: VFS: Unable to mount root fs\n")
    assert c.panic == "Kernel panic - not syncing: VFS: Unable to mount root fs"
    assert seen == []
    c.write(b"stack...\n[ 1.1] ---[ end Kernel panic - not syncing: VFS ]---\n")
    c.write(b"---[ end Kernel panic again\n")
    assert seen == [c.panic]


def test_tail_keeps_the_last_lines_bounded() -> None:
    c = Console(lambda _b: None)
    for i in range(100):
        c.write(f"line {i}\r\n".encode())
    c.write(b"x" * 10000)
    tail = c.tail(3)
    assert tail[:2] == ["line 98", "line 99"]
    assert len(tail[2]) <= 4096


def test_input_gate_holds_until_open_and_keeps_order() -> None:
    got = bytearray()

    def feed(data: bytes) -> int:
        take = min(len(data), 4)           # a UART that takes 4 bytes at a time
        got.extend(data[:take])
        return take

    g = InputGate(feed)
    g.feed(b"echo ")
    g.feed(b"hi\n")
    assert got == b""
    g.open()
    assert got == b"echo"
    for _ in range(5):
        g.pump()
    assert got == b"echo hi\n"
    g.feed(b"ls\n")
    g.pump()
    assert got == b"echo hi\nls\n"


def test_piped_input_beyond_the_gates_limit_is_not_lost() -> None:
    """Backpressure through a real pipe and the real stdin reader: while the gate holds
    its limit, the reader stops reading, the writer into the pipe waits, and once the
    guest listens every byte arrives, in order; nothing is dropped."""
    limit = 64 << 10
    data = bytes(i * 7 % 251 for i in range(5 * limit))
    got = bytearray()
    uart_room = 100                                  # the UART takes a little at a time

    def uart(chunk: bytes) -> int:
        got.extend(chunk[:uart_room])
        return min(len(chunk), uart_room)

    gate = InputGate(uart, limit=limit)
    fed = [0]                                        # bytes the reader has handed on

    def on_input(chunk: bytes) -> None:
        gate.feed(chunk)
        fed[0] += len(chunk)

    r, w = os.pipe()
    term = Terminal(on_input, lambda: None, fd=r)

    def writer() -> None:
        with os.fdopen(w, "wb") as f:
            f.write(data)                            # blocks while pyhv does not read

    t = threading.Thread(target=writer, daemon=True)
    deadline = time.monotonic() + 60                 # a hang guard, not a measurement
    try:
        term.open()
        t.start()
        while gate.held < limit:                     # the guest is not listening yet
            assert time.monotonic() < deadline
            threading.Event().wait(0.01)
        gate.open()
        while not (fed[0] == len(data) and gate.held == 0):
            assert time.monotonic() < deadline, (fed[0], gate.held, len(got))
            gate.pump()
        t.join(10)
    finally:
        term.close()
        gate.close()
        os.close(r)
    assert gate.dropped == 0
    assert bytes(got) == data


def test_a_closed_gate_releases_a_blocked_feed() -> None:
    gate = InputGate(lambda d: len(d), limit=10)
    t = threading.Thread(target=gate.feed, args=(b"x" * 25,))
    t.start()
    while gate.held < 10:
        threading.Event().wait(0.01)
    gate.close()
    t.join(10)
    assert not t.is_alive() and gate.dropped == 15
