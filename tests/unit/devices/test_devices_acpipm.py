"""ACPI fixed hardware: PM1 event/control, the PM timer, S5 and the reset register."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pyhv.clock import VirtualClock
from pyhv.devices.acpipm import AcpiPm
from pyhv.devices.bus import Bus
from pyhv.devices.irq import RecordingIrq


class Rig:
    def __init__(self) -> None:
        self.clock = VirtualClock()
        self.sci = RecordingIrq()
        self.events: list[str] = []
        self.pm = AcpiPm(self.clock, self.sci, on_poweroff=lambda: self.events.append("off"),
                         on_reset=lambda: self.events.append("reset"))
        self.bus = Bus("pio", strict=True)
        for base, length, dev, name in self.pm.regions():
            self.bus.register(base, length, dev, name)


def test_pm_timer_runs_at_3_579545_mhz() -> None:
    r = Rig()
    t0 = r.bus.read(0x608, 4)
    r.clock.advance(1_000_000_000)
    assert r.bus.read(0x608, 4) - t0 == 3_579_545
    r.bus.write(0x608, 4, 0)                     # read-only
    assert r.bus.read(0x608, 4) == 3_579_545


def test_power_button_sets_pwrbtn_sts_and_raises_the_sci_only_when_enabled() -> None:
    r = Rig()
    r.pm.press_power_button()                    # the guest does not listen yet
    assert r.bus.read(0x600, 2) & 0x100 and not r.sci.level
    assert not r.pm.power_button_enabled
    r.bus.write(0x600, 2, 0x100)                 # write 1 to clear
    assert r.bus.read(0x600, 2) & 0x100 == 0
    r.bus.write(0x602, 2, 0x100)                 # PWRBTN_EN (as Linux's button driver)
    assert r.pm.power_button_enabled and not r.sci.level
    r.pm.press_power_button()
    assert r.bus.read(0x600, 2) & 0x100 and r.sci.level
    r.bus.write(0x600, 2, 0x100)                 # the OSPM acknowledges: the SCI drops
    assert not r.sci.level


def test_s5_powers_off_other_sleep_types_do_nothing() -> None:
    r = Rig()
    assert r.bus.read(0x604, 2) & 1              # SCI_EN: always in ACPI mode
    r.bus.write(0x604, 2, 3 << 10 | 1 << 13)     # S3: not offered, ignored
    r.bus.write(0x604, 2, 5 << 10)               # SLP_TYP without SLP_EN
    assert r.events == []
    r.bus.write(0x604, 2, 5 << 10 | 1 << 13)
    assert r.events == ["off"]
    assert r.bus.read(0x604, 2) & (1 << 13) == 0  # SLP_EN is write-only


def test_reset_register() -> None:
    r = Rig()
    r.bus.write(0x60C, 1, 0x06)                  # not the FADT's value: ignored
    assert r.events == []
    r.bus.write(0x60C, 1, 0x01)
    assert r.events == ["reset"]


def test_timer_status_and_sci() -> None:
    r = Rig()
    r.bus.write(0x602, 2, 1)                     # TMR_EN
    r.clock.advance((1 << 31) * 1_000_000_000 // 3_579_545 + 1000)   # bit 31 flips
    assert r.bus.read(0x600, 2) & 1
    assert r.sci.level
    r.bus.write(0x600, 2, 1)                     # write 1 to clear
    assert not r.bus.read(0x600, 2) & 1 and not r.sci.level


@given(st.lists(st.tuples(st.sampled_from([0x600, 0x601, 0x602, 0x603, 0x604, 0x605,
                                           0x608, 0x60C]),
                          st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1),
                          st.integers(0, 10**12)), max_size=40))
def test_hostile_accesses(ops: list[tuple[int, int, int, int]]) -> None:
    r = Rig()
    for port, size, value, dt in ops:
        r.clock.advance(dt)
        if port + size > {0x600: 0x604, 0x601: 0x604, 0x602: 0x604, 0x603: 0x604,
                          0x604: 0x606, 0x605: 0x606, 0x608: 0x60C, 0x60C: 0x60D}[port]:
            continue
        r.bus.write(port, size, value & ((1 << (8 * size)) - 1))
        assert 0 <= r.bus.read(port, size) < 1 << (8 * size)
    assert r.pm.cnt & 1 and 0 <= r.pm.sts < 1 << 16 and 0 <= r.pm.en < 1 << 16
    assert set(r.events) <= {"off", "reset"}
