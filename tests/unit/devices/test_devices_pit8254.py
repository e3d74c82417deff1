"""8254 PIT and port 0x61 on a virtual clock: IRQ 0 rates, one-shots, latches, OUT2."""

from __future__ import annotations

import pytest

from pyhv.clock import TimerQueue, VirtualClock
from pyhv.devices import pit8254 as p
from pyhv.devices.bus import Bus
from pyhv.devices.irq import RecordingIrq
from pyhv.devices.pit8254 import Pit8254, SystemControlPortB

SECOND = 1_000_000_000
HZ1000 = 1193                      # 1193182 / 1000


class Rig:
    def __init__(self) -> None:
        self.clock = VirtualClock()
        self.timers = TimerQueue(self.clock)
        self.irq = RecordingIrq()
        self.pit = Pit8254(self.clock, self.timers, self.irq)
        self.portb = SystemControlPortB(self.pit)
        self.bus = Bus("pio", strict=True)
        for dev in (self.pit, self.portb):
            for base, length, d, name in dev.regions():
                self.bus.register(base, length, d, name)

    def out(self, port: int, v: int) -> None:
        self.bus.write(port, 1, v)

    def inb(self, port: int) -> int:
        return self.bus.read(port, 1)

    def program(self, counter: int, mode: int, count: int, bcd: bool = False) -> None:
        self.out(0x43, counter << 6 | 0x30 | mode << 1 | int(bcd))
        self.out(0x40 + counter, count & 0xFF)
        self.out(0x40 + counter, count >> 8)

    def run_until(self, t_ns: int) -> None:
        """What a run loop does with an idle guest: skip to each deadline, fire it."""
        while True:
            deadline = self.timers.next_deadline()
            if deadline is None or deadline > t_ns:
                break
            self.clock.skip_to(deadline)
            self.timers.fire_due()
        self.clock.skip_to(t_ns)
        self.timers.fire_due()

    def read16(self, counter: int) -> int:
        lo = self.inb(0x40 + counter)
        return lo | self.inb(0x40 + counter) << 8


@pytest.mark.parametrize("mode", [2, 3])
def test_periodic_1000hz_gives_1000_irqs_per_virtual_second(mode: int) -> None:
    r = Rig()
    r.program(0, mode, HZ1000)
    r.run_until(SECOND)
    assert r.irq.raises == 1000
    assert r.pit.coalesced == 0
    assert not r.irq.level                   # pulses leave the line low


