"""The local APIC, one per vCPU: xAPIC registers at 0xfee00000 and the x2APIC MSRs.

Facts (Intel SDM Vol. 3A, chapter 10 "Advanced Programmable Interrupt Controller";
x2APIC: 10.12; TSC-deadline: 10.5.4.1):

    offset  MSR    register
    0x020   0x802  ID (xAPIC: bits 31:24; x2APIC: the whole 32 bits, read-only)
    0x030   0x803  version: 0x14, max LVT entry 5 (bits 23:16), no EOI-broadcast
                   suppression (bit 24 clear)
    0x080   0x808  TPR              0x0a0  0x80a  PPR (read-only)
    0x0b0   0x80b  EOI (write)      0x0d0  0x80d  LDR (x2APIC: read-only, derived)
    0x0e0   -      DFR (xAPIC only) 0x0f0  0x80f  SVR (bit 8 software enable)
    0x100.. 0x810  ISR, TMR (0x180), IRR (0x200): 8 x 32 bits each, read-only
    0x280   0x828  ESR: a write latches the errors seen since the last write
    0x300   0x830  ICR low (xAPIC: a write sends; x2APIC: one 64-bit MSR)
    0x310   -      ICR high (destination in bits 31:24)
    0x320.. 0x832  LVT timer, thermal (0x330), perf (0x340), LINT0 (0x350),
                   LINT1 (0x360), error (0x370)
    0x380   0x838  timer initial count   0x390 0x839 current count (read-only)
    0x3e0   0x83e  timer divide configuration
    -       0x83f  self IPI (x2APIC only)
    IA32_APIC_BASE (MSR 0x1b): base 0xfee00000, bit 8 BSP, bit 10 x2APIC, bit 11 enable
    IA32_TSC_DEADLINE (MSR 0x6e0)

    ESR bits: 0x20 send illegal vector, 0x40 receive illegal vector,
              0x80 illegal register address

Design:
- IRR, ISR and TMR are 256-bit integers; PPR follows the SDM (TPR if its class is at
  least the highest in-service class, else that class). An interrupt is deliverable when
  its class is above PPR's and the APIC is software-enabled (SVR bit 8).
- The 8259 reaches the CPU through LINT0 (virtual wire): while LVT LINT0 is unmasked
  with delivery mode ExtINT (or the APIC is globally disabled through IA32_APIC_BASE),
  `pending()` includes the PIC's INTR and `acknowledge()` runs the PIC's INTA cycle. As
  QEMU does (a PC BIOS does the same), the BSP's LINT0 starts as ExtINT, so every guest
  written for the 8259 runs unchanged. APIC interrupts are served before the PIC's.
- The timer runs on the machine's clock (`Clock` + `TimerQueue`), one bus cycle per
  `ns_per_tick` ns (1 ns: a 1 GHz APIC bus, as QEMU's): the current count is computed
  when read, nothing ticks. One-shot fires once; periodic re-arms from the previous
  deadline, and missed periods become one interrupt (never a storm); TSC-deadline
  converts the deadline with the `tsc` callable and `tsc_hz` given by the machine.
- Messages (IPIs, I/O APIC interrupts) arrive through `accept`; INIT and SIPI are handed
  to the machine's callbacks (`on_init`, `on_sipi`), which start or reset the vCPU. NMI
  is a flag served before anything else through vector 2.
- Bad input as on hardware: vectors below 16 set ESR (send or receive illegal vector)
  and are dropped; unknown offsets read 0 and set ESR bit 7; writes to read-only
  registers and misaligned or partial xAPIC writes are ignored; LVT writes keep their
  mask bit while the APIC is software-disabled. An x2APIC access that is not allowed
  (x2APIC mode off, a read-only or missing register, reserved bits) raises `ApicFault`,
  which an engine turns into #GP, never a traceback.

Threading: run-loop thread only, like every device. Invariants: state is a fixed set of
integers (IRR/ISR/TMR < 2**256, flags); `accept` never queues, so no guest can grow it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pyhv.devices.apicbus import (
    EXTINT,
    FIXED,
    INIT,
    LOWEST,
    NMI,
    SH_SELF,
    SIPI,
    SMI,
    ApicBus,
    Message,
)
from pyhv.devices.state import MAX_NS, Reader

if TYPE_CHECKING:
    from pyhv.clock import Clock, TimerQueue

APIC_BASE_ADDR = 0xFEE00000
APIC_MMIO_SIZE = 0x1000
BASE_BSP = 1 << 8
BASE_EXTD = 1 << 10
BASE_ENABLE = 1 << 11
BASE_ADDR_MASK = 0xFFFFFF000

VERSION = 0x00050014
LVT_MASKED = 1 << 16
LVT_PENDING = 1 << 12
LVT_LEVEL = 1 << 15
LVT_REMOTE_IRR = 1 << 14
SVR_ENABLE = 1 << 8

ESR_SEND_ILLEGAL = 0x20
ESR_RECV_ILLEGAL = 0x40
ESR_ILLEGAL_REG = 0x80

TIMER_ONESHOT, TIMER_PERIODIC, TIMER_TSC_DEADLINE = 0, 1, 2

# LVT index: offset
LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR = range(6)
LVT_OFFSETS = {0x320: LVT_TIMER, 0x330: LVT_THERMAL, 0x340: LVT_PERF, 0x350: LVT_LINT0,
               0x360: LVT_LINT1, 0x370: LVT_ERROR}
# writable bits of each LVT (SDM Figure 10-8)
LVT_WRITABLE = {LVT_TIMER: 0x700FF, LVT_THERMAL: 0x107FF, LVT_PERF: 0x107FF,
                LVT_LINT0: 0x1A7FF, LVT_LINT1: 0x1A7FF, LVT_ERROR: 0x100FF}

MSR_APIC_BASE = 0x1B
MSR_TSC_DEADLINE = 0x6E0
X2APIC_FIRST, X2APIC_LAST = 0x800, 0x8FF
X2APIC_SELF_IPI = 0x83F


class Intr(Protocol):
    """The 8259's side of the virtual wire (INTR and INTA)."""

    def pending(self) -> bool: ...

    def acknowledge(self) -> int | None: ...


