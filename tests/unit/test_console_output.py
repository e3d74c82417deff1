"""The console between the UART and the user: marker hiding, panic watch, tail, input gate."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pyhv.console import Console
from pyhv.terminal import InputGate


def run(data: bytes, *, hide: bool = True, chunks: int = 1) -> tuple[bytes, Console]:
    out = bytearray()
    c = Console(out.extend, hide_exit_marker=hide)
    step = max(1, len(data) // chunks)
    for i in range(0, len(data), step):
        c.write(data[i:i + step])
    c.finish()
    return bytes(out), c


def test_marker_line_is_hidden_and_parsed() -> None:
    out, c = run(b"hello\r\n@@PYHV-EXIT 7@@\r\n[ 1.5] reboot: System halted\r\n")
    assert out == b"hello\r\n"
    assert c.exit_status == 7


def test_marker_is_shown_when_not_hiding() -> None:
    data = b"a\n@@PYHV-EXIT 3@@\n"
    out, c = run(data, hide=False)
    assert out == data and c.exit_status is None


def test_lines_starting_with_at_are_not_swallowed() -> None:
    data = b"@home\n@@PYHV-EXIT x@@\n@@PYHV-EXIT 12@@ trailing\n@" + b"@" * 100 + b"\n"
    out, c = run(data)
    assert out == data and c.exit_status is None


def test_exit_status_is_a_byte() -> None:
    _, c = run(b"@@PYHV-EXIT 300@@\n")
    assert c.exit_status == 300 & 0xFF


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=7))
def test_output_without_marker_passes_unchanged(data: bytes, chunks: int) -> None:
    out, c = run(data.replace(b"@@PYHV", b"@@PYHW"), chunks=chunks)
    assert out == data.replace(b"@@PYHV", b"@@PYHW")


def test_partial_line_is_passed_on_at_once() -> None:
    out = bytearray()
    c = Console(out.extend, hide_exit_marker=True)
    c.write(b"pyhv:/# ")
    assert out == b"pyhv:/# "       # a prompt shows without a newline or a flush
    c.write(b"@@PYH")
    assert out == b"pyhv:/# @@PYH"  # not at a line start: never held
    c.write(b"\n@@PYH")
    assert out == b"pyhv:/# @@PYH\n"  # at a line start: held while it may be the marker


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


def test_input_gate_is_bounded() -> None:
    g = InputGate(lambda d: len(d), limit=10)
    g.feed(b"x" * 25)
    assert g.dropped == 15