def test_mode_6_and_7_alias_2_and_3() -> None:
    r = Rig()
    r.out(0x43, 0x3C)                         # ch0, lohi, mode 6
    r.out(0x40, HZ1000 & 0xFF)
    r.out(0x40, HZ1000 >> 8)
    assert r.pit.counters[0].mode == 2
    r.run_until(SECOND // 10)
    assert r.irq.raises == 100


def test_backlog_is_coalesced_not_replayed() -> None:
    r = Rig()
    r.program(0, 2, HZ1000)
    r.clock.advance(SECOND)                   # the guest was paused for a second
    assert r.timers.fire_due() == 1
    assert r.irq.raises == 1
    assert r.pit.coalesced == 999
    assert r.timers.fire_due() == 0
    deadline = r.timers.next_deadline()
    assert deadline is not None and deadline > SECOND
    r.run_until(SECOND + SECOND // 100)       # and then runs at the normal rate again
    assert r.irq.raises == 11


def test_mode0_one_shot() -> None:
    r = Rig()
    r.program(0, 0, 11932)                    # 10 ms
    assert not r.pit.out(0)
    r.run_until(9_999_000)
    assert r.irq.raises == 0
    r.run_until(10_001_000)
    assert r.irq.raises == 1
    assert r.pit.out(0)
    r.run_until(SECOND)
    assert r.irq.raises == 1
    assert r.timers.next_deadline() is None


def test_mode4_one_shot_rearmed_by_each_count() -> None:
    """Linux's PIT clockevent: control 0x38 once, then a count per event."""
    r = Rig()
    r.out(0x43, 0x38)
    for _ in range(5):
        r.out(0x40, 1193 & 0xFF)
        r.out(0x40, 1193 >> 8)
        r.run_until(r.clock.now_ns() + 2_000_000)
    assert r.irq.raises == 5


def test_reprogramming_cancels_the_old_timer() -> None:
    r = Rig()
    r.program(0, 2, HZ1000)
    r.program(0, 2, HZ1000 * 10)              # 100 Hz
    r.run_until(SECOND)
    assert r.irq.raises == 100
    r.out(0x43, 0x30)                         # control word alone stops counting
    r.run_until(2 * SECOND)
    assert r.irq.raises == 100


def test_count_is_computed_from_the_clock() -> None:
    r = Rig()
    r.program(0, 0, 0xFFFF)
    assert r.read16(0) == 0xFFFF
    r.clock.advance(1_000_000)                # 1 ms = 1193 clocks
    assert r.read16(0) == 0xFFFF - 1193
    r.program(0, 2, 1000)
    r.clock.advance(838 * 10 + 1)             # 10 clocks (838.1 ns each)
    assert r.read16(0) == 1000 - 10


def test_latch_command_freezes_the_read_value() -> None:
    r = Rig()
    r.program(0, 2, 50000)
    r.clock.advance(10_000_000)               # 11931 clocks
    r.out(0x43, 0x00)                          # latch counter 0
    latched = 50000 - 11931
    r.clock.advance(5_000_000)
    r.out(0x43, 0x00)                          # a second latch is ignored until read
    assert r.read16(0) == latched
    assert r.read16(0) == 50000 - 17897        # live again


def test_read_back_status_then_count() -> None:
    r = Rig()
    r.program(2, 0, 1000)                      # gate 2 is low: paused
    r.out(0x61, p.PORTB_GATE2)
    r.clock.advance(100_000)                   # 119 clocks
    r.out(0x43, 0xC0 | 0x08)                   # read-back: count + status of counter 2
    status = r.inb(0x42)
    assert status == 0x30 | 0 << 1             # OUT low, count loaded, lohi, mode 0
    assert r.read16(2) == 1000 - 119
    r.clock.advance(SECOND)
    r.out(0x43, 0xC0 | 0x20 | 0x08)            # status only, latched now
    r.clock.advance(SECOND)
    assert r.inb(0x42) & 0x80                  # OUT high after terminal count
    r.program(2, 0, 1000)
    r.out(0x43, 0xC0 | 0x20 | 0x08)
    r.clock.advance(SECOND)
    assert not r.inb(0x42) & 0x80              # the status as it was at the latch
    r.out(0x43, 0xB0)                          # control word: NULL COUNT until loaded
    r.out(0x43, 0xE8)
    assert r.inb(0x42) & 0x40


def test_lsb_only_and_msb_only_access() -> None:
    r = Rig()
    r.out(0x43, 0x90)                          # counter 2, LSB only, mode 0
    r.out(0x42, 0x80)
    assert r.pit.counters[2].count == 0x80
    assert r.inb(0x42) == 0x80
    r.out(0x43, 0xA0)                          # MSB only
    r.out(0x42, 0x12)
    assert r.pit.counters[2].count == 0x1200
    assert r.inb(0x42) == 0x12


def test_bcd_counting() -> None:
    r = Rig()
    r.program(0, 2, 0x1000, bcd=True)          # 1000 decimal
    assert r.pit.counters[0].bcd and r.pit.counters[0].count == 1000
    r.clock.advance(838 * 10 + 1)              # 10 clocks
    assert r.read16(0) == 0x0990
    r.run_until(SECOND // 100)                 # 1000 clocks = 838 us
    assert r.irq.raises == 11


def test_out2_polling_through_port_61_like_linux_tsc_calibration() -> None:
    r = Rig()
    r.out(0x61, (r.inb(0x61) & ~0x02 & 0xFF) | 0x01)   # gate high, speaker off
    latch = 1193182 // 20                                # 50 ms
    r.out(0x43, 0xB0)
    r.out(0x42, latch & 0xFF)
    r.out(0x42, latch >> 8)
    polls = 0
    while not r.inb(0x61) & p.PORTB_OUT2:
        r.clock.advance(1000)                            # the loop body takes 1 us
        polls += 1
        assert polls < 100_000
    assert 49_900 <= polls <= 50_100
    assert r.irq.raises == 0                             # counter 2 raises no IRQ


def test_quick_pit_calibrate_sees_msb_fall() -> None:
    r = Rig()
    r.out(0x61, 0x01)
    r.out(0x43, 0xB0)
    r.out(0x42, 0xFF)
    r.out(0x42, 0xFF)
    seen = []
    for _ in range(5):
        r.inb(0x42)
        seen.append(r.inb(0x42))
        r.clock.advance(256 * 838 + 300)       # a little over 256 clocks
    assert seen == [0xFF, 0xFE, 0xFD, 0xFC, 0xFB]


def test_gate_low_pauses_mode0() -> None:
    r = Rig()
    r.out(0x61, 0x01)
    r.program(2, 0, 10000)
    r.clock.advance(1_000_000)                 # 1193 clocks
    r.out(0x61, 0x00)
    r.clock.advance(SECOND)
    assert r.read16(2) == 10000 - 1193
    r.out(0x61, 0x01)
    r.clock.advance(1_000_000)
    assert r.read16(2) == 10000 - 2386


def test_gate_rising_edge_restarts_mode2_and_triggers_mode1() -> None:
    r = Rig()
    r.program(2, 2, 1000)
    assert r.inb(0x61) & p.PORTB_OUT2          # gate low: OUT held high
    r.out(0x61, 0x01)
    r.clock.advance(100_000)
    assert r.read16(2) == 1000 - 119
    r.out(0x61, 0x00)
    r.out(0x61, 0x01)                           # reload
    assert r.read16(2) == 1000
    r.program(2, 1, 500)                        # mode 1 waits for a trigger
    assert r.inb(0x61) & p.PORTB_OUT2
    r.out(0x61, 0x00)
    r.out(0x61, 0x01)
    assert not r.inb(0x61) & p.PORTB_OUT2      # one-shot pulse running
    r.clock.advance(1_000_000)
    assert r.inb(0x61) & p.PORTB_OUT2


def test_port_61_bits() -> None:
    r = Rig()
    r.out(0x61, 0xFF)
    v = r.inb(0x61)
    assert v & 0x0F == 0x0F and not v & 0xC0
    a = r.inb(0x61) & p.PORTB_REFRESH
    r.clock.advance(p.REFRESH_PERIOD_NS)
    assert r.inb(0x61) & p.PORTB_REFRESH != a


def test_unprogrammed_pit_is_quiet() -> None:
    r = Rig()
    r.run_until(SECOND)
    assert r.irq.raises == 0 and r.timers.next_deadline() is None
