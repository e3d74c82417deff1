"""Random bytes as guest kernel code under binary translation (and trap, as a peer).

The bytes follow a small prologue in a 64-bit ELF kernel (entered in long mode at CPL
0, as every bt guest is): whatever they decode to (privileged instructions, far
branches, self-modifying stores, jumps into the middle of themselves or into the
translator's area, garbage the decoder refuses), the run must end with one of the
statuses pyhv promises, in time, with no thread left (tests/fuzz/fuzzkit.check).
"""

from __future__ import annotations

import struct
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))

from fuzzkit import CountingSink, Outcome, check, fuzz_settings, queue_lengths  # noqa: E402

from pyhv.engines import engine_class  # noqa: E402
from pyhv.machine import Machine, MachineConfig  # noqa: E402
from pyhv.runner import Runner  # noqa: E402

BASE = 0x100000
TIMEOUT = 1.0
# lea rsp, [rip + 0x2000]: a stack in the same loaded segment, well past the code
PROLOGUE = bytes.fromhex("488d2500200000")
EPILOGUE = b"\xfa\xf4"                       # cli; hlt


def elf64(body: bytes) -> bytes:
    """A one-segment ELF64 executable at BASE: PROLOGUE, body, cli; hlt (RWX, 16 KiB)."""
    code = (PROLOGUE + body + EPILOGUE).ljust(0x4000, b"\0")
    ehdr = struct.pack("<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, 2, 0x3E, 1,
                       BASE, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 7, 0x1000, BASE, BASE, len(code), len(code), 0x1000)
    return (ehdr + phdr).ljust(0x1000, b"\0") + code


def run_kernel(tmp: Path, body: bytes, engine: str) -> Outcome:
    img = tmp / f"fuzz-{threading.get_ident()}-{time.monotonic_ns()}.elf"
    img.write_bytes(elf64(body))
    before = set(threading.enumerate())
    sink = CountingSink()
    m = Machine(MachineConfig(kernel=img, format="elf64", engine=engine, mem_size=8 << 20),
                sink)
    try:
        t = time.monotonic()
        res = Runner(m, timeout=TIMEOUT).run()
        elapsed = time.monotonic() - t
        queues = queue_lengths(m)
    finally:
        m.close()
        img.unlink()
    out = Outcome(res, elapsed, sink.n, queues)
    check(out, TIMEOUT, before)
    assert "bt engine failure" not in (res.detail or "") and res.status != 70, res
    return out


def _engines() -> list[object]:
    out: list[object] = []
    for name in ("bt", "trap"):
        why = engine_class(name).probe()
        out.append(pytest.param(name, marks=[pytest.mark.kvm, pytest.mark.skipif(
            why is not None, reason=f"engine {name} unavailable: {why}")]))
    return out


@pytest.mark.parametrize("engine", _engines())
def test_random_kernel_code(engine: str, tmp_path: Path) -> None:
    @fuzz_settings(6)  # type: ignore[misc]
    @given(body=st.binary(min_size=1, max_size=96))
    def inner(body: bytes) -> None:
        run_kernel(tmp_path, body, engine)
    inner()


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("engine", _engines())
def test_random_kernel_code_slow(engine: str, tmp_path: Path) -> None:
    @fuzz_settings(300)  # type: ignore[misc]
    @given(body=st.binary(min_size=1, max_size=96))
    def inner(body: bytes) -> None:
        run_kernel(tmp_path, body, engine)
    inner()
