"""The runner's bounds and its distrust of guest values, on each engine that runs here."""

from __future__ import annotations

import time

import pytest
from popek_env import EMU_WHY, KVM_WHY

from pyhv.popek import layout as L
from pyhv.popek.snippet import run_snippet

pytestmark = pytest.mark.timeout(60)

ENGINES = [pytest.param("kvm", marks=pytest.mark.skipif(
               KVM_WHY is not None, reason=f"needs a usable /dev/kvm: {KVM_WHY}")),
           pytest.param("emu", marks=pytest.mark.skipif(
               EMU_WHY is not None, reason=f"needs the emu engine: {EMU_WHY}"))]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_looping_snippet_is_stopped_by_the_watchdog(engine: str) -> None:
    t0 = time.monotonic()
    r = run_snippet(engine, b"\xeb\xfe", timeout=0.5)          # jmp $
    assert r.end == "error" and "watchdog" in r.detail
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("engine", ENGINES)
def test_a_fault_frame_is_decoded_from_the_monitors_stack(engine: str) -> None:
    r = run_snippet(engine, b"\x90\x0f\x0b")                   # nop; ud2
    assert (r.end, r.vector, r.error_code) == ("exception", 6, None)
    assert r.fault_rip == L.CODE + 1 and r.fault_cs is not None and r.fault_cs & 3 == 3


@pytest.mark.parametrize("engine", ENGINES)
def test_an_unexpected_mmio_write_is_an_error(engine: str) -> None:
    # mov byte [0x40000800], 0: MMIO that is neither DONE nor a stub's
    r = run_snippet(engine, b"\xc6\x04\x25\x00\x08\x00\x40\x00")
    assert r.end == "error" and "0x40000800" in r.detail


@pytest.mark.skipif(EMU_WHY is not None, reason=f"needs the emu engine: {EMU_WHY}")
def test_a_frame_off_the_expected_stack_is_not_read() -> None:
    # mov rsp, 0x100000 then ud2 at CPL 0 (the reference view, run on emu): the CPU pushes
    # the frame on that stack, outside the one the runner trusts, so it is not decoded
    code = b"\x48\xc7\xc4\x00\x00\x10\x00" + b"\x0f\x0b"
    r = run_snippet("emu", code, cpl0=True)
    assert r.end == "exception" and r.vector == 6
    assert r.fault_rip is None and "not on the expected stack" in r.detail


@pytest.mark.parametrize("engine", ENGINES)
def test_oversized_input_is_refused(engine: str) -> None:
    with pytest.raises(ValueError):
        run_snippet(engine, b"\x90" * L.CODE_MAX)
