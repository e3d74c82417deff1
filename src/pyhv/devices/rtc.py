"""The MC146818 CMOS real-time clock: index port 0x70, data port 0x71, IRQ 8.

Facts (Motorola MC146818A datasheet: "Address Map", "Time, Calendar and Alarm
Locations", "Register A-D"; the PC/AT CMOS layout for bytes 0x0e-0x7f):

    0x70 write  bits 6:0 select a byte, bit 7 = 1 masks NMI (stored, reported)
    0x71 r/w    the selected byte

    0x00 seconds     0x01 seconds alarm   0x02 minutes   0x03 minutes alarm
    0x04 hours (12h mode: 1-12, bit 7 = PM)  0x05 hours alarm
    0x06 day of week (1 = Sunday)  0x07 day of month  0x08 month  0x09 year (00-99)
    0x32 century (PC convention), BCD or binary like the rest
    0x0a A  bit 7 UIP (ro), bits 6:4 DV divider (010 = 32.768 kHz), bits 3:0 RS rate:
            periodic interrupt every 2^(RS-1)/32768 s (RS 1, 2 behave as 8, 9; 0 = none)
    0x0b B  bit 7 SET (stop updates), 6 PIE, 5 AIE, 4 UIE, 3 SQWE, 2 DM (1 = binary),
            1 24/12 (1 = 24 h), 0 DSE
    0x0c C  (ro, cleared by reading) bit 7 IRQF, 6 PF, 5 AF, 4 UF
    0x0d D  bit 7 VRT (valid RAM and time): always 1
    alarm bytes with bits 7:6 = 11 match any value ("don't care")

    CMOS memory bytes as QEMU's PC sets them (SeaBIOS and some loaders read them):
    0x15/0x16 base memory in KiB (<= 640); 0x17/0x18 and 0x30/0x31 memory from 1 MiB
    in KiB (<= 65535); 0x34/0x35 memory from 16 MiB below 4 GiB in 64 KiB units;
    0x5b-0x5d memory above 4 GiB in 64 KiB units; 0x5f number of CPUs - 1.

Design:
- Time is never stored as ticking registers: RTC time = a base (the start epoch, host
  wall time at creation unless given) + the guest Clock's ns. The registers are encoded
  from it on every read (BCD or binary, 12 or 24 h, per register B at read time). A
  guest write to a time/date byte rebuilds the date and moves the base. While SET is 1
  the fields are frozen and hold exactly what the guest writes (a date may be invalid
  half-way through being set); clearing SET restarts the clock from them, clamped to a
  valid date.
- UIP reads 1 in the 244 us before each second boundary (the datasheet's t_BUC), so a
  guest that waits for UIP to fall sees consistent fields. If guest time has not moved
  since UIP last read 1, it reads 0: a clock that only advances with guest progress can
  never hold Linux's "wait while UIP" loop forever.
- The periodic interrupt (PIE and RS != 0) is a TimerQueue callback at each period
  boundary of guest time; a late run loop gets one interrupt for the whole backlog
  (`coalesced` counts the rest). The update-ended and alarm interrupts (UIE, AIE) use a
  once-a-second callback, armed only while one of them is enabled. PF is also set
  lazily on a read of C when a period passed with PIE off.
- IRQ 8 is a level that follows IRQF: raised when IRQF becomes 1, dropped when the guest
  reads register C. As on the chip, an unread C means no further interrupt edges.
- Day of week is derived from the date; guest writes to it are ignored.

Threading: run-loop thread only (port accesses and TimerQueue callbacks).
Invariants: 128 bytes of CMOS; at most one armed periodic and one armed per-second
timer; the running clock always holds a valid date (guest-written ones are clamped).
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from pyhv.arch.x86 import layout
from pyhv.clock import Clock, TimerQueue
from pyhv.devices.bus import BusDevice
from pyhv.devices.irq import IrqLine
from pyhv.devices.state import MAX_NS, U8, Reader

PORT = 0x70
LENGTH = 2
IRQ = 8

SECONDS = 0x00
SECONDS_ALARM = 0x01
MINUTES = 0x02
MINUTES_ALARM = 0x03
HOURS = 0x04
HOURS_ALARM = 0x05
DAY_OF_WEEK = 0x06
DAY_OF_MONTH = 0x07
MONTH = 0x08
YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
CENTURY = 0x32

A_UIP = 0x80
B_SET = 0x80
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10
B_DM_BINARY = 0x04
B_24H = 0x02
C_IRQF = 0x80
C_PF = 0x40
C_AF = 0x20
C_UF = 0x10
D_VRT = 0x80

NS = 1_000_000_000
UIP_WINDOW_NS = 244_000
RTC_HZ = 32768
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# the RTC's offset from guest time, as far as a date in years 1-9999 reaches
_MIN_BASE_NS = -62_135_596_800 * NS
_MAX_BASE_NS = 253_402_300_799 * NS
_TIME_REGS = (SECONDS, MINUTES, HOURS, DAY_OF_MONTH, MONTH, YEAR, CENTURY)


def _normalize(f: dict[str, int]) -> datetime:
    """A valid date from register values, clamping what no calendar has."""
    year = min(max(f["year"], 1), 9999)
    month = min(max(f["month"], 1), 12)
    day = min(max(f["day"], 1), calendar.monthrange(year, month)[1])
    return datetime(year, month, day, min(f["hour"], 23), min(f["minute"], 59),
                    min(f["second"], 59), tzinfo=UTC)


def _bcd(v: int) -> int:
    return (v // 10) << 4 | v % 10


def _unbcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0x0F)


class Rtc:
    """MC146818 RTC + 128 bytes of CMOS."""

    def __init__(self, clock: Clock, timers: TimerQueue, irq: IrqLine, *,
                 ram_size: int = 0, n_cpus: int = 1,
                 start_epoch: float | None = None) -> None:
        self.clock = clock
        self.timers = timers
        self.irq = irq
        epoch = time.time() if start_epoch is None else start_epoch
        self._base_ns = int(epoch * NS)         # RTC time = base + guest ns
        self._frozen: dict[str, int] | None = None   # the date fields while SET = 1
        self.cmos = bytearray(128)
        self.cmos[REG_A] = 0x26                  # 32.768 kHz, 1024 Hz rate
        self.cmos[REG_B] = B_24H                 # BCD, 24 h, no interrupts
        self.cmos[REG_D] = D_VRT
        self.index = 0
        self.nmi_masked = False
        self._flags = 0                          # register C
        self._irq_level = False
        self._uip_at: int | None = None
        self._last_period = 0                    # periodic edges counted so far
        self._periodic: int | None = None        # TimerQueue handles
        self._second: int | None = None
        self.coalesced = 0
        self.periodic_interrupts = 0
        self._set_memory_bytes(ram_size, n_cpus)

    def regions(self) -> list[tuple[int, int, BusDevice, str]]:
        """(base, length, device, name) to register on the port bus."""
        return [(PORT, LENGTH, self, "rtc")]

    def _set_memory_bytes(self, ram_size: int, n_cpus: int) -> None:
        kib, mib = 1 << 10, 1 << 20
        below_4g = min(ram_size, layout.MMIO_START)
        above_4g = ram_size - below_4g
        base = min(below_4g // kib, 640)
        ext = min(max(below_4g - mib, 0) // kib, 0xFFFF)
        above_16m = min(max(below_4g - 16 * mib, 0) // (64 * kib), 0xFFFF)
        high = above_4g // (64 * kib)
        c = self.cmos
        c[0x15], c[0x16] = base & 0xFF, base >> 8
        c[0x17], c[0x18] = ext & 0xFF, ext >> 8
        c[0x30], c[0x31] = ext & 0xFF, ext >> 8
        c[0x34], c[0x35] = above_16m & 0xFF, above_16m >> 8
        c[0x5B], c[0x5C], c[0x5D] = high & 0xFF, (high >> 8) & 0xFF, (high >> 16) & 0xFF
        c[0x5F] = max(n_cpus - 1, 0)

    # ------------------------------------------------------------------ time

    def rtc_seconds(self) -> int:
        """The RTC's time as Unix seconds."""
        if self._frozen is not None:
            return calendar.timegm(_normalize(self._frozen).utctimetuple())
        return (self._base_ns + self.clock.now_ns()) // NS

    def now(self) -> datetime:
        """The date and time the RTC reports (UTC)."""
        return _EPOCH + timedelta(seconds=self.rtc_seconds())

    def _fields(self) -> dict[str, int]:
        """The date/time registers' values (while SET = 1, exactly as written)."""
        if self._frozen is not None:
            return dict(self._frozen)
        dt = self.now()
        return {"year": dt.year, "month": dt.month, "day": dt.day,
                "hour": dt.hour, "minute": dt.minute, "second": dt.second}

    def _set_time(self, dt: datetime) -> None:
        seconds = calendar.timegm(dt.utctimetuple())
        sub = (self._base_ns + self.clock.now_ns()) % NS
        self._base_ns = seconds * NS + sub - self.clock.now_ns()
        self._arm_second()

    def _encode(self, v: int) -> int:
        return v if self.cmos[REG_B] & B_DM_BINARY else _bcd(v)

    def _decode(self, v: int) -> int:
        return v if self.cmos[REG_B] & B_DM_BINARY else _unbcd(v)

    def _encode_hour(self, h: int) -> int:
        if self.cmos[REG_B] & B_24H:
            return self._encode(h)
        return self._encode(h % 12 or 12) | (0x80 if h >= 12 else 0)

    def _time_reg(self, index: int) -> int:
        f = self._fields()
        if index == SECONDS:
            return self._encode(f["second"])
        if index == MINUTES:
            return self._encode(f["minute"])
        if index == HOURS:
            return self._encode_hour(f["hour"])
        if index == DAY_OF_WEEK:
            return self._encode(self.now().isoweekday() % 7 + 1)
        if index == DAY_OF_MONTH:
            return self._encode(f["day"])
        if index == MONTH:
            return self._encode(f["month"])
        if index == YEAR:
            return self._encode(f["year"] % 100)
        return self._encode(f["year"] // 100)    # CENTURY

    def _write_time_reg(self, index: int, value: int) -> None:
        f = self._fields()
        year = f["year"]
        if index == HOURS:
            if self.cmos[REG_B] & B_24H:
                f["hour"] = self._decode(value)
            else:
                f["hour"] = self._decode(value & 0x7F) % 12 + (12 if value & 0x80 else 0)
        else:
            v = self._decode(value)
            if index == SECONDS:
                f["second"] = v
            elif index == MINUTES:
                f["minute"] = v
            elif index == DAY_OF_MONTH:
                f["day"] = v
            elif index == MONTH:
                f["month"] = v
            elif index == YEAR:
                f["year"] = year // 100 * 100 + v % 100
            else:
                f["year"] = v * 100 + year % 100
        if self._frozen is not None:
            self._frozen = f                     # checked when SET is cleared
        else:
            self._set_time(_normalize(f))

    def _uip(self) -> bool:
        if self._frozen is not None:
            return False
        now = self.clock.now_ns()
        if (self._base_ns + now) % NS < NS - UIP_WINDOW_NS:
            return False
        if self._uip_at == now:
            return False                         # time stood still: the update is over
        self._uip_at = now
        return True

    # ------------------------------------------------------------------ bus protocol

    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return 0xFF                          # the index port is write-only
        i = self.index
        if i in _TIME_REGS or i == DAY_OF_WEEK:
            return self._time_reg(i)
        if i == REG_A:
            return (self.cmos[REG_A] & 0x7F) | (A_UIP if self._uip() else 0)
        if i == REG_C:
            return self._read_c()
        if i == REG_D:
            return D_VRT
        return self.cmos[i]

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 0:
            self.index = value & 0x7F
            self.nmi_masked = bool(value & 0x80)
            return
        i = self.index
        if i in _TIME_REGS:
            self._write_time_reg(i, value)
        elif i == DAY_OF_WEEK or i in (REG_C, REG_D):
            pass                                 # derived / read-only
        elif i == REG_A:
            self.cmos[REG_A] = value & 0x7F
            units = self._period_units()         # count periods in the new rate's units
            self._last_period = 0 if units is None else self._period_index(units)
            self._arm_periodic()
        elif i == REG_B:
            self._write_b(value)
        else:
            self.cmos[i] = value

    def _write_b(self, value: int) -> None:
        if value & B_SET:
            value &= ~B_UIE                      # datasheet: SET clears UIE
            if self._frozen is None:
                self._frozen = self._fields()
        elif self._frozen is not None:
            self._base_ns = self.rtc_seconds() * NS - self.clock.now_ns()
            self._frozen = None
        self.cmos[REG_B] = value
        self._arm_periodic()
        self._arm_second()
        self._update_irq()

    def _read_c(self) -> int:
        self._note_periods()
        value = self._flags
        self._flags = 0
        self._update_irq()
        return value

    # ------------------------------------------------------------------ interrupts

    def _update_irq(self) -> None:
        b = self.cmos[REG_B]
        enabled = ((self._flags & C_PF and b & B_PIE) or (self._flags & C_AF and b & B_AIE)
                   or (self._flags & C_UF and b & B_UIE))
        if enabled:
            self._flags |= C_IRQF
        else:
            self._flags &= ~C_IRQF
        high = bool(enabled)
        if high != self._irq_level:
            self._irq_level = high
            self.irq.set_level(high)

    def _period_units(self) -> int | None:
        """32.768 kHz clocks per periodic interrupt, or None (RS = 0)."""
        rs = self.cmos[REG_A] & 0x0F
        if rs == 0:
            return None
        if rs < 3:
            rs += 7
        return 1 << (rs - 1)

    def _period_index(self, units: int) -> int:
        return self.clock.now_ns() * RTC_HZ // (units * NS)

    def _note_periods(self) -> None:
        """Set PF if a period boundary passed since the last one noted."""
        units = self._period_units()
        if units is None:
            return
        k = self._period_index(units)
        if k > self._last_period:
            self._last_period = k
            self._flags |= C_PF

    def _arm_periodic(self) -> None:
        if self._periodic is not None:
            self.timers.cancel(self._periodic)
            self._periodic = None
        units = self._period_units()
        if units is None or not self.cmos[REG_B] & B_PIE:
            return
        k = self._period_index(units)
        self._last_period = max(self._last_period, k)
        deadline = -((k + 1) * units * NS // -RTC_HZ)
        self._periodic = self.timers.schedule(deadline, self._fire_periodic)

    def _fire_periodic(self) -> None:
        self._periodic = None
        units = self._period_units()
        if units is None:
            return
        k = self._period_index(units)
        if k > self._last_period:
            self.coalesced += k - self._last_period - 1
            self._last_period = k
            self._flags |= C_PF
            self.periodic_interrupts += 1
            self._update_irq()
        self._arm_periodic()

    def _arm_second(self) -> None:
        if self._second is not None:
            self.timers.cancel(self._second)
            self._second = None
        b = self.cmos[REG_B]
        if not b & (B_UIE | B_AIE) or self._frozen is not None:
            return
        rtc_ns = self._base_ns + self.clock.now_ns()
        next_second = (rtc_ns // NS + 1) * NS
        self._second = self.timers.schedule(next_second - self._base_ns, self._fire_second)

    def _fire_second(self) -> None:
        self._second = None
        self._flags |= C_UF
        if self._alarm_matches():
            self._flags |= C_AF
        self._update_irq()
        self._arm_second()

    def _alarm_matches(self) -> bool:
        for alarm, reg in ((SECONDS_ALARM, SECONDS), (MINUTES_ALARM, MINUTES),
                           (HOURS_ALARM, HOURS)):
            a = self.cmos[alarm]
            if a & 0xC0 != 0xC0 and a != self._time_reg(reg):
                return False
        return True

    # ------------------------------------------------------------------ state records

    state_version: ClassVar[int] = 1
    _FROZEN = ("year", "month", "day", "hour", "minute", "second")

    def save_state(self) -> dict[str, Any]:
        """The CMOS bytes (the memory size bytes included, as the guest may have
        changed them), the register index, the RTC's offset from guest time."""
        return {"cmos": self.cmos.hex(), "index": self.index,
                "nmi_masked": self.nmi_masked, "flags": self._flags,
                "irq_level": self._irq_level, "base_ns": self._base_ns,
                "frozen": dict(self._frozen) if self._frozen is not None else None,
                "uip_at": self._uip_at, "last_period": self._last_period}

    def load_state(self, record: Mapping[str, Any], version: int) -> None:
        """The periodic and update timers are armed again on the (restored) clock; a
        period boundary that passed unnoticed before the save is noticed at once."""
        r = Reader("rtc", record)
        cmos = r.hex("cmos", length=128)
        index = r.int("index", 0, 0x7F)
        nmi_masked = r.bool("nmi_masked")
        flags = r.int("flags", 0, U8)
        irq_level = r.bool("irq_level")
        base_ns = r.int("base_ns", _MIN_BASE_NS, _MAX_BASE_NS)
        frozen: dict[str, int] | None = None
        if record.get("frozen") is not None:
            f = r.sub("frozen")
            frozen = {k: f.int(k, 0, 99999 if k == "year" else U8) for k in self._FROZEN}
            f.done()
        else:
            r.opt_int("frozen")
        uip_at = r.opt_int("uip_at", 0, MAX_NS)
        last_period = r.int("last_period", 0, MAX_NS)
        r.done()
        self.cmos[:] = cmos
        self.index, self.nmi_masked, self._flags = index, nmi_masked, flags
        self._irq_level, self._base_ns, self._frozen = irq_level, base_ns, frozen
        self._uip_at, self._last_period = uip_at, last_period
        if self._periodic is not None:
            self.timers.cancel(self._periodic)
            self._periodic = None
        units = self._period_units()
        if units is not None and self.cmos[REG_B] & B_PIE:
            if self._period_index(units) > self._last_period:
                deadline = self.clock.now_ns()
            else:
                deadline = -((self._last_period + 1) * units * NS // -RTC_HZ)
            self._periodic = self.timers.schedule(deadline, self._fire_periodic)
        self._arm_second()
