"""The 8254 programmable interval timer (0x40-0x43) and system control port B (0x61).

Facts (Intel 8254 datasheet: "Control Word Format", "Counter Latch Command", "Read-Back
Command", "Mode Definitions"; the IBM PC/AT technical reference for port 0x61):

    0x40-0x42  counters 0-2: write the initial count, read the count (or a latch)
    0x43       control word: bits 7:6 SC (counter; 11 = read-back), bits 5:4 RW
               (00 = counter latch command, 01 LSB, 10 MSB, 11 LSB then MSB),
               bits 3:1 mode (0-5; 6 and 7 are 2 and 3), bit 0 BCD
    read-back  bits 7:6 = 11, bit 5 = 0: latch count, bit 4 = 0: latch status,
               bits 3:1 select counters 2,1,0. Status byte: bit 7 OUT, bit 6 NULL
               COUNT, bits 5:0 the control word (RW, mode, BCD). A latched status is
               read before a latched count.

    input clock 1.193182 MHz; an initial count of 0 means 65536 (10000 in BCD)
    counter 0: OUT -> IRQ 0.  counter 1: DRAM refresh (OUT unconnected).
    counter 2: GATE and OUT through port 0x61 (the speaker and TSC calibration).

    port 0x61  bit 0 timer 2 gate (rw), bit 1 speaker data enable (rw), bits 2-3 parity /
               channel check enables (rw, stored), bit 4 refresh request toggle (ro,
               flips every 15.085 us), bit 5 OUT2 (ro), bits 6-7 error status (0)

Modes (OUT for count N, d input clocks after the count was loaded; gate high):
    0 interrupt on terminal count  OUT low after the control word, high from d = N on
    1 retriggerable one-shot       OUT low from a GATE rising edge until d = N
    2 rate generator               OUT low for one clock (d mod N = N-1), period N
    3 square wave                  OUT high for ceil(N/2) clocks, low for floor(N/2)
    4 software-triggered strobe    OUT low for one clock at d = N (Linux's one-shot)
    5 hardware-triggered strobe    mode 4 started by a GATE rising edge
GATE low: pauses modes 0 and 4, holds OUT high and stops modes 2 and 3 (a rising edge
restarts them), and its rising edge triggers modes 1 and 5.

Design:
- Nothing ticks. A counter remembers when counting began (guest ns from the Clock) and
  how many clocks had elapsed before any pause; the count and OUT are computed from
  `clock.now_ns()` on each read (d = elapsed ns * 1193182 // 1e9).
- Counter 0 drives IRQ 0: at each rising edge of OUT (every N clocks in modes 2/3; once
  at terminal count in modes 0/1/4/5) a callback armed on the TimerQueue pulses the line.
  A periodic callback works out how many edges have passed and pulses once however many
  that is (the extra ones are counted in `coalesced`), then arms the next edge: a huge
  backlog after a pause costs one callback, never one per missed tick.
- Simplifications: a count written while a counter runs restarts it at once (the
  datasheet defers it to the end of the period in modes 2/3); no counter is running
  at power-on (pyhv has no BIOS to program counter 0), so IRQ 0 stays quiet until the
  guest programs the PIT. Mode 3 with an odd count reads back approximately.

Threading: run-loop thread only (port accesses and TimerQueue callbacks).
Invariants: at most one armed timer per counter; reads never change a counter except
through the latches and the LSB/MSB flip-flops.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pyhv.clock import Clock, TimerQueue
from pyhv.devices.bus import BusDevice
from pyhv.devices.irq import IrqLine, pulse
from pyhv.devices.state import MAX_NS, U8, Reader

PORT = 0x40
LENGTH = 4
PORT_B = 0x61
IRQ = 0

FREQ_HZ = 1_193_182
NS_PER_S = 1_000_000_000
REFRESH_PERIOD_NS = 15_085       # port 0x61 bit 4 toggles at this period

RW_LATCH = 0
RW_LSB = 1
RW_MSB = 2
RW_LSB_MSB = 3

PORTB_GATE2 = 0x01
PORTB_SPEAKER = 0x02
PORTB_WRITABLE = 0x0F
PORTB_REFRESH = 0x10
PORTB_OUT2 = 0x20


def _to_bcd(v: int) -> int:
    return int(str(v % 10000), 16)


def _from_bcd(v: int) -> int:
    digits = [(v >> s) & 0xF for s in (12, 8, 4, 0)]
    return int("".join(str(min(d, 9)) for d in digits))


class _Counter:
    """One of the three counters."""

    def __init__(self, pit: Pit8254, index: int, irq: IrqLine | None, gate: bool) -> None:
        self._pit = pit
        self.index = index
        self.irq = irq
        self.gate = gate
        self.mode = 0
        self.rw = RW_LSB_MSB
        self.bcd = False
        self.count = 0x10000           # effective initial count N
        self.loaded = False            # a count has been written since the control word
        self.running = False           # counting (modes 1/5: since the trigger)
        self.paused = False            # GATE low in modes 0/2/3/4
        self.null_count = True
        self.load_ns = 0
        self.base_ticks = 0            # clocks counted before load_ns (pauses)
        self._idle_out = True
        self._low_byte: int | None = None     # LSB of an LSB-then-MSB write
        self._read_msb_next = False
        self._latched_status: int | None = None
        self._latched: list[int] = []
        self._handle: int | None = None
        self._edges_done = 0           # rising edges already signalled since the load
        self.edges = 0
        self.coalesced = 0

    # ------------------------------------------------------------------ time

    def ticks(self, now: int) -> int:
        if self.paused:
            return self.base_ticks
        return self.base_ticks + (now - self.load_ns) * FREQ_HZ // NS_PER_S

    def _tick_ns(self, tick: int) -> int:
        """The guest time at which `ticks()` reaches tick (not paused)."""
        return self.load_ns + -((tick - self.base_ticks) * NS_PER_S // -FREQ_HZ)

    def out(self, now: int) -> bool:
        if not self.running:
            return self._idle_out
        mode, n = self.mode, self.count
        if self.paused and mode in (2, 3):
            return True
        d = self.ticks(now)
        if mode in (0, 1):
            return d >= n
        if mode == 2:
            return d % n != n - 1
        if mode == 3:
            return d % n < (n + 1) // 2
        return d != n                   # modes 4 and 5

    def value(self, now: int) -> int:
        """The counting element, as the guest reads it (BCD-encoded in BCD mode)."""
        modulus = 10000 if self.bcd else 0x10000
        n = self.count
        if not self.running:
            v = n % modulus
        else:
            d = self.ticks(now)
            if self.mode == 2:
                v = n - d % n
            elif self.mode == 3:
                v = n - (2 * d) % n
            else:
                v = n - d
            v %= modulus
        return _to_bcd(v) if self.bcd else v

    def status(self, now: int) -> int:
        return ((0x80 if self.out(now) else 0) | (0x40 if self.null_count else 0)
                | self.rw << 4 | self.mode << 1 | int(self.bcd))

    # ------------------------------------------------------------------ programming

    def control(self, rw: int, mode: int, bcd: bool) -> None:
        """A control word for this counter: reset its logic and wait for a count."""
        self.rw = rw
        self.mode = mode
        self.bcd = bcd
        self.loaded = False
        self.running = False
        self.paused = False
        self.null_count = True
        self._idle_out = mode != 0
        self._low_byte = None
        self._read_msb_next = False
        self._latched = []
        self._latched_status = None
        self._disarm()

    def write_count(self, value: int, now: int) -> None:
        if self.rw == RW_LSB:
            self._load(value, now)
        elif self.rw == RW_MSB:
            self._load(value << 8, now)
        elif self._low_byte is None:
            self._low_byte = value
            if self.mode == 0:          # the first byte stops counting, OUT low
                self.running = False
                self._idle_out = False
                self._disarm()
        else:
            low, self._low_byte = self._low_byte, None
            self._load(low | value << 8, now)

    def _load(self, raw: int, now: int) -> None:
        n = _from_bcd(raw) if self.bcd else raw
        if n == 0:
            n = 10000 if self.bcd else 0x10000
        self.count = n
        self.loaded = True
        self.null_count = False
        if self.mode in (1, 5):
            # Counting starts at the next GATE rising edge; a count written while a
            # one-shot runs only takes effect at the next trigger.
            self._idle_out = True
            return
        self._start(now)
        self.paused = not self.gate and self.mode in (0, 2, 3, 4)
        if self.paused:
            self.base_ticks = 0
        self._arm(now)

    def _start(self, now: int) -> None:
        self.running = True
        self.paused = False
        self.load_ns = now
        self.base_ticks = 0
        self._edges_done = 0

    def set_gate(self, high: bool, now: int) -> None:
        if high == self.gate:
            return
        self.gate = high
        if high:
            if self.loaded and self.mode in (1, 2, 3, 5):
                self._start(now)        # trigger / reload
            elif self.running and self.paused:
                self.load_ns = now      # modes 0 and 4 resume
                self.paused = False
        elif self.running and self.mode in (0, 2, 3, 4) and not self.paused:
            self.base_ticks = self.ticks(now)
            self.paused = True
        self._arm(now)

    # ------------------------------------------------------------------ reading

    def latch_count(self, now: int) -> None:
        if self._latched:
            return                      # the first latch holds until read
        v = self.value(now)
        if self.rw == RW_LSB:
            self._latched = [v & 0xFF]
        elif self.rw == RW_MSB:
            self._latched = [v >> 8]
        else:
            self._latched = [v & 0xFF, v >> 8]

    def latch_status(self, now: int) -> None:
        if self._latched_status is None:
            self._latched_status = self.status(now)

    def read(self, now: int) -> int:
        if self._latched_status is not None:
            v, self._latched_status = self._latched_status, None
            return v
        if self._latched:
            return self._latched.pop(0)
        v = self.value(now)
        if self.rw == RW_LSB:
            return v & 0xFF
        if self.rw == RW_MSB:
            return v >> 8
        msb, self._read_msb_next = self._read_msb_next, not self._read_msb_next
        return v >> 8 if msb else v & 0xFF

    # ------------------------------------------------------------------ IRQ timer

    def _disarm(self) -> None:
        if self._handle is not None:
            self._pit.timers.cancel(self._handle)
            self._handle = None

    def _next_edge(self, d: int) -> int | None:
        """The clock count of the next rising edge of OUT after d, or None."""
        n = self.count
        if self.mode in (2, 3):
            return (d // n + 1) * n
        target = n if self.mode in (0, 1) else n + 1
        return target if self._edges_done == 0 else None

    def _arm(self, now: int) -> None:
        self._disarm()
        if self.irq is None or not self.running or self.paused:
            return
        edge = self._next_edge(self.ticks(now))
        if edge is not None:
            self._handle = self._pit.timers.schedule(self._tick_ns(edge), self._fire)

    def _fire(self) -> None:
        self._handle = None
        if self.irq is None or not self.running or self.paused:
            return
        now = self._pit.clock.now_ns()
        d = self.ticks(now)
        n = self.count
        if self.mode in (2, 3):
            passed = d // n             # rising edges since the load
            if passed > self._edges_done:
                self.coalesced += passed - self._edges_done - 1
                self._edges_done = passed
                self.edges += 1
                pulse(self.irq)
        else:
            target = n if self.mode in (0, 1) else n + 1
            if d >= target and self._edges_done == 0:
                self._edges_done = 1
                self.edges += 1
                pulse(self.irq)
        self._arm(now)

    # ------------------------------------------------------------------ state records

    def save_state(self) -> dict[str, Any]:
        return {"mode": self.mode, "rw": self.rw, "bcd": self.bcd, "count": self.count,
                "loaded": self.loaded, "running": self.running, "paused": self.paused,
                "null_count": self.null_count, "gate": self.gate, "load_ns": self.load_ns,
                "base_ticks": self.base_ticks, "idle_out": self._idle_out,
                "low_byte": self._low_byte, "read_msb_next": self._read_msb_next,
                "latched_status": self._latched_status, "latched": list(self._latched),
                "edges_done": self._edges_done}

    @staticmethod
    def read_state(r: Reader) -> dict[str, Any]:
        """The checked fields of one counter's record (`done()` included)."""
        out: dict[str, Any] = {
            "mode": r.int("mode", 0, 5), "rw": r.int("rw", RW_LSB, RW_LSB_MSB),
            "bcd": r.bool("bcd"), "count": r.int("count", 1, 0x10000),
            "loaded": r.bool("loaded"), "running": r.bool("running"),
            "paused": r.bool("paused"), "null_count": r.bool("null_count"),
            "gate": r.bool("gate"), "load_ns": r.int("load_ns", 0, MAX_NS),
            "base_ticks": r.int("base_ticks", 0, MAX_NS),
            "_idle_out": r.bool("idle_out"), "_low_byte": r.opt_int("low_byte", 0, U8),
            "_read_msb_next": r.bool("read_msb_next"),
            "_latched_status": r.opt_int("latched_status", 0, U8),
            "_latched": r.ints("latched", 0, U8, max_len=2),
            "_edges_done": r.int("edges_done", 0, MAX_NS)}
        r.done()
        return out

    def load_fields(self, fields: dict[str, Any]) -> None:
        """Take checked fields; re-arm the IRQ timer at the edge it was armed for."""
        for k, v in fields.items():
            setattr(self, k, v)
        self._disarm()
        if self.irq is None or not self.running or self.paused:
            return
        if self.mode in (2, 3):
            edge: int | None = (self._edges_done + 1) * self.count
        else:
            edge = (self.count if self.mode in (0, 1) else self.count + 1) \
                if self._edges_done == 0 else None
        if edge is not None:
            self._handle = self._pit.timers.schedule(self._tick_ns(edge), self._fire)


