"""Local APIC: registers, priorities, IPIs and destinations, the timer's three modes,
x2APIC MSRs, the 8259 virtual wire, and hostile register traffic (hypothesis)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyhv.clock import TimerQueue, VirtualClock
from pyhv.devices.apicbus import ApicBus
from pyhv.devices.ioapic import IoApic
from pyhv.devices.irq import pulse
from pyhv.devices.lapic import (
    BASE_ENABLE,
    BASE_EXTD,
    MSR_APIC_BASE,
    MSR_TSC_DEADLINE,
    ApicFault,
    LocalApic,
)
from pyhv.devices.pic8259 import PicPair

ID, VER, TPR, PPR, EOI, LDR, DFR, SVR = 0x20, 0x30, 0x80, 0xA0, 0xB0, 0xD0, 0xE0, 0xF0
ISR0, TMR0, IRR0, ESR, ICR_LO, ICR_HI = 0x100, 0x180, 0x200, 0x280, 0x300, 0x310
LVT_T, LINT0, LVT_ERR, TICR, TCCR, TDCR = 0x320, 0x350, 0x370, 0x380, 0x390, 0x3E0


class Rig:
    def __init__(self, n: int = 2, pic: bool = False) -> None:
        self.clock = VirtualClock()
        self.timers = TimerQueue(self.clock)
        self.bus = ApicBus()
        self.pic = PicPair() if pic else None
        self.tsc_base = 0
        self.apics = [LocalApic(i, self.bus, self.clock, self.timers, bsp=(i == 0),
                                pic=self.pic if i == 0 else None,
                                tsc=lambda: self.clock.now_ns() + self.tsc_base,
                                tsc_hz=1_000_000_000)
                      for i in range(n)]
        self.inits: list[int] = []
        self.sipis: list[tuple[int, int]] = []
        for a in self.apics:
            a.on_init = lambda a=a: self.inits.append(a.index)
            a.on_sipi = lambda v, a=a: self.sipis.append((a.index, v))

    def w(self, cpu: int, off: int, v: int) -> None:
        self.apics[cpu].write(off, 4, v)

    def r(self, cpu: int, off: int) -> int:
        return self.apics[cpu].read(off, 4)

    def enable(self, cpu: int) -> None:
        self.w(cpu, SVR, 0x1FF)

    def ipi(self, cpu: int, lo: int, dest: int = 0) -> None:
        self.w(cpu, ICR_HI, dest << 24)
        self.w(cpu, ICR_LO, lo)

    def advance(self, ns: int) -> int:
        self.clock.advance(ns)
        return self.timers.fire_due()

    def take(self, cpu: int) -> list[int]:
        out = []
        a = self.apics[cpu]
        while a.pending():
            v = a.acknowledge()
            assert v is not None
            out.append(v)
            a.write(EOI, 4, 0)
        return out


def test_reset_state() -> None:
    r = Rig()
    assert r.r(0, VER) == 0x00050014
    assert r.r(0, ID) == 0 and r.r(1, ID) == 1 << 24
    assert r.r(0, SVR) == 0xFF                  # software-disabled
    assert r.r(0, LINT0) == 0x700               # the BSP's virtual wire (ExtINT)
    assert r.r(1, LINT0) == 0x10000             # an AP's LVTs are masked
    assert r.apics[0].msr_read(MSR_APIC_BASE) == 0xFEE00900
    assert r.apics[1].msr_read(MSR_APIC_BASE) == 0xFEE00800


def test_virtual_wire_passes_the_8259() -> None:
    r = Rig(pic=True)
    assert r.pic is not None
    r.pic.master.imr = 0
    r.pic.update()
    a = r.apics[0]
    assert not a.pending()
    pulse(r.pic.irq_line(1))
    assert a.pending()
    assert a.acknowledge() == 0x09
    r.pic.master.write(0, 1, 0x20)               # EOI at the 8259
    r.w(0, LINT0, 0x10700)                       # masked: the 8259 no longer reaches us
    pulse(r.pic.irq_line(1))
    assert not a.pending()
    a.msr_write(MSR_APIC_BASE, 0xFEE00000 | 0x100)   # globally disabled: PIC mode again
    assert a.pending()


def test_fixed_ipi_priorities_and_eoi() -> None:
    r = Rig()
    r.enable(1)
    r.ipi(0, 0x40, dest=1)
    r.ipi(0, 0x31, dest=1)
    r.ipi(0, 0x55, dest=1)
    a = r.apics[1]
    assert r.r(1, IRR0 + 0x20) == 1 << (0x40 - 64) | 1 << (0x55 - 64)   # vectors 64..95
    assert r.r(1, IRR0 + 0x10) == 1 << (0x31 - 32)
    assert a.acknowledge() == 0x55
    assert r.r(1, PPR) == 0x50
    assert not a.pending()                       # 0x40 and 0x31 wait below PPR
    r.w(1, EOI, 0)
    r.w(1, TPR, 0x3F)                            # class 3 blocked by TPR
    assert a.acknowledge() == 0x40
    r.w(1, EOI, 0)
    assert not a.pending()
    r.w(1, TPR, 0)
    assert r.take(1) == [0x31]
    assert r.r(1, ISR0 + 0x30) == 0


def test_software_disabled_apic_holds_interrupts() -> None:
    r = Rig()
    r.ipi(0, 0x41, dest=1)
    assert not r.apics[1].pending()
    r.enable(1)
    assert r.take(1) == [0x41]


def test_logical_flat_cluster_broadcast_self_lowest() -> None:
    r = Rig(n=4)
    for i in range(4):
        r.enable(i)
        r.w(i, LDR, (1 << i) << 24)
    r.ipi(0, 0x800 | 0x60, dest=0b1010)          # logical flat: CPUs 1 and 3
    assert [bool(a.irr) for a in r.apics] == [False, True, False, True]
    for i in range(4):
        r.take(i)
        r.w(i, DFR, 0x0FFFFFFF)                  # cluster model
        r.w(i, LDR, ((i >> 1) << 4 | 1 << (i & 1)) << 24)
    r.ipi(0, 0x800 | 0x61, dest=0x12)            # cluster 1, member 1: CPU 3
    assert [bool(a.irr) for a in r.apics] == [False, False, False, True]
    r.take(3)
    r.ipi(2, 0x62 | 2 << 18)                     # all including self
    assert all(a.irr for a in r.apics)
    for i in range(4):
        r.take(i)
    r.ipi(2, 0x63 | 3 << 18)                     # all excluding self
    assert [bool(a.irr) for a in r.apics] == [True, True, False, True]
    for i in range(4):
        r.take(i)
    r.ipi(1, 0x64 | 1 << 18)                     # self
    assert [bool(a.irr) for a in r.apics] == [False, True, False, False]
    r.take(1)
    r.w(0, TPR, 0x20)
    r.w(1, TPR, 0x10)
    r.w(2, TPR, 0x30)
    r.w(3, TPR, 0x10)
    r.ipi(0, 0x100 | 0x70 | 2 << 18)             # lowest priority to all: CPU 1 (ties: ID)
    assert [bool(a.irr) for a in r.apics] == [False, True, False, False]


def test_illegal_vectors_set_esr_and_raise_the_error_lvt() -> None:
    r = Rig()
    r.enable(0)
    r.enable(1)
    r.w(0, LVT_ERR, 0xFE)
    r.ipi(0, 0x05, dest=1)                       # fixed vector 5: send illegal
    assert not r.apics[1].irr
    assert r.r(0, ESR) == 0                      # latched only by an ESR write
    r.w(0, ESR, 0)
    assert r.r(0, ESR) == 0x20
    assert r.take(0) == [0xFE]                   # the error interrupt
    r.w(0, ESR, 0)
    assert r.r(0, ESR) == 0
    r.apics[1].write(0x3F0, 4, 1)                # no register there
    r.w(1, ESR, 0)
    assert r.r(1, ESR) == 0x80
    r.w(1, LVT_T, 0x03)                          # timer with vector 3: receive illegal
    r.w(1, TICR, 10)
    r.advance(100)
    r.w(1, ESR, 0)
    assert r.r(1, ESR) == 0x40 and not r.apics[1].irr


def test_init_sipi_and_nmi() -> None:
    r = Rig(n=3)
    r.ipi(0, 0x4500 | 3 << 18)                   # INIT assert to all others
    r.ipi(0, 0x8500 | 2 << 18)                   # INIT level de-assert: nothing
    r.ipi(0, 0x4500 | 1 << 18)                   # INIT to self: not allowed, dropped
    r.ipi(0, 0x4600 | 0x9A | 3 << 18)            # SIPI, vector 0x9a
    r.ipi(0, 0x4600 | 0x10, dest=7)              # SIPI to a CPU that does not exist
    assert r.inits == [1, 2]
    assert r.sipis == [(1, 0x9A), (2, 0x9A)]
    r.ipi(0, 0x400, dest=2)                      # NMI, even to a disabled APIC
    assert r.apics[2].pending() and r.apics[2].acknowledge() == 2


def test_timer_one_shot_periodic_and_divide() -> None:
    r = Rig(n=1)
    r.enable(0)
    r.w(0, TDCR, 0xB)                            # divide by 1
    r.w(0, LVT_T, 0x40)
    r.w(0, TICR, 1000)
    r.advance(400)
    assert r.r(0, TCCR) == 600
    r.advance(600)
    assert r.take(0) == [0x40] and r.r(0, TCCR) == 0
    r.advance(10_000)
    assert r.take(0) == []                       # one-shot: once
    r.w(0, TDCR, 0x3)                            # divide by 16
    r.w(0, LVT_T, 0x20041)                       # periodic
    r.w(0, TICR, 100)                            # 1600 ns
    for _ in range(5):
        r.advance(1600)
        assert r.take(0) == [0x41]
    r.advance(1_600_000)                         # a thousand periods missed: one interrupt
    assert r.take(0) == [0x41]
    r.advance(1600)
    assert r.take(0) == [0x41]
    r.w(0, TICR, 0)                              # stops the timer
    r.advance(100_000)
    assert r.take(0) == []
    assert len(r.timers) == 0


def test_timer_tsc_deadline() -> None:
    r = Rig(n=1)
    r.enable(0)
    a = r.apics[0]
    r.w(0, LVT_T, 0x40042)                       # TSC-deadline, vector 0x42
    r.w(0, TICR, 5)                              # ignored in this mode
    assert r.r(0, TICR) == 0
    a.msr_write(MSR_TSC_DEADLINE, r.clock.now_ns() + 5000)
    r.advance(4999)
    assert r.take(0) == []
    r.advance(1)
    assert r.take(0) == [0x42] and a.msr_read(MSR_TSC_DEADLINE) == 0
    a.msr_write(MSR_TSC_DEADLINE, 1)             # in the past: fires at once
    r.advance(0)
    assert r.take(0) == [0x42]
    a.msr_write(MSR_TSC_DEADLINE, r.clock.now_ns() + 100)
    a.msr_write(MSR_TSC_DEADLINE, 0)             # disarmed
    r.advance(1000)
    assert r.take(0) == []
    a.msr_write(MSR_TSC_DEADLINE, r.clock.now_ns() + 100)
    r.w(0, LVT_T, 0x40)                          # leaving the mode disarms it
    r.advance(1000)
    assert r.take(0) == []


def test_x2apic_msrs() -> None:
    r = Rig(n=2)
    a, b = r.apics
    with pytest.raises(ApicFault):
        a.msr_read(0x802)                        # x2APIC off: #GP
    with pytest.raises(ApicFault):
        a.msr_write(MSR_APIC_BASE, 0xFEE00000 | BASE_EXTD)    # EXTD without EN
    for x in (a, b):
        x.msr_write(MSR_APIC_BASE, 0xFEE00000 | BASE_ENABLE | BASE_EXTD)
        x.msr_write(0x80F, 0x1FF)
    assert a.x2apic and a.msr_read(0x802) == 0 and b.msr_read(0x802) == 1
    assert b.msr_read(0x80D) == 1 << 1           # derived logical ID
    assert a.read(ID, 4) == 0xFFFFFFFF           # xAPIC page gone in x2APIC mode
    a.msr_write(0x830, (1 << 32) | 0x51)         # physical, dest 1
    assert b.acknowledge() == 0x51
    b.msr_write(0x80B, 0)
    a.msr_write(0x830, (0x2 << 32) | 0x800 | 0x52)    # logical cluster 0, bit 1: CPU 1
    assert b.acknowledge() == 0x52
    b.msr_write(0x83F, 0x53)                     # self IPI
    assert b.irr >> 0x53 & 1
    for msr, val in ((0x802, 5), (0x80B, 1), (0x83F, 0x100), (0x808, 1 << 32),
                     (0x8FF, 0), (0x828, 1)):
        with pytest.raises(ApicFault):
            a.msr_write(msr, val)
    with pytest.raises(ApicFault):
        a.msr_read(0x80B)
    with pytest.raises(ApicFault):
        a.msr_write(MSR_APIC_BASE, 0xFEE00000 | BASE_ENABLE)   # x2APIC -> xAPIC
    a.msr_write(MSR_APIC_BASE, 0xFEE00000)       # disable, then xAPIC again
    a.msr_write(MSR_APIC_BASE, 0xFEE00000 | BASE_ENABLE)
    assert not a.x2apic and a.read(VER, 4) == 0x00050014


def test_level_interrupt_eoi_reaches_the_ioapic() -> None:
    r = Rig(n=1)
    r.enable(0)
    io = IoApic(r.bus)
    line = io.irq_line(5)
    io.write(0, 4, 0x1A)
    io.write(0x10, 4, 0)                         # dest 0
    io.write(0, 4, 0x1A - 0x1A + 0x1A)
    io.write(0, 4, 0x10 + 2 * 5)
    io.write(0x10, 4, 0x8000 | 0x65)             # level, vector 0x65
    line.set_level(True)
    a = r.apics[0]
    assert a.acknowledge() == 0x65
    assert a.tmr >> 0x65 & 1
    assert io.entries[5] & 1 << 14               # remote IRR
    a.write(EOI, 4, 0)
    assert io.entries[5] & 1 << 14 and a.irr >> 0x65 & 1   # still asserted: re-sent
    line.set_level(False)
    assert a.acknowledge() == 0x65
    a.write(EOI, 4, 0)
    assert not io.entries[5] & 1 << 14 and not a.irr


OFFSETS = st.sampled_from([ID, VER, TPR, 0x90, PPR, EOI, 0xC0, LDR, DFR, SVR, ISR0, TMR0,
                           IRR0, ESR, ICR_LO, ICR_HI, LVT_T, 0x330, 0x340, LINT0, 0x360,
                           LVT_ERR, TICR, TCCR, TDCR, 0x2F0, 0x3F0])
OPS = st.lists(st.one_of(
    st.tuples(st.just("w"), st.integers(0, 1), OFFSETS, st.integers(0, 2**32 - 1),
              st.sampled_from([1, 2, 4, 8])),
    st.tuples(st.just("r"), st.integers(0, 1), st.integers(0, 0xFFF), st.just(0),
              st.sampled_from([1, 2, 4])),
    st.tuples(st.just("msr"), st.integers(0, 1), st.integers(0x800, 0x8FF),
              st.integers(0, 2**64 - 1), st.just(0)),
    st.tuples(st.just("base"), st.integers(0, 1), st.just(0),
              st.integers(0, 2**64 - 1), st.just(0)),
    st.tuples(st.just("t"), st.just(0), st.just(0), st.integers(0, 10**7), st.just(0)),
    st.tuples(st.just("ack"), st.integers(0, 1), st.just(0), st.just(0), st.just(0)),
), max_size=60)


@given(OPS)
def test_hostile_register_traffic_is_bounded(ops: list[tuple[str, int, int, int, int]]
                                             ) -> None:
    """Any sequence of accesses: no exception but ApicFault (#GP), bounded state and
    timer queue, acknowledged vectors legal."""
    r = Rig(n=2)
    for kind, cpu, off, val, size in ops:
        a = r.apics[cpu]
        if kind == "w":
            a.write(off, size, val & ((1 << (8 * size)) - 1))
        elif kind == "r":
            assert 0 <= a.read(off, size) < 1 << (8 * size)
        elif kind == "msr":
            try:
                a.msr_write(off, val)
                a.msr_read(off)
            except ApicFault:
                pass
        elif kind == "base":
            with contextlib.suppress(ApicFault):
                a.msr_write(MSR_APIC_BASE, val)
        elif kind == "t":
            r.advance(val)
        else:
            v = a.acknowledge()
            assert v is None or v == 2 or 16 <= v <= 255
    for a in r.apics:
        assert 0 <= a.irr < 1 << 256 and 0 <= a.isr < 1 << 256
        assert not a.irr & 0xFFFF                # vectors below 16 never latched
    assert len(r.timers) <= 2
