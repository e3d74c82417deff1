"""MC146818 RTC on a virtual clock: the date it reports, formats, UIP, interrupts, CMOS."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime

from pyhv.clock import TimerQueue, VirtualClock
from pyhv.devices import rtc as r
from pyhv.devices.bus import Bus
from pyhv.devices.irq import RecordingIrq
from pyhv.devices.rtc import Rtc

SECOND = 1_000_000_000
MIB = 1 << 20
# Thursday 29 February 2024, 13:45:07 UTC
START = calendar.timegm((2024, 2, 29, 13, 45, 7, 0, 0, 0))


class Rig:
    def __init__(self, ram: int = 128 * MIB, start: float = START, cpus: int = 1) -> None:
        self.clock = VirtualClock()
        self.timers = TimerQueue(self.clock)
        self.irq = RecordingIrq()
        self.rtc = Rtc(self.clock, self.timers, self.irq, ram_size=ram, n_cpus=cpus,
                       start_epoch=start)
        self.bus = Bus("pio", strict=True)
        for base, length, d, name in self.rtc.regions():
            self.bus.register(base, length, d, name)

    def get(self, index: int) -> int:
        self.bus.write(0x70, 1, index)
        return self.bus.read(0x71, 1)

    def put(self, index: int, value: int) -> None:
        self.bus.write(0x70, 1, index)
        self.bus.write(0x71, 1, value)

    def run_until(self, t_ns: int, ack: bool = True) -> None:
        """An idle guest whose IRQ 8 handler reads register C."""
        while True:
            deadline = self.timers.next_deadline()
            if deadline is None or deadline > t_ns:
                break
            self.clock.skip_to(deadline)
            self.timers.fire_due()
            if ack and self.irq.level:
                self.get(r.REG_C)
        self.clock.skip_to(t_ns)


def linux_read_time(rig: Rig) -> tuple[int, ...]:
    """mc146818_get_time: wait while UIP, read, retry if UIP or the seconds changed."""
    for _ in range(1000):
        seconds = rig.get(r.SECONDS)
        if rig.get(r.REG_A) & r.A_UIP:
            continue
        fields = tuple(rig.get(i) for i in (r.SECONDS, r.MINUTES, r.HOURS, r.DAY_OF_MONTH,
                                            r.MONTH, r.YEAR, r.CENTURY))
        if rig.get(r.REG_A) & r.A_UIP or seconds != rig.get(r.SECONDS):
            continue
        return fields
    raise AssertionError("the read loop did not terminate")


def test_reports_the_start_date_in_bcd_24h() -> None:
    rig = Rig()
    assert rig.get(r.REG_B) & (r.B_DM_BINARY | r.B_24H) == r.B_24H
    assert linux_read_time(rig) == (0x07, 0x45, 0x13, 0x29, 0x02, 0x24, 0x20)
    assert rig.get(r.DAY_OF_WEEK) == 5                   # Thursday; Sunday = 1
    assert rig.rtc.now() == datetime(2024, 2, 29, 13, 45, 7, tzinfo=UTC)


def test_binary_and_12h_modes() -> None:
    rig = Rig()
    rig.put(r.REG_B, r.B_DM_BINARY | r.B_24H)
    assert linux_read_time(rig) == (7, 45, 13, 29, 2, 24, 20)
    rig.put(r.REG_B, r.B_DM_BINARY)                      # 12 h, binary
    assert rig.get(r.HOURS) == 0x80 | 1                  # 1 PM
    rig.put(r.REG_B, 0)                                  # 12 h, BCD
    assert rig.get(r.HOURS) == 0x81
    midnight = Rig(start=calendar.timegm((2024, 3, 1, 0, 5, 0, 0, 0, 0)))
    midnight.put(r.REG_B, 0)
    assert midnight.get(r.HOURS) == 0x12                 # 12 AM


def test_time_follows_the_guest_clock_across_a_leap_day() -> None:
    rig = Rig()
    rig.clock.advance((10 * 3600 + 15 * 60) * SECOND)   # to 00:00:07 on 1 March
    assert linux_read_time(rig) == (0x07, 0x00, 0x00, 0x01, 0x03, 0x24, 0x20)
    assert rig.get(r.DAY_OF_WEEK) == 6


def test_default_start_is_host_wall_time() -> None:
    clock = VirtualClock()
    rtc = Rtc(clock, TimerQueue(clock), RecordingIrq())
    assert rtc.now().year >= 2024


def test_uip_window_and_the_read_loop_terminates() -> None:
    rig = Rig()
    rig.clock.skip_to(SECOND - 100_000)                  # 100 us before the boundary
    assert rig.get(r.REG_A) & r.A_UIP
    # Guest time stands still (nothing advances the clock): UIP falls anyway.
    assert not rig.get(r.REG_A) & r.A_UIP
    assert linux_read_time(rig)[0] == 0x07
    rig.clock.advance(200_000)
    assert not rig.get(r.REG_A) & r.A_UIP
    assert rig.get(r.SECONDS) == 0x08
    rig.clock.skip_to(5 * SECOND + SECOND // 2)
    assert not rig.get(r.REG_A) & r.A_UIP


def test_guest_sets_the_time_with_set_bit() -> None:
    rig = Rig()
    rig.clock.advance(SECOND // 2)
    rig.put(r.REG_B, r.B_SET | r.B_24H)
    for index, value in ((r.SECONDS, 0x30), (r.MINUTES, 0x59), (r.HOURS, 0x23),
                         (r.DAY_OF_MONTH, 0x31), (r.MONTH, 0x12), (r.YEAR, 0x99),
                         (r.CENTURY, 0x19)):
        rig.put(index, value)
    rig.put(r.DAY_OF_MONTH, 0x31)                        # day before month: not clamped
    rig.clock.advance(5 * SECOND)                        # frozen while SET
    assert rig.get(r.DAY_OF_MONTH) == 0x31
    assert rig.rtc.now() == datetime(1999, 12, 31, 23, 59, 30, tzinfo=UTC)
    rig.put(r.REG_B, r.B_24H)
    rig.clock.advance(31 * SECOND)
    assert rig.rtc.now() == datetime(2000, 1, 1, 0, 0, 1, tzinfo=UTC)


def test_guest_write_without_set_and_invalid_day_is_clamped() -> None:
    rig = Rig()
    rig.put(r.MONTH, 0x04)                               # 29 April
    rig.put(r.DAY_OF_MONTH, 0x31)                        # April has 30 days
    assert rig.rtc.now().date() == datetime(2024, 4, 30).date()
    rig.put(r.REG_B, 0)                                  # 12 h BCD: write 2 PM
    rig.put(r.HOURS, 0x82)
    assert rig.rtc.now().hour == 14


def test_registers_c_d_and_cmos_ram() -> None:
    rig = Rig()
    assert rig.get(r.REG_D) == r.D_VRT
    assert rig.get(r.REG_C) == 0
    rig.put(0x40, 0x5A)
    assert rig.get(0x40) == 0x5A
    rig.bus.write(0x70, 1, 0x80 | 0x40)                  # NMI masked, same byte
    assert rig.rtc.nmi_masked and rig.bus.read(0x71, 1) == 0x5A
    rig.put(r.REG_A, 0xFF)
    assert rig.get(r.REG_A) & 0x7F == 0x7F


def test_periodic_interrupt_rate() -> None:
    rig = Rig()
    rig.put(r.REG_A, 0x26)                               # 1024 Hz
    rig.put(r.REG_B, r.B_PIE | r.B_24H)
    rig.run_until(SECOND)
    assert rig.irq.raises == 1024
    assert rig.rtc.coalesced == 0
    rig.put(r.REG_A, 0x2F)                               # 2 Hz
    raises = rig.irq.raises
    rig.run_until(3 * SECOND)
    assert rig.irq.raises - raises == 4


def test_periodic_flag_and_irq_need_register_c_read() -> None:
    rig = Rig()
    rig.put(r.REG_A, 0x26)
    rig.put(r.REG_B, r.B_PIE | r.B_24H)
    rig.run_until(10 * 976_563, ack=False)
    assert rig.irq.raises == 1 and rig.irq.level        # no new edge until C is read
    c = rig.get(r.REG_C)
    assert c & (r.C_IRQF | r.C_PF) == r.C_IRQF | r.C_PF
    assert not rig.irq.level
    assert rig.get(r.REG_C) == 0


def test_periodic_backlog_is_coalesced() -> None:
    rig = Rig()
    rig.put(r.REG_A, 0x26)
    rig.put(r.REG_B, r.B_PIE | r.B_24H)
    rig.clock.advance(SECOND)
    assert rig.timers.fire_due() == 1
    assert rig.irq.raises == 1 and rig.rtc.coalesced == 1023


def test_no_timer_without_pie() -> None:
    rig = Rig()
    rig.run_until(SECOND)
    assert rig.timers.next_deadline() is None and rig.irq.raises == 0
    assert rig.get(r.REG_C) & r.C_PF                     # PF still shows a period passed


def test_update_ended_and_alarm_interrupts() -> None:
    rig = Rig()
    rig.put(r.REG_B, r.B_UIE | r.B_24H)
    rig.run_until(3 * SECOND)
    assert rig.irq.raises == 3
    rig.put(r.REG_B, r.B_24H)
    rig.put(r.SECONDS_ALARM, 0x10)                       # hh:mm:10, any minute/hour
    rig.put(r.MINUTES_ALARM, 0xC0)
    rig.put(r.HOURS_ALARM, 0xFF)
    rig.put(r.REG_B, r.B_AIE | r.B_24H)
    raises = rig.irq.raises
    rig.run_until(3 * SECOND + 60 * SECOND)
    assert rig.irq.raises - raises == 1


def test_memory_size_bytes_like_qemu() -> None:
    rig = Rig(ram=128 * MIB, cpus=4)
    c = rig.rtc.cmos
    assert c[0x15] | c[0x16] << 8 == 640
    assert c[0x17] | c[0x18] << 8 == 0xFFFF             # 127 MiB in KiB, clamped
    assert c[0x30] | c[0x31] << 8 == 0xFFFF
    assert c[0x34] | c[0x35] << 8 == (112 * MIB) // 65536
    assert c[0x5B] | c[0x5C] << 8 | c[0x5D] << 16 == 0
    assert c[0x5F] == 3
    small = Rig(ram=32 * MIB).rtc.cmos
    assert small[0x17] | small[0x18] << 8 == 31 * 1024
    big = Rig(ram=5 << 30).rtc.cmos
    assert big[0x34] | big[0x35] << 8 == ((3 << 30) - 16 * MIB) // 65536   # below the hole
    assert big[0x5B] | big[0x5C] << 8 | big[0x5D] << 16 == (2 << 30) // 65536
    assert rig.get(0x15) == 0x80                         # through the ports too
