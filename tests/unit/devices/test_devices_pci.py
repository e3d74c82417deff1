"""PCI: configuration mechanism #1 at every width, BAR sizing and placement, decoding,
capabilities, INTx routing; a hostile guest's config accesses never raise and never make
a BAR decode over RAM or over another device."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from virtio_driver import TestMachine

from pyhv.arch.x86 import layout
from pyhv.devices.pci import config as C
from pyhv.devices.pci.function import PciFunction
from pyhv.devices.pci.host import PCI_IRQS


class Regs:
    """A BAR's bus device that remembers accesses."""

    def __init__(self) -> None:
        self.log: list[tuple[int, int, int | None]] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append((offset, size, None))
        return 0x5A

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append((offset, size, value))


def make_fn(bar_size: int = 0x1000, io_size: int = 0) -> tuple[PciFunction, Regs]:
    fn = PciFunction(vendor=0x1234, device=0x5678, class_code=0xFF0000, interrupt_pin=1)
    regs = Regs()
    fn.add_bar(0, bar_size, regs)
    if io_size:
        fn.add_bar(1, io_size, Regs(), io=True)
    fn.config.add_capability(C.CAP_ID_VENDOR, b"\x04\x01\x02")
    fn.config.add_capability(C.CAP_ID_VENDOR, b"\x04\x03\x04")
    return fn, regs


@pytest.fixture
def m() -> Iterator[TestMachine]:
    machine = TestMachine()
    yield machine
    machine.close()


def test_host_bridge_ids_at_every_width(m: TestMachine) -> None:
    assert m.cfg_read(0, 0x00) == 0x1237_8086
    assert m.cfg_read(0, 0x00, 2) == 0x8086
    assert m.cfg_read(0, 0x02, 2) == 0x1237
    assert [m.cfg_read(0, 0x08 + i, 1) for i in range(4)] == [0x02, 0x00, 0x00, 0x06]
    assert m.cfg_read(0, 0x0A, 2) == 0x0600          # class: host bridge


def test_config_address_is_dword_only_and_absent_functions_read_ones(m: TestMachine) -> None:
    m.pio.write(0xCF8, 4, 0x8000_0003 | (5 << 11))
    assert m.pio.read(0xCF8, 4) == 0x8000_0000 | (5 << 11)   # low bits are not stored
    assert m.pio.read(0xCF8, 2) == 0xFFFF and m.pio.read(0xCFB, 1) == 0xFF
    m.pio.write(0xCFB, 1, 0x01)                  # Linux's type 2 probe: not an address
    assert m.pio.read(0xCF8, 4) == 0x8000_0000 | (5 << 11)
    assert m.cfg_read(5, 0) == 0xFFFF_FFFF                      # empty slot
    m.pio.write(0xCF8, 4, 0x8001_0000)                          # bus 1
    assert m.pio.read(0xCFC, 4) == 0xFFFF_FFFF
    m.pio.write(0xCF8, 4, 0x0000_0000)                          # enable bit clear
    assert m.pio.read(0xCFC, 4) == 0xFFFF_FFFF
    m.pio.write(0xCF8, 4, 0x8000_0100)                          # function 1
    assert m.pio.read(0xCFC, 2) == 0xFFFF
    m.pio.write(0xCF8, 4, 0x8000_0000)
    assert m.pio.read(0xCFE, 4) == 0xFFFF_1237                  # sticks out past 0xcff


def test_bar_sizing_placement_and_decoding(m: TestMachine) -> None:
    fn, regs = make_fn(0x4000, io_size=0x20)
    slot = m.host.add(fn)
    bar0 = m.cfg_read(slot, 0x10)
    assert bar0 & 0xF == 0 and bar0 >= layout.PCI_MMIO_START and bar0 % 0x4000 == 0
    bar1 = m.cfg_read(slot, 0x14)
    assert bar1 & 3 == 1 and bar1 & ~3 >= layout.PCI_IO_START
    assert m.cfg_read(slot, 0x04, 2) & (C.CMD_IO | C.CMD_MEMORY) == C.CMD_IO | C.CMD_MEMORY
    # Linux's sizing: decoding off, all ones, read back, restore
    m.cfg_write(slot, 0x04, 2, 0)
    assert m.mmio.find(bar0) is None
    m.cfg_write(slot, 0x10, 4, 0xFFFF_FFFF)
    assert m.cfg_read(slot, 0x10) == 0xFFFF_C000
    m.cfg_write(slot, 0x14, 4, 0xFFFF_FFFF)
    assert m.cfg_read(slot, 0x14) == 0xFFFF_FFE1
    m.cfg_write(slot, 0x10, 4, bar0)
    m.cfg_write(slot, 0x14, 4, bar1)
    m.cfg_write(slot, 0x04, 2, C.CMD_MEMORY | C.CMD_IO)
    m.mmio.write(bar0 + 0x10, 4, 7)
    assert regs.log == [(0x10, 4, 7)]
    # the guest moves it (byte by byte, as odd widths allow)
    for i, b in enumerate((0x00, 0x80, 0x00, 0xD0)):
        m.cfg_write(slot, 0x10 + i, 1, b)
    assert m.mmio.find(bar0) is None and m.mmio.find(0xD000_8000) is not None
    assert m.mmio.read(0xD000_8000, 1) == 0x5A


