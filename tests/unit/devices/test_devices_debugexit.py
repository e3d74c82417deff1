"""isa-debug-exit: status (v << 1) | 1."""

from __future__ import annotations

from pyhv.devices import debugexit
from pyhv.devices.bus import Bus
from pyhv.devices.debugexit import DebugExit


def make() -> tuple[Bus, list[int]]:
    seen: list[int] = []
    dev = DebugExit(seen.append)
    bus = Bus("pio", strict=True)
    for base, length, d, name in dev.regions():
        bus.register(base, length, d, name)
    return bus, seen


def test_byte_write_reports_status() -> None:
    bus, seen = make()
    bus.write(debugexit.PORT, 1, 0x10)
    assert seen == [0x21]
    bus.write(debugexit.PORT, 1, 0)
    assert seen == [0x21, 1]


def test_wide_write_keeps_the_whole_value() -> None:
    bus, seen = make()
    bus.write(debugexit.PORT, 4, 0x1234)
    assert seen == [0x2469]


def test_read_is_zero() -> None:
    bus, seen = make()
    assert bus.read(debugexit.PORT, 1) == 0
    assert seen == []
