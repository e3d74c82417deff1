"""The port-I/O / MMIO bus (pyhv.devices.bus): routing, overlaps, unclaimed addresses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyhv.devices.bus import MISS_ADDRS_MAX, Bus, UnhandledIo
from pyhv.errors import PyhvError


class Recorder:
    """A fake device: remembers every access, reads back a fixed pattern."""

    def __init__(self, value: int = 0x1122334455667788) -> None:
        self.value = value
        self.log: list[tuple[str, int, int, int | None]] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size, None))
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))


def test_routes_by_range_with_device_relative_offsets() -> None:
    bus = Bus("pio")
    com1, dbg = Recorder(), Recorder()
    bus.register(0x3F8, 8, com1, "com1")
    bus.register(0xF4, 1, dbg)
    bus.write(0x3F8, 1, 0x41)
    bus.write(0x3FF, 1, 0x42)
    bus.read(0x3FD, 1)
    bus.write(0xF4, 1, 3)
    assert com1.log == [("w", 0, 1, 0x41), ("w", 7, 1, 0x42), ("r", 5, 1, None)]
    assert dbg.log == [("w", 0, 1, 3)]
    assert bus.accesses == {"com1": 3, "Recorder": 1}     # unnamed: the class name
    assert bus.devices() == [(0xF4, 1, "Recorder"), (0x3F8, 8, "com1")]
    assert bus.unhandled_reads == bus.unhandled_writes == 0


@pytest.mark.parametrize("addr,owner", [
    (0x3F7, None), (0x3F8, "a"), (0x3FF, "a"), (0x400, "b"), (0x40F, "b"), (0x410, None)])
def test_boundaries(addr: int, owner: str | None) -> None:
    bus = Bus("pio")
    bus.register(0x3F8, 8, Recorder(), "a")
    bus.register(0x400, 0x10, Recorder(), "b")   # adjacent to nothing, after a gap
    hit = bus.find(addr)
    assert (hit[2] if hit else None) == owner


def test_adjacent_ranges_are_allowed() -> None:
    bus = Bus("mmio")
    bus.register(0x1000, 0x100, Recorder(), "lo")
    bus.register(0x1100, 0x100, Recorder(), "hi")
    bus.register(0xF00, 0x100, Recorder(), "below")
    assert [n for _, _, n in bus.devices()] == ["below", "lo", "hi"]
    assert bus.find(0x10FF)[2] == "lo"   # type: ignore[index]
    assert bus.find(0x1100)[2] == "hi"   # type: ignore[index]


@pytest.mark.parametrize("base,length", [
    (0x3F8, 8),      # identical
    (0x3F8, 1),      # same start, shorter
    (0x3F0, 9),      # ends inside
    (0x3FF, 4),      # starts inside the last byte
    (0x3F0, 0x20),   # covers it
    (0x3FA, 2),      # inside
])
def test_overlaps_are_refused(base: int, length: int) -> None:
    bus = Bus("pio")
    bus.register(0x3F8, 8, Recorder(), "com1")
    with pytest.raises(ValueError, match="overlaps com1"):
        bus.register(base, length, Recorder(), "x")
    assert bus.devices() == [(0x3F8, 8, "com1")]


@pytest.mark.parametrize("length", [0, -1])
def test_empty_ranges_are_refused(length: int) -> None:
    with pytest.raises(ValueError):
        Bus("pio").register(0x80, length, Recorder())


@pytest.mark.parametrize("size,ones", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFFFFFF),
                                       (8, 0xFFFFFFFFFFFFFFFF)])
def test_unclaimed_reads_are_all_ones_and_counted(size: int, ones: int) -> None:
    bus = Bus("pio")
    bus.register(0x60, 1, Recorder())
    assert bus.read(0x61, size) == ones
    bus.write(0x80, size, 0x12)
    bus.write(0x80, size, 0x13)
    assert (bus.unhandled_reads, bus.unhandled_writes) == (1, 2)
    assert bus.unhandled_addrs == {0x61: 1, 0x80: 2}
    assert bus.accesses == {}


def test_miss_counter_by_address_is_bounded() -> None:
    # regression: a guest sweeping the MMIO hole (rep stosd over 1 MiB) added one Counter
    # key per address, growing pyhv's memory without bound
    bus = Bus("mmio")
    for addr in range(0x1000000, 0x1000000 + 4 * (MISS_ADDRS_MAX + 1000), 4):
        bus.write(addr, 4, 0)
    bus.read(0x1000000, 4)
    assert len(bus.unhandled_addrs) == MISS_ADDRS_MAX
    assert bus.unhandled_addrs[0x1000000] == 2
    assert bus.unhandled_other == 1000
    assert (bus.unhandled_reads, bus.unhandled_writes) == (1, MISS_ADDRS_MAX + 1000)


def test_strict_mode_raises_naming_the_address() -> None:
    bus = Bus("pio", strict=True)
    bus.register(0x3F8, 8, Recorder())
    with pytest.raises(UnhandledIo, match="0x80") as ei:
        bus.write(0x80, 1, 0x55)
    assert isinstance(ei.value, PyhvError) and ei.value.exit_status == 4
    assert "0x55" in str(ei.value)
    with pytest.raises(UnhandledIo, match="read of 2 bytes at 0x1234"):
        bus.read(0x1234, 2)
    assert (bus.unhandled_reads, bus.unhandled_writes) == (1, 1)
    bus.write(0x3F8, 1, 0)              # claimed ports still work


@pytest.mark.parametrize("size,mask", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFFFFFF)])
def test_values_are_masked_to_the_access_size(size: int, mask: int) -> None:
    bus = Bus("pio")
    dev = Recorder(value=-1 & 0xFFFFFFFFFFFFFFFF)
    bus.register(0xCF8, 8, dev)
    assert bus.read(0xCF8, size) == mask
    bus.write(0xCFC, size, 0xA5A5A5A5A5A5A5A5)
    assert dev.log[-1] == ("w", 4, size, 0xA5A5A5A5A5A5A5A5 & mask)


def test_byte_buffer_forms_are_little_endian() -> None:
    bus = Bus("mmio")
    dev = Recorder(value=0x04030201)
    bus.register(0xD000_0000, 0x1000, dev)
    buf = bytearray(4)
    bus.read_into(0xD000_0010, memoryview(buf))
    assert bytes(buf) == b"\x01\x02\x03\x04"
    bus.write_bytes(0xD000_0020, b"\x78\x56")
    assert dev.log[-1] == ("w", 0x20, 2, 0x5678)
    two = bytearray(2)
    bus.read_into(0x1234, memoryview(two))   # unclaimed
    assert bytes(two) == b"\xff\xff"


@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(1, 64)), max_size=30),
       st.integers(0, 0x10040))
def test_property_find_agrees_with_a_linear_scan(
        claims: list[tuple[int, int]], probe: int) -> None:
    bus = Bus("pio")
    accepted: list[tuple[int, int, str]] = []
    for i, (base, length) in enumerate(claims):
        clash = any(base < b + n and b < base + length for b, n, _ in accepted)
        if clash:
            with pytest.raises(ValueError):
                bus.register(base, length, Recorder(), f"d{i}")
        else:
            bus.register(base, length, Recorder(), f"d{i}")
            accepted.append((base, length, f"d{i}"))
    assert bus.devices() == sorted(accepted)
    want = [(b, name) for b, n, name in accepted if b <= probe < b + n]
    hit = bus.find(probe)
    assert ([(hit[0], hit[2])] if hit else []) == want


def test_unregister_and_is_free() -> None:
    """PCI BARs move: a range can be withdrawn (only by its owner) and checked first."""
    bus = Bus("mmio")
    a, b = Recorder(), Recorder()
    bus.register(0x1000, 0x100, a, "a")
    assert not bus.is_free(0x10FF, 1) and not bus.is_free(0x0F00, 0x101)
    assert bus.is_free(0x1100, 0x100) and bus.is_free(0x0F00, 0x100)
    with pytest.raises(KeyError):
        bus.unregister(0x1000, b)
    with pytest.raises(KeyError):
        bus.unregister(0x1010, a)
    bus.unregister(0x1000, a)
    assert bus.find(0x1000) is None and bus.is_free(0x1000, 0x100)
    bus.register(0x1080, 0x100, b, "b")
    assert bus.read(0x1080, 1) == b.value & 0xFF