class Pit8254:
    """The 8254 at 0x40-0x43. Counter 0 pulses `irq0`; counter 2's gate is port 0x61's."""

    def __init__(self, clock: Clock, timers: TimerQueue, irq0: IrqLine) -> None:
        self.clock = clock
        self.timers = timers
        self.counters = (_Counter(self, 0, irq0, True), _Counter(self, 1, None, True),
                         _Counter(self, 2, None, False))

    def regions(self) -> list[tuple[int, int, BusDevice, str]]:
        """(base, length, device, name) to register on the port bus (0x61 is PortB's)."""
        return [(PORT, LENGTH, self, "pit8254")]

    @property
    def coalesced(self) -> int:
        """IRQ 0 edges merged into a later one because the run loop was late."""
        return self.counters[0].coalesced

    def read(self, offset: int, size: int) -> int:
        if offset < 3:
            return self.counters[offset].read(self.clock.now_ns())
        return 0                        # the control word register is write-only

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        now = self.clock.now_ns()
        if offset < 3:
            self.counters[offset].write_count(value, now)
            return
        sc = value >> 6
        if sc == 3:
            self._read_back(value, now)
            return
        counter = self.counters[sc]
        rw = (value >> 4) & 3
        if rw == RW_LATCH:
            counter.latch_count(now)
            return
        mode = (value >> 1) & 7
        if mode > 5:
            mode -= 4                   # 6 and 7 are 2 and 3
        counter.control(rw, mode, bool(value & 1))

    def _read_back(self, value: int, now: int) -> None:
        for i, counter in enumerate(self.counters):
            if not value & (2 << i):
                continue
            if not value & 0x10:
                counter.latch_status(now)
            if not value & 0x20:
                counter.latch_count(now)

    def set_gate(self, index: int, high: bool) -> None:
        self.counters[index].set_gate(high, self.clock.now_ns())

    def out(self, index: int) -> bool:
        return self.counters[index].out(self.clock.now_ns())

    # ------------------------------------------------------------------ state records

    state_version: ClassVar[int] = 1

    def save_state(self) -> dict[str, Any]:
        return {"counters": [c.save_state() for c in self.counters]}

    def load_state(self, record: Mapping[str, Any], version: int) -> None:
        """Counter 0's IRQ timer is armed again on the (restored) clock."""
        r = Reader("pit", record)
        fields = [_Counter.read_state(c) for c in r.subs("counters", length=3)]
        r.done()
        for c, f in zip(self.counters, fields, strict=True):
            c.load_fields(f)


class SystemControlPortB:
    """Port 0x61: counter 2's gate and OUT, the speaker enable and the refresh toggle."""

    def __init__(self, pit: Pit8254) -> None:
        self.pit = pit
        self.value = 0

    def regions(self) -> list[tuple[int, int, BusDevice, str]]:
        """(base, length, device, name) to register on the port bus."""
        return [(PORT_B, 1, self, "port61")]

    def read(self, offset: int, size: int) -> int:
        now = self.pit.clock.now_ns()
        v = self.value
        if (now // REFRESH_PERIOD_NS) & 1:
            v |= PORTB_REFRESH
        if self.pit.counters[2].out(now):
            v |= PORTB_OUT2
        return v

    def write(self, offset: int, size: int, value: int) -> None:
        self.value = value & PORTB_WRITABLE
        self.pit.set_gate(2, bool(value & PORTB_GATE2))
    # ------------------------------------------------------------------ state records

    state_version: ClassVar[int] = 1

    def save_state(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state(self, record: Mapping[str, Any], version: int) -> None:
        r = Reader("port61", record)
        value = r.int("value", 0, PORTB_WRITABLE)
        r.done()
        self.value = value        # counter 2's gate is in the PIT's own record
