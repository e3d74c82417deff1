"""The machine builder's variations and the run loop's options for callers other than
`pyhv run` (the popek probe): a caller's `setup` instead of the loader, a bare board
(devices=False) with the caller's own devices on its buses, `max_exits`, `last_exit`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pyhv.arch.x86 import boot
from pyhv.engines import engine_class
from pyhv.errors import ConfigError
from pyhv.exits import Shutdown
from pyhv.loader import LoadedGuest
from pyhv.machine import Machine, MachineConfig, StopRequest
from pyhv.memory import GuestMemory
from pyhv.runner import STATUS_TIMEOUT, Runner


def engines() -> list[object]:
    out: list[object] = []
    for name in ("emu", "kvm"):
        why = engine_class(name).probe()
        out.append(pytest.param(name, marks=pytest.mark.skipif(
            why is not None, reason=f"engine {name} unavailable: {why}")))
    return out


def real_mode(code: bytes) -> Callable[[GuestMemory], LoadedGuest]:
    def setup(mem: GuestMemory) -> LoadedGuest:
        mem.write(0x7C00, code)
        return LoadedGuest("test", boot.real_mode(0, 0x7C00), "test code at 0x7c00")
    return setup


class StopOnWrite:
    """A port device that ends the run with the value written as its status."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.writes: list[int] = []

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append(value)
        self.m.request_stop(StopRequest("test-device", value, "the test device stopped it"))


@pytest.mark.parametrize("engine", engines())
def test_a_bare_board_runs_the_callers_guest_with_the_callers_devices(engine: str) -> None:
    # mov al, 7; out 0x99, al; jmp $
    m = Machine(MachineConfig(engine=engine, mem_size=4 << 20, devices=False,
                              setup=real_mode(b"\xb0\x07\xe6\x99\xeb\xfe")), lambda _b: None)
    try:
        assert m.pio.devices() == [] and m.mmio.devices() == []
        with pytest.raises(AttributeError):
            _ = m.devices
        assert m.guest.description == "test code at 0x7c00"
        dev = StopOnWrite(m)
        m.pio.register(0x99, 1, dev, "test device")
        res = Runner(m, timeout=20).run()
    finally:
        m.close()
    assert (res.status, res.reason) == (7, "test-device")
    assert dev.writes == [7]


def test_a_machine_needs_a_kernel_or_a_setup() -> None:
    with pytest.raises(ConfigError, match="no kernel"):
        Machine(MachineConfig(engine="emu", mem_size=4 << 20), lambda _b: None)


@pytest.mark.parametrize("engine", engines())
def test_max_exits_bounds_a_run(tmp_path: Path, engine: str) -> None:
    """PIT counter 0 at ~12 kHz and `jmp $`: every timer deadline is an exit (emu stops
    at it, kvm is kicked for it); the run ends once 20 exits were routed."""
    img = tmp_path / "tick.bin"
    img.write_bytes(bytes.fromhex("b034e643" "b064e640" "b000e640" "ebfe"))
    m = Machine(MachineConfig(kernel=img, format="flat", engine=engine, mem_size=4 << 20),
                lambda _b: None)
    try:
        r = Runner(m, timeout=20, max_exits=20)
        res = r.run()
    finally:
        m.close()
    assert (res.status, res.reason) == (STATUS_TIMEOUT, "exit-limit"), res
    assert res.detail == "no result after 20 exits"
    assert r.stats.exits.total() == 21 and r.last_exit is not None


@pytest.mark.parametrize("engine", engines())
def test_last_exit_is_the_exit_that_ended_the_run(tmp_path: Path, engine: str) -> None:
    """A triple fault (empty IDT in protected mode, then ud2) ends as a crash whose
    Shutdown exit, with its own reason, is kept."""
    def setup(mem: GuestMemory) -> LoadedGuest:
        st = boot.protected_mode(mem, 0x100000)
        mem.write(0x100000, b"\x0f\x0b")
        return LoadedGuest("test", st, "ud2 with an empty IDT")
    m = Machine(MachineConfig(engine=engine, mem_size=4 << 20, setup=setup), lambda _b: None)
    try:
        r = Runner(m, timeout=20)
        res = r.run()
    finally:
        m.close()
    assert res.reason == "crash"
    assert isinstance(r.last_exit, Shutdown) and "triple fault" in r.last_exit.reason