class ApicFault(Exception):
    """An access the CPU refuses with #GP(0) (x2APIC MSR rules, IA32_APIC_BASE)."""


def _vec_bit(v: int) -> int:
    return 1 << (v & 0xFF)


class LocalApic:
    """One vCPU's local APIC (an `InterruptSource` for the engine)."""

    def __init__(self, index: int, bus: ApicBus, clock: Clock, timers: TimerQueue, *,
                 bsp: bool = False, pic: Intr | None = None,
                 tsc: Callable[[], int] | None = None, tsc_hz: int = 1_000_000_000,
                 ns_per_tick: int = 1) -> None:
        self.index = index
        self.bus = bus
        self.clock = clock
        self.timers = timers
        self.bsp = bsp
        self.pic = pic
        self.tsc = tsc
        self.tsc_hz = tsc_hz
        # an engine that takes NMIs through take_nmi() regardless of IF sets this; else
        # an NMI is served through pending()/acknowledge() as vector 2 (waits for IF)
        self.nmi_separate = False
        self.ns_per_tick = ns_per_tick
        self.on_init: Callable[[], None] = lambda: None
        self.on_sipi: Callable[[int], None] = lambda _v: None
        self.on_wake: Callable[[], None] = lambda: None
        self.timer_fired = 0
        self.received: dict[int, int] = {}      # messages accepted, by delivery mode
        self.ipis_from_others = 0               # IPIs accepted from other local APICs
        self._timer_handle: int | None = None
        self.reset(power_on=True)
        bus.attach(self)

    # ------------------------------------------------------------------ state

    def reset(self, *, power_on: bool = False) -> None:
        """Power-on / INIT state (SDM 10.4.7.1); the ID and base survive an INIT."""
        if power_on:
            self.apic_id = self.index
            self.base = APIC_BASE_ADDR | BASE_ENABLE | (BASE_BSP if self.bsp else 0)
        self.tpr = 0
        self.ldr = 0
        self.dfr = 0xFFFFFFFF
        self.svr = 0xFF
        self.irr = 0
        self.isr = 0
        self.tmr = 0
        self.esr = 0
        self._esr_pending = 0
        self.icr = 0
        self.lvt = [LVT_MASKED] * 6
        if self.bsp:
            self.lvt[LVT_LINT0] = 0x700          # ExtINT, unmasked: the BIOS's virtual wire
        self.initial_count = 0
        self.dcr = 0
        self.tsc_deadline = 0
        self.nmi_pending = False
        self._timer_start = 0
        self._timer_period_ns = 0
        self._cancel_timer()

    @property
    def enabled(self) -> bool:
        """Globally enabled (IA32_APIC_BASE bit 11)."""
        return bool(self.base & BASE_ENABLE)

    @property
    def x2apic(self) -> bool:
        return bool(self.base & BASE_EXTD) and self.enabled

    @property
    def sw_enabled(self) -> bool:
        return bool(self.svr & SVR_ENABLE)

    # ------------------------------------------------------------------ priorities

    def ppr(self) -> int:
        isrv = self.isr.bit_length() - 1 if self.isr else 0
        if (self.tpr >> 4) >= (isrv >> 4):
            return self.tpr & 0xFF
        return isrv & 0xF0

    def _highest_irr(self) -> int:
        return self.irr.bit_length() - 1 if self.irr else -1

    def _extint(self) -> bool:
        """The 8259's INTR reaches the CPU (virtual wire through LINT0)."""
        if self.pic is None:
            return False
        if not self.enabled:
            return True
        lint0 = self.lvt[LVT_LINT0]
        return not lint0 & LVT_MASKED and (lint0 >> 8) & 7 == EXTINT

    # ------------------------------------------------------------------ InterruptSource

    def pending(self) -> bool:
        if self.nmi_pending and not self.nmi_separate:
            return True
        if self.irr and self.enabled and self.sw_enabled:
            v = self.irr.bit_length() - 1
            if (v >> 4) > (self.ppr() >> 4):
                return True
        return self._extint() and self.pic is not None and self.pic.pending()

    def acknowledge(self) -> int | None:
        """The vector the CPU takes now (INTA), or None when nothing is left."""
        if self.nmi_pending and not self.nmi_separate:
            self.nmi_pending = False
            return 2
        if self.irr and self.enabled and self.sw_enabled:
            v = self._highest_irr()
            if (v >> 4) > (self.ppr() >> 4):
                self.irr &= ~_vec_bit(v)
                self.isr |= _vec_bit(v)
                return v
        if self._extint() and self.pic is not None and self.pic.pending():
            return self.pic.acknowledge()
        return None

    def take_nmi(self) -> bool:
        """For an engine that delivers NMIs itself, whatever IF (`nmi_separate` set, so
        pending()/acknowledge() leave them out): True once per NMI received."""
        if self.nmi_pending:
            self.nmi_pending = False
            return True
        return False

    # ------------------------------------------------------------------ messages

    def matches(self, dest: int, logical: bool) -> bool:
        """Whether a message's destination names this APIC (SDM 10.6.2)."""
        if self.x2apic:
            if not logical:
                return dest == 0xFFFFFFFF or dest == self.apic_id
            if dest == 0xFFFFFFFF:
                return True
            ldr = self._x2apic_ldr()
            return (dest >> 16) == (ldr >> 16) and bool(dest & ldr & 0xFFFF)
        dest &= 0xFF
        if not logical:
            return dest == 0xFF or dest == (self.apic_id & 0xFF)
        if dest == 0xFF:
            return True
        ldr = self.ldr >> 24
        if (self.dfr >> 28) == 0xF:                       # flat model
            return bool(ldr & dest)
        return (dest >> 4) == (ldr >> 4) and bool(dest & ldr & 0xF)   # cluster model

    def accept(self, msg: Message) -> bool:
        """A message for this APIC; False when it was dropped (illegal vector)."""
        mode = msg.mode
        self.received[mode] = self.received.get(mode, 0) + 1
        if msg.source is not None and msg.source != self.index:
            self.ipis_from_others += 1
        if mode in (FIXED, LOWEST):
            if msg.vector < 16:
                self._error(ESR_RECV_ILLEGAL)
                return False
            self._set_irr(msg.vector, msg.level_triggered)
        elif mode == NMI:
            self.nmi_pending = True
            self.on_wake()
        elif mode == INIT:
            if msg.level_triggered and not msg.assert_level:
                return True                      # INIT level de-assert: nothing to do
            self.on_init()
        elif mode == SIPI:
            self.on_sipi(msg.vector & 0xFF)
        elif mode == EXTINT:
            return self._extint()
        elif mode == SMI:
            return False                         # no SMM: the message is dropped
        else:
            return False                         # reserved delivery modes
        return True

    def _set_irr(self, vector: int, level: bool) -> None:
        bit = _vec_bit(vector)
        self.irr |= bit
        if level:
            self.tmr |= bit
        else:
            self.tmr &= ~bit
        self.on_wake()

    def _error(self, bits: int) -> None:
        """Record an error in the ESR and raise the LVT error interrupt once."""
        new = bits & ~self._esr_pending
        self._esr_pending |= bits
        lvt = self.lvt[LVT_ERROR]
        if new and not lvt & LVT_MASKED and (lvt & 0xFF) >= 16:
            self._set_irr(lvt & 0xFF, False)

    def _local(self, lvt_index: int) -> None:
        """Deliver a local interrupt source through its LVT entry."""
        lvt = self.lvt[lvt_index]
        if lvt & LVT_MASKED:
            return
        mode = (lvt >> 8) & 7
        if mode == NMI:
            self.nmi_pending = True
            self.on_wake()
        elif mode == FIXED:
            if (lvt & 0xFF) < 16:
                self._error(ESR_RECV_ILLEGAL)
                return
            self._set_irr(lvt & 0xFF, False)

    def eoi(self) -> None:
        if not self.isr:
            return
        v = self.isr.bit_length() - 1
        self.isr &= ~_vec_bit(v)
        if self.tmr & _vec_bit(v):
            self.tmr &= ~_vec_bit(v)
            self.bus.eoi(v)

    def send_ipi(self, icr: int, x2apic: bool) -> None:
        """The ICR was written: send what it describes."""
        vector = icr & 0xFF
        mode = (icr >> 8) & 7
        logical = bool(icr & (1 << 11))
        level = bool(icr & (1 << 14))
        trigger = bool(icr & (1 << 15))
        shorthand = (icr >> 18) & 3
        dest = (icr >> 32) & 0xFFFFFFFF if x2apic else (icr >> 56) & 0xFF
        if mode in (FIXED, LOWEST) and vector < 16:
            self._error(ESR_SEND_ILLEGAL)
            return
        if mode in (3, 7) or (mode == LOWEST and shorthand == SH_SELF):
            return                       # reserved (and ExtINT/lowest to self): dropped
        if mode in (INIT, SIPI) and shorthand == SH_SELF:
            return
        self.bus.send(Message(vector=vector, mode=mode, logical=logical, dest=dest,
                              level_triggered=trigger, assert_level=level,
                              shorthand=shorthand, source=self.index))

    # ------------------------------------------------------------------ the timer

    def _divisor(self) -> int:
        v = (self.dcr & 3) | ((self.dcr >> 1) & 4)
        return 1 << ((v + 1) & 7)

    def _timer_mode(self) -> int:
        return (self.lvt[LVT_TIMER] >> 17) & 3

    def _cancel_timer(self) -> None:
        if self._timer_handle is not None:
            self.timers.cancel(self._timer_handle)
            self._timer_handle = None

    def _start_count(self) -> None:
        self._cancel_timer()
        if self.initial_count == 0 or self._timer_mode() == TIMER_TSC_DEADLINE:
            self._timer_period_ns = 0
            return
        self._timer_start = self.clock.now_ns()
        self._timer_period_ns = self.initial_count * self._divisor() * self.ns_per_tick
        self._timer_handle = self.timers.schedule(self._timer_start + self._timer_period_ns,
                                                  self._timer_expired)

    def _timer_expired(self) -> None:
        self._timer_handle = None
        self.timer_fired += 1
        self._local(LVT_TIMER)
        if self._timer_mode() == TIMER_PERIODIC and self._timer_period_ns:
            now = self.clock.now_ns()
            period = self._timer_period_ns
            nxt = self._timer_start + period
            if nxt <= now:                     # missed periods become this one interrupt
                nxt += ((now - nxt) // period + 1) * period
            self._timer_start = nxt - period
            self._timer_handle = self.timers.schedule(nxt, self._timer_expired)
        elif self._timer_mode() != TIMER_TSC_DEADLINE:
            self._timer_period_ns = 0          # one-shot: the count stays at 0

    def current_count(self) -> int:
        if self._timer_period_ns == 0 or self._timer_mode() == TIMER_TSC_DEADLINE:
            return 0
        elapsed = self.clock.now_ns() - self._timer_start
        ticks = elapsed // (self._divisor() * self.ns_per_tick)
        if ticks >= self.initial_count:
            return 0
        return self.initial_count - ticks

    def _set_tsc_deadline(self, value: int) -> None:
        self.tsc_deadline = value & 0xFFFFFFFFFFFFFFFF
        if self._timer_mode() != TIMER_TSC_DEADLINE:
            return                           # ignored outside TSC-deadline mode
        self._cancel_timer()
        if self.tsc_deadline == 0 or self.tsc is None:
            return
        left = self.tsc_deadline - self.tsc()
        ns = max(0, left) * 1_000_000_000 // self.tsc_hz
        self._timer_handle = self.timers.schedule(self.clock.now_ns() + ns,
                                                  self._deadline_reached)

    def _deadline_reached(self) -> None:
        self._timer_handle = None
        self.tsc_deadline = 0
        self.timer_fired += 1
        self._local(LVT_TIMER)

    # ------------------------------------------------------------------ registers

    def _x2apic_ldr(self) -> int:
        return ((self.apic_id >> 4) << 16) | (1 << (self.apic_id & 0xF))

    def read_reg(self, off: int) -> int | None:
        """The 32-bit register at xAPIC offset off (None: no such register)."""
        if off == 0x20:
            return self.apic_id if self.x2apic else (self.apic_id & 0xFF) << 24
        if off == 0x30:
            return VERSION
        if off == 0x80:
            return self.tpr
        if off == 0x90:
            return 0                          # APR: lowest-priority arbitration, unused
        if off == 0xA0:
            return self.ppr()
        if off == 0xB0:
            return 0                          # EOI is write-only; reads 0
        if off == 0xC0:
            return 0
        if off == 0xD0:
            return self._x2apic_ldr() if self.x2apic else self.ldr
        if off == 0xE0 and not self.x2apic:
            return self.dfr
        if off == 0xF0:
            return self.svr
        if 0x100 <= off < 0x280:
            word = (off - 0x100) >> 4
            bank = (self.isr, self.tmr, self.irr)[word >> 3]
            return (bank >> (32 * (word & 7))) & 0xFFFFFFFF
        if off == 0x280:
            return self.esr
        if off == 0x300:
            return self.icr & 0xFFFFFFFF & ~LVT_PENDING     # delivery is instant: idle
        if off == 0x310 and not self.x2apic:
            return (self.icr >> 32) & 0xFF000000
        if off in LVT_OFFSETS:
            return self.lvt[LVT_OFFSETS[off]]
        if off == 0x380:
            return self.initial_count
        if off == 0x390:
            return self.current_count()
        if off == 0x3E0:
            return self.dcr
        return None

    def write_reg(self, off: int, value: int) -> bool:
        """Write the 32-bit register at off; False when it is not writable."""
        value &= 0xFFFFFFFF
        if off == 0x20 and not self.x2apic:
            self.apic_id = value >> 24
        elif off == 0x80:
            self.tpr = value & 0xFF
        elif off == 0xB0:
            self.eoi()
        elif off == 0xD0 and not self.x2apic:
            self.ldr = value & 0xFF000000
        elif off == 0xE0 and not self.x2apic:
            self.dfr = value | 0x0FFFFFFF
        elif off == 0xF0:
            self.svr = value & 0x11FF
            if not self.svr & SVR_ENABLE:
                self.lvt = [x | LVT_MASKED for x in self.lvt]
        elif off == 0x280:
            self.esr = self._esr_pending       # latch the errors seen since the last write
            self._esr_pending = 0
        elif off == 0x300:
            if self.x2apic:
                return False
            self.icr = (self.icr & ~0xFFFFFFFF) | (value & 0xFFFFFFFF)
            self.send_ipi(self.icr, False)
        elif off == 0x310 and not self.x2apic:
            self.icr = (self.icr & 0xFFFFFFFF) | ((value & 0xFF000000) << 32)
        elif off in LVT_OFFSETS:
            i = LVT_OFFSETS[off]
            old_mode = self._timer_mode()
            v = value & LVT_WRITABLE[i]
            if i == LVT_TIMER and (v >> 17) & 3 == 3:
                v = (v & ~(3 << 17)) | (old_mode << 17)    # reserved mode: kept
            if not self.sw_enabled:
                v |= LVT_MASKED
            keep = self.lvt[i] & (LVT_REMOTE_IRR | LVT_PENDING)
            self.lvt[i] = v | keep
            if i == LVT_TIMER and self._timer_mode() != old_mode:
                self._cancel_timer()           # a mode change stops the timer
                self._timer_period_ns = 0
                self.tsc_deadline = 0
        elif off == 0x380:
            if self._timer_mode() == TIMER_TSC_DEADLINE:
                return True                    # ignored in TSC-deadline mode
            self.initial_count = value
            self._start_count()
        elif off == 0x3E0:
            self.dcr = value & 0xB
        else:
            return False
        return True

    # ------------------------------------------------------------------ xAPIC MMIO

    def read(self, offset: int, size: int) -> int:
        if self.x2apic or not self.enabled:
            return 0xFFFFFFFF & ((1 << (8 * size)) - 1)
        reg = offset & 0xFF0
        value = self.read_reg(reg)
        if value is None:
            self._error(ESR_ILLEGAL_REG)
            return 0
        shift = 8 * (offset & 3) if (offset & 0xF) < 4 else 32
        return (value >> shift) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        if self.x2apic or not self.enabled:
            return
        if size != 4 or offset & 0xF:
            return                               # partial or misaligned: ignored
        reg = offset & 0xFF0
        if self.read_reg(reg) is None:
            self._error(ESR_ILLEGAL_REG)
            return
        self.write_reg(reg, value)

    # ------------------------------------------------------------------ MSRs

    def handles_msr(self, msr: int) -> bool:
        return msr in (MSR_APIC_BASE, MSR_TSC_DEADLINE) or X2APIC_FIRST <= msr <= X2APIC_LAST

    def msr_read(self, msr: int) -> int:
        if msr == MSR_APIC_BASE:
            return self.base
        if msr == MSR_TSC_DEADLINE:
            return self.tsc_deadline
        if not self.x2apic:
            raise ApicFault(f"x2APIC MSR {msr:#x} read with x2APIC mode off")
        off = (msr - X2APIC_FIRST) << 4
        if msr == 0x830:
            return self.icr & ~LVT_PENDING
        if off in (0xB0, 0x3F0) or msr == X2APIC_SELF_IPI:
            raise ApicFault(f"x2APIC MSR {msr:#x} is write-only")
        value = self.read_reg(off)
        if value is None:
            raise ApicFault(f"no x2APIC register at MSR {msr:#x}")
        return value

    def msr_write(self, msr: int, value: int) -> None:
        value &= 0xFFFFFFFFFFFFFFFF
        if msr == MSR_APIC_BASE:
            self._write_base(value)
            return
        if msr == MSR_TSC_DEADLINE:
            self._set_tsc_deadline(value)
            return
        if not self.x2apic:
            raise ApicFault(f"x2APIC MSR {msr:#x} written with x2APIC mode off")
        if msr == 0x830:
            self.icr = value & 0xFFFFFFFF000CCFFF
            self.send_ipi(self.icr, True)
            return
        if msr == X2APIC_SELF_IPI:
            if value >> 8:
                raise ApicFault("reserved bits in the x2APIC SELF IPI register")
            self.send_ipi(value & 0xFF | SH_SELF << 18, True)
            return
        if value >> 32:
            raise ApicFault(f"reserved bits in a write of {value:#x} to MSR {msr:#x}")
        off = (msr - X2APIC_FIRST) << 4
        if off == 0xB0 and value:
            raise ApicFault("a non-zero write to the x2APIC EOI register")
        if off in (0x20, 0x30, 0xA0, 0xD0, 0x390) or 0x100 <= off < 0x280:
            raise ApicFault(f"x2APIC MSR {msr:#x} is read-only")
        if off == 0x280 and value:
            raise ApicFault("a non-zero write to the x2APIC ESR")
        if not self.write_reg(off, value):
            raise ApicFault(f"no writable x2APIC register at MSR {msr:#x}")

    def _write_base(self, value: int) -> None:
        """IA32_APIC_BASE: the legal transitions of SDM Figure 10-27."""
        if value & ~(BASE_ADDR_MASK | BASE_BSP | BASE_EXTD | BASE_ENABLE):
            raise ApicFault(f"reserved bits in IA32_APIC_BASE {value:#x}")
        en, extd = bool(value & BASE_ENABLE), bool(value & BASE_EXTD)
        if extd and not en:
            raise ApicFault("IA32_APIC_BASE: x2APIC without enable is invalid")
        if self.x2apic and en and not extd:
            raise ApicFault("IA32_APIC_BASE: x2APIC -> xAPIC without disabling first")
        if not self.enabled and extd:
            raise ApicFault("IA32_APIC_BASE: disabled -> x2APIC directly")
        bsp = self.base & BASE_BSP
        if (value & BASE_ADDR_MASK) != APIC_BASE_ADDR:
            # relocation is not modelled: the APIC stays at 0xfee00000 (as on KVM)
            value = (value & ~BASE_ADDR_MASK) | APIC_BASE_ADDR
        was_enabled = self.enabled
        self.base = (value & ~BASE_BSP) | bsp
        if not en and was_enabled:
            self.reset()                        # global disable: back to the reset state

    # ------------------------------------------------------------------ state records

    state_version: ClassVar[int] = 1
    _U32 = ("apic_id", "ldr", "dfr", "svr", "esr", "esr_pending", "initial_count")

    def save_state(self) -> dict[str, Any]:
        """Registers, IRR/ISR/TMR (256-bit integers) and the timer: where its count
        began, its period, and whether it is armed."""
        return {"apic_id": self.apic_id, "base": self.base, "tpr": self.tpr,
                "ldr": self.ldr, "dfr": self.dfr, "svr": self.svr, "irr": self.irr,
                "isr": self.isr, "tmr": self.tmr, "esr": self.esr,
                "esr_pending": self._esr_pending, "icr": self.icr, "lvt": list(self.lvt),
                "initial_count": self.initial_count, "dcr": self.dcr,
                "tsc_deadline": self.tsc_deadline, "nmi_pending": self.nmi_pending,
                "timer_start": self._timer_start, "timer_period_ns": self._timer_period_ns,
                "timer_armed": self._timer_handle is not None}

    def load_state(self, record: Mapping[str, Any], version: int) -> None:
        """The timer is armed again on the (restored) clock at its saved deadline."""
        r = Reader(f"lapic.{self.index}", record)
        u32 = {k: r.int(k, 0, 0xFFFFFFFF) for k in self._U32}
        base = r.int("base", 0, (1 << 64) - 1)
        if base & ~(BASE_ADDR_MASK | BASE_BSP | BASE_EXTD | BASE_ENABLE) or \
                (base & BASE_ADDR_MASK) != APIC_BASE_ADDR or \
                (base & BASE_EXTD and not base & BASE_ENABLE) or \
                bool(base & BASE_BSP) != self.bsp:
            raise r.fail("base", f"= {base:#x} is not an IA32_APIC_BASE this vCPU can have")
        tpr = r.int("tpr", 0, 0xFF)
        vectors = {k: r.int(k, 0, (1 << 256) - 1) for k in ("irr", "isr", "tmr")}
        icr = r.int("icr", 0, (1 << 64) - 1)
        lvt = r.ints("lvt", 0, 0xFFFFFFFF, length=6)
        dcr = r.int("dcr", 0, 0xB)
        tsc_deadline = r.int("tsc_deadline", 0, (1 << 64) - 1)
        nmi_pending = r.bool("nmi_pending")
        timer_start = r.int("timer_start", 0, MAX_NS)
        period = r.int("timer_period_ns", 0, MAX_NS)
        armed = r.bool("timer_armed")
        r.done()
        self._cancel_timer()
        self.apic_id, self.ldr, self.dfr, self.svr = (u32["apic_id"], u32["ldr"],
                                                      u32["dfr"], u32["svr"])
        self.esr, self._esr_pending = u32["esr"], u32["esr_pending"]
        self.initial_count = u32["initial_count"]
        self.base, self.tpr, self.icr, self.lvt, self.dcr = base, tpr, icr, lvt, dcr
        self.irr, self.isr, self.tmr = vectors["irr"], vectors["isr"], vectors["tmr"]
        self.tsc_deadline, self.nmi_pending = tsc_deadline, nmi_pending
        self._timer_start, self._timer_period_ns = timer_start, period
        if not armed:
            return
        if self._timer_mode() == TIMER_TSC_DEADLINE:
            self._set_tsc_deadline(tsc_deadline)
        elif period:
            self._timer_handle = self.timers.schedule(timer_start + period,
                                                      self._timer_expired)
