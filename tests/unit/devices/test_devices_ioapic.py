"""I/O APIC: registers, edge and level delivery with remote IRR, the EOI register,
entries pointing nowhere, the ISA override, and hostile register traffic (hypothesis)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pyhv.clock import TimerQueue, VirtualClock
from pyhv.devices.apicbus import ApicBus
from pyhv.devices.ioapic import IoApic, isa_gsi
from pyhv.devices.lapic import LocalApic

E_REMOTE_IRR = 1 << 14


class Rig:
    def __init__(self, n: int = 2) -> None:
        self.clock = VirtualClock()
        self.timers = TimerQueue(self.clock)
        self.bus = ApicBus()
        self.apics = [LocalApic(i, self.bus, self.clock, self.timers, bsp=(i == 0))
                      for i in range(n)]
        for a in self.apics:
            a.write(0xF0, 4, 0x1FF)
        self.io = IoApic(self.bus, apic_id=n)

    def reg(self, index: int, value: int | None = None) -> int:
        self.io.write(0, 1, index)
        if value is None:
            return self.io.read(0x10, 4)
        self.io.write(0x10, 4, value)
        return 0

    def route(self, gsi: int, lo: int, dest: int = 0) -> None:
        self.reg(0x11 + 2 * gsi, dest << 24)
        self.reg(0x10 + 2 * gsi, lo)


def test_identity_and_reset_state() -> None:
    r = Rig()
    assert r.reg(0) == 2 << 24
    assert r.reg(1) == 0x170020                  # 24 entries, version 0x20
    for gsi in range(24):
        assert r.reg(0x10 + 2 * gsi) == 1 << 16  # masked
    r.reg(1, 0)                                  # read-only
    assert r.reg(1) == 0x170020
    assert r.reg(0x80) == 0xFFFFFFFF             # no register there
    assert isa_gsi(0) == 2 and isa_gsi(4) == 4


def test_edge_delivery_and_masked_edges_are_lost() -> None:
    r = Rig()
    line = r.io.irq_line(2)
    r.route(2, 0x30, dest=1)
    line.set_level(True)
    line.set_level(True)                         # no new edge
    line.set_level(False)
    assert r.apics[1].acknowledge() == 0x30 and not r.apics[1].pending()
    r.route(2, 0x30 | 1 << 16, dest=1)           # masked
    line.set_level(True)
    line.set_level(False)
    r.route(2, 0x30, dest=1)
    assert not r.apics[1].pending()
    r.reg(0x10 + 4, 0x30 | 1 << 12 | 1 << 14)    # read-only bits ignored
    assert r.reg(0x10 + 4) == 0x30


def test_level_remote_irr_eoi_register_and_unmask() -> None:
    r = Rig()
    line = r.io.irq_line(10)
    r.route(10, 0x8000 | 1 << 16 | 0x44)         # level, masked
    line.set_level(True)
    assert not r.apics[0].pending()
    r.route(10, 0x8000 | 0x44)                   # unmasking an asserted level input
    assert r.apics[0].acknowledge() == 0x44
    assert r.reg(0x10 + 20) & E_REMOTE_IRR
    r.io.write(0x40, 4, 0x44)                    # the EOI register (directed EOI)
    assert r.apics[0].irr >> 0x44 & 1            # still asserted: sent again
    line.set_level(False)
    r.io.write(0x40, 4, 0x44)
    assert not r.reg(0x10 + 20) & E_REMOTE_IRR


def test_logical_and_lowest_priority_routes() -> None:
    r = Rig(n=3)
    for i, a in enumerate(r.apics):
        a.write(0xD0, 4, (1 << i) << 24)
    r.apics[0].write(0x80, 4, 0x40)
    r.route(4, 0x800 | 0x100 | 0x51, dest=0b011)   # logical, lowest priority: CPU 1
    pin = r.io.irq_line(4)
    pin.set_level(True)
    assert [bool(a.irr) for a in r.apics] == [False, True, False]


def test_entries_pointing_nowhere_do_not_wedge() -> None:
    r = Rig()
    line = r.io.irq_line(7)
    r.route(7, 0x8000 | 0x47, dest=9)            # level, to an APIC that is not there
    line.set_level(True)
    assert not any(a.irr for a in r.apics)
    assert not r.reg(0x10 + 14) & E_REMOTE_IRR
    line.set_level(False)
    r.route(7, 0x8000 | 0x05, dest=0)            # illegal vector: dropped, ESR set
    line.set_level(True)
    assert not r.apics[0].irr
    r.apics[0].write(0x280, 4, 0)
    assert r.apics[0].read(0x280, 4) == 0x40


def test_level_storm_costs_one_message_per_eoi() -> None:
    r = Rig()
    line = r.io.irq_line(11)
    r.route(11, 0x8000 | 0x60)
    for _ in range(1000):
        line.set_level(True)
    assert r.io.sent == 1
    for _ in range(10):
        assert r.apics[0].acknowledge() == 0x60
        r.apics[0].write(0xB0, 4, 0)
    assert r.io.sent == 11


OPS = st.lists(st.one_of(
    st.tuples(st.just("sel"), st.integers(0, 255), st.just(0)),
    st.tuples(st.just("win"), st.integers(0, 2**32 - 1), st.just(0)),
    st.tuples(st.just("eoi"), st.integers(0, 255), st.just(0)),
    st.tuples(st.just("irq"), st.integers(-2, 30), st.booleans().map(int)),
    st.tuples(st.just("ack"), st.integers(0, 1), st.just(0)),
    st.tuples(st.just("read"), st.sampled_from([0, 1, 2, 4, 0x10, 0x11, 0x20, 0x40]),
              st.sampled_from([1, 2, 4])),
), max_size=80)


@given(OPS)
def test_hostile_register_traffic_is_bounded(ops: list[tuple[str, int, int]]) -> None:
    r = Rig()
    messages = 0
    for kind, a, b in ops:
        if kind == "sel":
            r.io.write(0, 1, a)
        elif kind == "win":
            r.io.write(0x10, 4, a)
        elif kind == "eoi":
            r.io.write(0x40, 4, a)
            messages += 1
        elif kind == "irq":
            r.io.set_irq(a, bool(b))
            messages += 1
        elif kind == "ack":
            apic = r.apics[a]
            v = apic.acknowledge()
            if v is not None:
                apic.write(0xB0, 4, 0)
                messages += 24
        else:
            assert 0 <= r.io.read(a, b) < 1 << (8 * b)
    assert len(r.io.entries) == 24
    assert all(0 <= e < 1 << 64 for e in r.io.entries)
    # one message per input change, plus at most one per pin for each EOI
    assert r.io.sent <= messages * 24 + 24