def test_bar_on_ram_or_on_another_bar_decodes_nothing(m: TestMachine) -> None:
    a, _ = make_fn(0x1000)
    b, regs_b = make_fn(0x1000)
    sa, sb = m.host.add(a), m.host.add(b)
    bar_a, bar_b = m.cfg_read(sa, 0x10), m.cfg_read(sb, 0x10)
    m.cfg_write(sb, 0x10, 4, 0x0010_0000)                # onto RAM
    assert b.bars[0].mapped_at is None and b.refused_maps == 1
    assert m.memory.contains(0x0010_0000)
    m.cfg_write(sb, 0x10, 4, bar_a)                      # onto the other device
    assert b.bars[0].mapped_at is None
    assert m.mmio.find(bar_a)[1] is a.bars[0].handler    # type: ignore[index]
    m.cfg_write(sb, 0x10, 4, bar_b)                      # back: decodes again
    assert b.bars[0].mapped_at == bar_b
    m.mmio.read(bar_b, 4)
    assert regs_b.log == [(0, 4, None)]


def test_capability_list_and_interrupt_routing(m: TestMachine) -> None:
    fn, _ = make_fn()
    slot = m.host.add(fn)
    assert m.cfg_read(slot, 0x06, 2) & C.STATUS_CAP_LIST
    at = m.cfg_read(slot, 0x34, 1)
    seen = []
    while at:
        seen.append((at, m.cfg_read(slot, at, 1)))
        at = m.cfg_read(slot, at + 1, 1)
    assert [cap for _, cap in seen] == [C.CAP_ID_VENDOR, C.CAP_ID_VENDOR]
    assert seen[0][0] == 0x40 and all(a % 4 == 0 for a, _ in seen)
    assert m.cfg_read(slot, 0x3D, 1) == 1                       # INTA
    irq = m.cfg_read(slot, 0x3C, 1)
    assert irq == PCI_IRQS[slot % 4] and irq in m.level         # level-triggered in ELCR
    fn.set_intx(True)
    assert m.irqs[irq].level and m.cfg_read(slot, 0x06, 2) & C.STATUS_INTERRUPT
    m.cfg_write(slot, 0x04, 2, m.cfg_read(slot, 0x04, 2) | C.CMD_INTX_DISABLE)
    assert not m.irqs[irq].level and m.cfg_read(slot, 0x06, 2) & C.STATUS_INTERRUPT
    m.cfg_write(slot, 0x04, 2, m.cfg_read(slot, 0x04, 2) & ~C.CMD_INTX_DISABLE)
    assert m.irqs[irq].level
    fn.set_intx(False)
    assert not m.irqs[irq].level


def test_functions_sharing_an_irq_or_their_requests(m: TestMachine) -> None:
    fns = [make_fn()[0] for _ in range(5)]
    slots = [m.host.add(f) for f in fns]
    same = [f for f, s in zip(fns, slots, strict=True) if PCI_IRQS[s % 4] == PCI_IRQS[slots[0] % 4]]
    assert len(same) >= 2
    irq = m.irqs[PCI_IRQS[slots[0] % 4]]
    same[0].set_intx(True)
    same[1].set_intx(True)
    same[0].set_intx(False)
    assert irq.level
    same[1].set_intx(False)
    assert not irq.level


accesses = st.lists(st.tuples(st.integers(0xCF8, 0xCFF), st.sampled_from([1, 2, 4]),
                              st.integers(0, 0xFFFF_FFFF), st.booleans()), max_size=60)


@given(accesses, st.integers(0, 0xFF))
def test_hostile_config_accesses_never_raise_or_map_over_ram(
        ops: list[tuple[int, int, int, bool]], reg: int) -> None:
    m = TestMachine()
    try:
        fns = [make_fn(0x1000, io_size=0x10)[0] for _ in range(2)]
        for f in fns:
            m.host.add(f)
        for port, size, value, is_write in ops:
            if port == 0xCF8 and size == 4 and is_write:
                value = (value & 0x8000_00FF) | (value >> 8 & 1) << 11 | (reg & 0xFC)
            if is_write:
                m.pio.write(port, size, value)
            else:
                assert 0 <= m.pio.read(port, size) < 1 << (8 * size)
        ranges = m.mmio.devices()
        for base, length, _ in ranges:
            assert not any(r.gpa < base + length and base < r.end for r in m.memory.regions)
        for (b1, l1, _), (b2, _, _) in zip(ranges, ranges[1:], strict=False):
            assert b1 + l1 <= b2
    finally:
        m.close()
