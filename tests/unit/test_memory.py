"""Guest memory (pyhv.memory): regions, bounds-checked access, typed access, dirty pages.

No /dev/kvm needed. The property tests check that every in-bounds access round-trips and
that every access touching a byte outside RAM raises GuestMemoryError without reading or
writing anything.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyhv.arch.x86 import layout
from pyhv.errors import GuestMemoryError, PyhvError
from pyhv.memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory, MemoryRegion

KIB, MIB = 1 << 10, 1 << 20


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    """Two regions with a hole between them: [0, 64K) and [128K, 192K)."""
    m = GuestMemory.with_layout([(0, 64 * KIB), (128 * KIB, 64 * KIB)])
    yield m
    m.close()


# ---------------------------------------------------------------------- MemoryRegion


def test_region_is_zeroed_writable_and_has_a_host_address() -> None:
    r = MemoryRegion(0x10000, 2 * PAGE_SIZE)
    try:
        assert (r.gpa, r.size, r.end) == (0x10000, 0x2000, 0x12000)
        assert bytes(r.view) == bytes(0x2000)
        r.view[5:8] = b"abc"
        # The host address is the mapping itself: ctypes sees the same bytes.
        assert ctypes.string_at(r.host_addr + 5, 3) == b"abc"
        assert r.host_addr % mmap.PAGESIZE == 0
        assert "0x10000" in repr(r)
    finally:
        r.close()


@pytest.mark.parametrize("gpa,size", [(0, 0), (0, -4096), (0, 100), (0, 4097), (0x800, 4096)])
def test_region_refuses_unaligned_or_empty(gpa: int, size: int) -> None:
    with pytest.raises(ValueError):
        MemoryRegion(gpa, size)


def test_overlapping_regions_are_refused() -> None:
    a, b = MemoryRegion(0, 0x2000), MemoryRegion(0x1000, 0x2000)
    try:
        with pytest.raises(ValueError, match="overlapping"):
            GuestMemory([a, b])
    finally:
        a.close()
        b.close()


def test_regions_are_sorted_and_adjacent_regions_are_allowed() -> None:
    m = GuestMemory.with_layout([(0x3000, 0x1000), (0, 0x3000)])
    try:
        assert [r.gpa for r in m.regions] == [0, 0x3000]
        assert m.size == 0x4000
        assert list(m.pages()) == [0, 1, 2, 3]
        # adjacent is not contiguous: one access must lie in one region
        assert m.contains(0x2000, 0x1000) and m.contains(0x3000, 0x1000)
        assert not m.contains(0x2FFF, 2)
    finally:
        m.close()


# ---------------------------------------------------------------------- byte access


def test_read_write_round_trip_and_zero_copy_view(mem: GuestMemory) -> None:
    mem.write(0x100, b"hello")
    assert mem.read(0x100, 5) == b"hello"
    v = mem.view(0x100, 5)
    v[0:1] = b"J"
    assert mem.read(0x100, 5) == b"Jello"
    mem.write(128 * KIB, bytearray(b"\x01\x02"))
    mem.write(128 * KIB + 2, memoryview(b"\x03"))
    assert mem.read(128 * KIB, 3) == b"\x01\x02\x03"


def test_fill_and_cstring(mem: GuestMemory) -> None:
    mem.fill(0x200, 16, 0xAA)
    assert mem.read(0x200, 16) == b"\xaa" * 16
    mem.write(0x300, b"console=ttyS0\0junk")
    assert mem.read_cstring(0x300) == b"console=ttyS0"
    assert mem.read_cstring(0x300, max_len=7) == b"console"
    # A string running to the end of a region stops there, never past it.
    end = 64 * KIB
    mem.write(end - 4, b"abcd")
    assert mem.read_cstring(end - 4) == b"abcd"
    with pytest.raises(GuestMemoryError):
        mem.read_cstring(end)


@pytest.mark.parametrize("gpa,size", [
    (64 * KIB - 1, 2),           # straddles the end of region 0
    (64 * KIB, 1),               # in the hole
    (128 * KIB - 1, 2),          # straddles the start of region 1
    (192 * KIB - 4, 8),          # runs off the end of RAM
    (192 * KIB, 1),              # just past RAM
    (1 << 40, 1),                # far away
    (-1, 1),                     # negative address
    (0, -1),                     # negative size
    (0, 64 * KIB + 1),           # bigger than the region
])
def test_accesses_outside_ram_raise(mem: GuestMemory, gpa: int, size: int) -> None:
    with pytest.raises(GuestMemoryError) as ei:
        mem.read(gpa, size)
    assert isinstance(ei.value, PyhvError)
    assert ei.value.gpa == gpa and ei.value.size == size
    assert f"{gpa:#x}" in str(ei.value)
    assert not mem.contains(gpa, size)
    before = [bytes(r.view) for r in mem.regions]
    if size >= 0:
        with pytest.raises(GuestMemoryError):
            mem.write(gpa, b"\xff" * size)
    assert [bytes(r.view) for r in mem.regions] == before


def test_zero_length_access_at_region_end_is_allowed(mem: GuestMemory) -> None:
    assert mem.read(64 * KIB, 0) == b""
    mem.write(64 * KIB, b"")
    with pytest.raises(GuestMemoryError):
        mem.read(100 * KIB, 0)   # but not in the hole


def test_integer_accessors_are_little_endian_and_masked(mem: GuestMemory) -> None:
    mem.write_u64(0x400, 0x1122334455667788)
    assert mem.read(0x400, 8) == bytes.fromhex("8877665544332211")
    assert mem.read_u8(0x400) == 0x88
    assert mem.read_u16(0x400) == 0x7788
    assert mem.read_u32(0x400) == 0x55667788
    assert mem.read_u64(0x400) == 0x1122334455667788
    mem.write_u8(0x500, 0x1FF)
    mem.write_u16(0x502, 0x1FFFF)
    mem.write_u32(0x504, -1)
    mem.write_u64(0x508, 1 << 64 | 5)
    assert mem.read(0x500, 16) == bytes.fromhex("ff00ffffffffffff0500000000000000")
    for fn, n in ((mem.read_u16, 2), (mem.read_u32, 4), (mem.read_u64, 8)):
        with pytest.raises(GuestMemoryError):
            fn(64 * KIB - n + 1)


class _Pair(ctypes.Structure):
    _fields_ = [("a", ctypes.c_uint32), ("b", ctypes.c_uint64)]


def test_struct_access_copies(mem: GuestMemory) -> None:
    mem.write_struct(0x600, _Pair(a=7, b=0xDEADBEEF00))
    assert mem.read(0x600, 4) == b"\x07\0\0\0"
    p = mem.read_struct(0x600, _Pair)
    assert (p.a, p.b) == (7, 0xDEADBEEF00)
    p.a = 9                         # a copy: guest memory is unchanged
    assert mem.read_u32(0x600) == 7
    with pytest.raises(GuestMemoryError):
        mem.read_struct(64 * KIB - 8, _Pair)
    with pytest.raises(GuestMemoryError):
        mem.write_struct(64 * KIB - 8, _Pair())


# ---------------------------------------------------------------------- dirty tracking


def test_dirty_tracking_records_pages_written_through_guest_memory(mem: GuestMemory) -> None:
    mem.write(0, b"x")
    assert mem.take_dirty() == set()          # off by default
    mem.track_dirty()
    mem.write(PAGE_SIZE - 1, b"ab")           # straddles pages 0 and 1
    mem.write_u32(128 * KIB + 3 * PAGE_SIZE, 1)
    mem.write(5 * PAGE_SIZE, b"")             # empty writes dirty nothing
    mem.fill(8 * PAGE_SIZE, 2 * PAGE_SIZE)
    mem.read(10 * PAGE_SIZE, 100)             # reads never dirty
    assert mem.take_dirty() == {0, 1, (128 * KIB >> PAGE_SHIFT) + 3, 8, 9}
    assert mem.take_dirty() == set()          # taking clears
    mem.track_dirty(False)
    mem.write(0, b"y")
    assert mem.take_dirty() == set()


# ---------------------------------------------------------------------- the address map


def test_small_guest_is_one_region() -> None:
    assert layout.ram_layout(128 * MIB) == [(0, 128 * MIB)]
    assert layout.ram_layout(layout.MMIO_START) == [(0, layout.MMIO_START)]


def test_large_guest_is_split_around_the_mmio_hole() -> None:
    size = 4 * (1 << 30)
    regions = layout.ram_layout(size)
    assert regions == [(0, layout.MMIO_START),
                       (layout.HIGH_RAM_START, size - layout.MMIO_START)]
    assert sum(n for _, n in regions) == size
    # nothing of RAM lies in [MMIO_START, 4 GiB): the IOAPIC and LAPIC are there
    for gpa, n in regions:
        assert gpa + n <= layout.MMIO_START or gpa >= layout.HIGH_RAM_START
    assert layout.MMIO_START <= layout.IOAPIC_BASE < layout.LAPIC_BASE < layout.HIGH_RAM_START


def test_guest_memory_around_the_hole_refuses_hole_accesses() -> None:
    # Real 4 GiB of mappings would be wasteful: keep the hole, shrink both sides.
    low = layout.MMIO_START - 64 * KIB
    m = GuestMemory.with_layout([(low, 64 * KIB), (layout.HIGH_RAM_START, 64 * KIB)])
    try:
        m.write_u32(layout.MMIO_START - 4, 0xCAFE)
        m.write_u32(layout.HIGH_RAM_START, 0xBEEF)
        assert m.read_u32(layout.HIGH_RAM_START) == 0xBEEF
        for addr in (layout.MMIO_START, layout.IOAPIC_BASE, layout.LAPIC_BASE,
                     layout.HIGH_RAM_START - 1):
            assert not m.contains(addr)
            with pytest.raises(GuestMemoryError):
                m.read_u8(addr)
        with pytest.raises(GuestMemoryError):
            m.read_u64(layout.MMIO_START - 4)
    finally:
        m.close()


def test_e820_map_is_sorted_disjoint_and_reserves_the_bios_area() -> None:
    for size in (2 * MIB, 128 * MIB, layout.MMIO_START, 6 << 30):
        e = layout.e820_map(size)
        for (a, n, _), (b, _, _) in zip(e, e[1:], strict=False):
            assert a + n <= b
        usable = sum(n for _, n, t in e if t == 1)
        assert usable == size - layout.HIGH_MEMORY + layout.EBDA_START
        assert (layout.EBDA_START, layout.HIGH_MEMORY - layout.EBDA_START, 2) in e
        assert all(not (a < layout.HIGH_RAM_START and a + n > layout.MMIO_START)
                   for a, n, _ in e)


# ---------------------------------------------------------------------- properties

RAM = [(0, 16 * KIB), (32 * KIB, 8 * KIB)]
TOP = 48 * KIB


def _inside(gpa: int, size: int) -> bool:
    return any(g <= gpa and gpa + size <= g + n for g, n in RAM)


@pytest.fixture(scope="module")
def pmem() -> Iterator[GuestMemory]:
    m = GuestMemory.with_layout(RAM)
    yield m
    m.close()


@settings(max_examples=300)
@given(gpa=st.integers(-16, TOP + 16), data=st.binary(min_size=0, max_size=9 * KIB))
def test_property_round_trip_or_refusal(pmem: GuestMemory, gpa: int, data: bytes) -> None:
    size = len(data)
    before = [bytes(r.view) for r in pmem.regions]
    if gpa >= 0 and _inside(gpa, size):
        pmem.write(gpa, data)
        assert pmem.read(gpa, size) == data
        assert pmem.contains(gpa, size)
    else:
        with pytest.raises(GuestMemoryError):
            pmem.write(gpa, data)
        with pytest.raises(GuestMemoryError):
            pmem.read(gpa, size)
        assert not pmem.contains(gpa, size)
        assert [bytes(r.view) for r in pmem.regions] == before


@settings(max_examples=200)
@given(gpa=st.integers(0, TOP), value=st.integers(0, (1 << 64) - 1),
       width=st.sampled_from([1, 2, 4, 8]))
def test_property_integers(pmem: GuestMemory, gpa: int, value: int, width: int) -> None:
    read = {1: pmem.read_u8, 2: pmem.read_u16, 4: pmem.read_u32, 8: pmem.read_u64}[width]
    write = {1: pmem.write_u8, 2: pmem.write_u16, 4: pmem.write_u32, 8: pmem.write_u64}[width]
    if _inside(gpa, width):
        write(gpa, value)
        assert read(gpa) == value & ((1 << (8 * width)) - 1)
        assert pmem.read(gpa, width) == (value & ((1 << (8 * width)) - 1)).to_bytes(
            width, "little")
    else:
        with pytest.raises(GuestMemoryError):
            write(gpa, value)
        with pytest.raises(GuestMemoryError):
            read(gpa)
