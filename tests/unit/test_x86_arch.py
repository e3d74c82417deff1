"""x86 architecture helpers (pyhv.arch.x86): CpuState, descriptors, boot page tables,
and the boot states the loaders hand to engines."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyhv.arch.x86 import boot, gdt, layout, paging
from pyhv.arch.x86.cpustate import (
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    CR4_PSE,
    EFER_LMA,
    EFER_LME,
    RFLAGS_VM,
    CpuState,
    DescriptorTable,
    Segment,
)
from pyhv.memory import GuestMemory

GIB = 1 << 30


# ---------------------------------------------------------------------- descriptors


def test_known_descriptor_encodings() -> None:
    # The classic flat descriptors every boot loader writes.
    assert gdt.encode(Segment.flat(0x08, code=True, bits=32)) == 0x00CF9B000000FFFF
    assert gdt.encode(Segment.flat(0x10, code=True, bits=64)) == 0x00AF9B000000FFFF
    assert gdt.encode(Segment.flat(0x18, code=False, bits=32)) == 0x00CF93000000FFFF
    assert gdt.encode(Segment.flat(0x33, code=True, bits=64, dpl=3)) == 0x00AFFB000000FFFF
    tss = Segment.system(0x20, 0x2000, 0x67, 0xB)
    assert gdt.encode(tss) == 0x00008B0020000067


segments = st.builds(
    Segment,
    selector=st.integers(0, 0xFFFF), base=st.integers(0, 0xFFFFFFFF),
    limit=st.integers(0, 0xFFFFF), type=st.integers(0, 15), s=st.just(1),
    dpl=st.integers(0, 3), present=st.integers(0, 1), avl=st.integers(0, 1),
    l=st.integers(0, 1), db=st.integers(0, 1), g=st.just(0))


@given(segments)
def test_property_byte_granular_round_trip(seg: Segment) -> None:
    assert gdt.decode(seg.selector, gdt.encode(seg)) == seg


@given(segments, st.integers(0, 0xFFFFF))
def test_property_page_granular_round_trip(seg: Segment, pages: int) -> None:
    seg.g, seg.limit = 1, (pages << 12) | 0xFFF
    assert gdt.decode(seg.selector, gdt.encode(seg)) == seg


def test_large_limit_needs_page_granularity() -> None:
    with pytest.raises(ValueError, match="needs G=1"):
        gdt.encode(Segment(limit=0x100000, g=0))


def test_system_descriptor_takes_two_slots_with_the_high_base() -> None:
    tss = Segment.system(0x10, 0x1234_5678_9ABC_D000, 0x67, 0xB)
    image = gdt.table([None, Segment.flat(0x08, code=True, bits=64), tss, None,
                       Segment.flat(0x20, code=False, bits=32)])
    assert len(image) == 5 * 8
    low, high = struct.unpack_from("<QQ", image, 16)
    assert gdt.decode(0x10, low, high) == tss
    assert struct.unpack_from("<Q", image, 0)[0] == 0
    assert gdt.decode(0x20, struct.unpack_from("<Q", image, 32)[0]).db == 1


# ---------------------------------------------------------------------- paging


def _walk(image: bytes, base: int, va: int) -> int | None:
    """Translate va through tables whose image sits at base (2 MiB pages only)."""
    def entry(table: int, idx: int) -> int:
        return int(struct.unpack_from("<Q", image, table - base + 8 * idx)[0])
    pml4e = entry(base, (va >> 39) & 511)
    if not pml4e & 1:
        return None
    pdpte = entry(pml4e & ~0xFFF, (va >> 30) & 511)
    if not pdpte & 1:
        return None
    pde = entry(pdpte & ~0xFFF, (va >> 21) & 511)
    if not pde & 1:
        return None
    assert pde & paging.PS
    return (pde & ~0x1FFFFF & ((1 << 52) - 1)) | (va & 0x1FFFFF)


@pytest.mark.parametrize("span,gibs", [(1, 1), (GIB, 1), (GIB + 1, 2), (4 * GIB, 4)])
def test_identity_tables_map_exactly_the_span(span: int, gibs: int) -> None:
    cr3, image = paging.identity_tables(span)
    assert cr3 == layout.PAGE_TABLES
    assert len(image) == 0x2000 + 0x1000 * gibs
    for va in (0, 0x1FFFFF, 0x200000, 0x7C00, gibs * GIB - 1):
        assert _walk(image, cr3, va) == va
    assert _walk(image, cr3, gibs * GIB) is None
    assert _walk(image, cr3, 1 << 39) is None            # PML4 slot 1 is empty


def test_identity_tables_flags() -> None:
    _, image = paging.identity_tables(GIB)
    pml4e, = struct.unpack_from("<Q", image, 0)
    pde, = struct.unpack_from("<Q", image, 0x2000 + 8 * 5)
    assert pml4e & 0xFFF == paging.P | paging.RW
    assert pde == 5 * (2 << 20) | paging.P | paging.RW | paging.PS
    _, user = paging.identity_tables(GIB, user=True)
    for off in (0, 0x1000, 0x2000, 0x2FF8):
        assert struct.unpack_from("<Q", user, off)[0] & paging.US


def test_identity_tables_refuse_more_than_4_gib_or_overflowing_their_area() -> None:
    with pytest.raises(ValueError, match="at most 4 GiB"):
        paging.identity_tables(4 * GIB + 1)
    with pytest.raises(ValueError, match="overflow"):
        paging.identity_tables(4 * GIB, base=layout.PAGE_TABLES_END - 0x3000)


def test_boot_structures_fit_the_address_map() -> None:
    _, image = paging.identity_tables(4 * GIB)
    assert layout.PAGE_TABLES + len(image) <= layout.PAGE_TABLES_END
    fixed = [(layout.BOOT_GDT, layout.BOOT_IDT), (layout.BOOT_IDT, layout.BOOT_TSS),
             (layout.BOOT_TSS, layout.BOOTINFO), (layout.BOOTINFO, layout.ZERO_PAGE),
             (layout.ZERO_PAGE, layout.FLAT_LOAD_ADDR),
             (layout.PAGE_TABLES, layout.PAGE_TABLES_END),
             (layout.CMDLINE, layout.CMDLINE + layout.CMDLINE_MAX),
             (layout.BOOTINFO_EXTRA, layout.BOOTINFO_EXTRA_END)]
    for (a, b), (c, _) in zip(fixed, fixed[1:], strict=False):
        assert a < b <= c
    assert layout.BOOTINFO_EXTRA_END <= layout.BOOT_STACK_TOP <= layout.EBDA_START


# ---------------------------------------------------------------------- boot states


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.with_layout([(0, 2 * (1 << 20))])
    yield m
    m.close()


def test_real_mode_state() -> None:
    s = boot.real_mode(0x1234, 0x10)
    assert s.mode == "real" and s.cpl == 0
    assert (s.cs.selector, s.cs.base, s.cs.limit, s.cs.type) == (0x1234, 0x12340, 0xFFFF, 0xB)
    assert s.ds.base == 0 and s.idt == DescriptorTable(0, 0x3FF)


def test_protected_mode_state_and_boot_gdt(mem: GuestMemory) -> None:
    s = boot.protected_mode(mem, 0x100000)
    assert s.mode == "protected" and s.cpl == 0
    assert s.gdt == DescriptorTable(layout.BOOT_GDT, 6 * 8 - 1)
    raw = [struct.unpack_from("<Q", mem.read(layout.BOOT_GDT, 48), 8 * i)[0] for i in range(6)]
    assert raw[0] == 0
    # What the CPU would load from the GDT is what the state says is cached.
    assert gdt.decode(boot.SEL_CODE32, raw[1]) == s.cs
    assert gdt.decode(boot.SEL_DATA, raw[3]) == s.ds == s.ss
    assert gdt.decode(boot.SEL_TSS, raw[4], raw[5]) == s.tr
    assert gdt.decode(boot.SEL_CODE64, raw[2]).l == 1
    assert mem.read(layout.BOOT_TSS, boot.TSS_LIMIT + 1) == bytes(boot.TSS_LIMIT + 1)


def test_long_mode_state_writes_identity_tables(mem: GuestMemory) -> None:
    s = boot.long_mode(mem, 0x200000)
    assert s.mode == "long" and s.cr0 & CR0_PG and s.efer & EFER_LMA
    assert s.cs == gdt.decode(boot.SEL_CODE64, mem.read_u64(layout.BOOT_GDT + 0x10))
    _, image = paging.identity_tables(4 * GIB)
    assert mem.read(layout.PAGE_TABLES, len(image)) == image
    assert s.cr3 == layout.PAGE_TABLES


# ---------------------------------------------------------------------- CpuState


def test_cpu_state_modes_and_cpl() -> None:
    s = CpuState()
    assert s.mode == "real" and s.cpl == 0 and s.rip == 0xFFF0 and s.cs.base == 0xFFFF0000
    s.cr0 |= CR0_PE
    s.cs.dpl = 3
    assert s.mode == "protected" and s.cpl == 3
    s.efer |= EFER_LMA
    assert s.mode == "compat"
    s.cs.l = 1
    assert s.mode == "long"
    s.efer = 0
    s.cs.dpl = 0
    s.rflags |= RFLAGS_VM
    assert s.cpl == 3                                  # virtual-8086 runs at CPL 3


def test_cpu_state_dict_round_trip(mem: GuestMemory) -> None:
    s = boot.long_mode(mem, 0x200000)
    s.r15, s.msrs, s.fxsave = 1 << 63, {0xC0000082: 0xFFFFFFFF81000000}, bytes(range(256)) * 2
    s.pending_interrupt, s.halted = 0x20, True
    d = s.to_dict()
    assert d["msrs"] == {str(0xC0000082): 0xFFFFFFFF81000000}
    assert isinstance(d["fxsave"], str)
    assert CpuState.from_dict(d) == s
    assert CpuState.from_dict(json.loads(json.dumps(d))) == s
    assert CpuState.from_dict({}) == CpuState()


# ---------------------------------------------------------------------- linear reads


def _paged_state(mode: str, cr3: int) -> CpuState:
    st = CpuState()
    st.cr0 = CR0_PE | CR0_PG
    st.cr3 = cr3
    if mode == "long":
        st.cr4, st.efer = CR4_PAE, EFER_LMA | EFER_LME
        st.cs = Segment.flat(0x08, code=True, bits=64)
    else:
        st.cr4 = {"pae": CR4_PAE, "32": CR4_PSE}[mode]
        st.cs = Segment.flat(0x08, code=True, bits=32)
    return st


@pytest.fixture
def mem4m() -> Iterator[GuestMemory]:
    m = GuestMemory.with_layout([(0, 8 << 20)])
    yield m
    m.close()


# (mode, virtual address of the code, how the tables map it)
LINEAR_CASES = [
    ("long", 0xFFFF_8000_0040_1ABC, "4k"),
    ("long", 0xFFFF_8000_0040_1FF8, "4k"),        # crosses into an unmapped page
    ("long", 0x0000_0040_007F_FFF8, "2m"),        # crosses into an unmapped 2 MiB
    ("long", 0x0000_0040_0060_0FF8, "2m"),
    ("pae", 0xC040_1ABC, "4k"),
    ("pae", 0x803F_FFF8, "2m"),
    ("32", 0xC040_1FF8, "4k"),
    ("32", 0x8000_0FF8, "4m"),
]


@pytest.mark.parametrize("mode,va,kind", LINEAR_CASES)
def test_code_bytes_follow_the_guests_page_tables(mem4m: GuestMemory, mode: str, va: int,
                                                  kind: str) -> None:
    """Crash-report bytes come from where the guest's tables map RIP (never from the
    physical address equal to RIP), stop at an unmapped page, and the walk leaves the
    tables untouched (no Accessed bits)."""
    from pyhv.arch.x86.linear import code_bytes
    mem = mem4m
    code_pa = 0x40_0000 + (va & (0xFFF if kind == "4k" else 0x1F_FFFF if kind == "2m"
                                 else 0x3F_FFFF))
    code = bytes(range(0x40, 0x4F))
    mem.write(code_pa, code)
    p, rw, ps = 1, 2, 0x80
    t = [0x10_0000 + i * 0x1000 for i in range(4)]     # table pages
    page = code_pa & ~0xFFF

    def put(addr: int, entry: int, width: int) -> None:
        mem.write(addr, entry.to_bytes(width, "little"))

    if mode == "long":
        put(t[0] + 8 * ((va >> 39) & 511), t[1] | p | rw, 8)
        put(t[1] + 8 * ((va >> 30) & 511), t[2] | p | rw, 8)
        if kind == "2m":
            put(t[2] + 8 * ((va >> 21) & 511), 0x40_0000 | p | rw | ps, 8)
        else:
            put(t[2] + 8 * ((va >> 21) & 511), t[3] | p | rw, 8)
            put(t[3] + 8 * ((va >> 12) & 511), page | p | rw, 8)
        cr3 = t[0]
    elif mode == "pae":
        put(t[0] + 8 * (va >> 30), t[1] | p, 8)
        if kind == "2m":
            put(t[1] + 8 * ((va >> 21) & 511), 0x40_0000 | p | rw | ps, 8)
        else:
            put(t[1] + 8 * ((va >> 21) & 511), t[2] | p | rw, 8)
            put(t[2] + 8 * ((va >> 12) & 511), page | p | rw, 8)
        cr3 = t[0]
    else:
        if kind == "4m":
            put(t[0] + 4 * (va >> 22), 0x40_0000 | p | rw | ps, 4)
        else:
            put(t[0] + 4 * (va >> 22), t[1] | p | rw, 4)
            put(t[1] + 4 * ((va >> 12) & 1023), page | p | rw, 4)
        cr3 = t[0]
    tables = mem.read(0x10_0000, 0x4000)
    st = _paged_state(mode, cr3)
    st.rip = 0x1234                          # where the vCPU is now: irrelevant
    got = code_bytes(mem, st, va)
    size = {"4k": 1 << 12, "2m": 1 << 21, "4m": 1 << 22}[kind]
    if va % size + len(code) > size:
        assert got == code[:size - va % size]  # the next page is not mapped
    else:
        assert got == code
    assert mem.read(0x10_0000, 0x4000) == tables


def test_code_bytes_in_real_mode_use_the_segment_base(mem4m: GuestMemory) -> None:
    from pyhv.arch.x86.linear import code_bytes
    mem4m.write(0x12345, b"\x0f\x0b")
    st = CpuState()
    st.cs = Segment.real_mode(0x1234, code=True)
    assert code_bytes(mem4m, st, 0x5)[:2] == b"\x0f\x0b"
    assert code_bytes(mem4m, st, (8 << 20) - 0x12340 - 4) == bytes(4)   # RAM ends
