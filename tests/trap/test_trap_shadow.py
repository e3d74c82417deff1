"""Unit tests of the guest page-table walker and the shadow MMU, without /dev/kvm.

Guest tables are written into a real `GuestMemory`; the shadow lives in a real
`MonitorArea` (plain host memory: nothing here needs KVM).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, cast

import pytest

from pyhv.arch.x86.cpustate import CpuState
from pyhv.engines.trap import guestmem, monitor
from pyhv.engines.trap.context import Held
from pyhv.engines.trap.emulate import Emulator
from pyhv.engines.trap.guestmem import GuestFault, GuestView
from pyhv.engines.trap.paging import PS, RW, US, XD, A, D, P, walk
from pyhv.engines.trap.shadow import Refused, ShadowMmu
from pyhv.engines.trap.virtual import VirtualCpu
from pyhv.kvm import structs as ks
from pyhv.memory import GuestMemory

PML4, PDPT, PD, PT, PD2 = 0x10000, 0x11000, 0x12000, 0x13000, 0x14000
PAGE_A, PAGE_B = 0x20000, 0x21000
VA = 0x0000_4000_0000_0000                 # PML4 slot 128
FLAGS = P | RW


def put(mem: GuestMemory, addr: int, value: int) -> None:
    mem.write(addr, struct.pack("<Q", value))


def get(mem: GuestMemory, addr: int) -> int:
    return int(struct.unpack("<Q", mem.read(addr, 8))[0])


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    """VA -> PAGE_A (RW), VA+0x1000 -> PAGE_A (alias), VA+0x2000 -> PAGE_B (read-only);
    identity 0..2 MiB... through PD2 as one 2 MiB page (PML4 slot 0)."""
    m = GuestMemory.with_layout([(0, 4 << 20)])
    put(m, PML4 + 128 * 8, PDPT | FLAGS)
    put(m, PDPT, PD | FLAGS)
    put(m, PD, PT | FLAGS)
    put(m, PT, PAGE_A | FLAGS)
    put(m, PT + 8, PAGE_A | FLAGS)
    put(m, PT + 16, PAGE_B | P)
    put(m, PML4, 0x15000 | FLAGS)
    put(m, 0x15000, PD2 | FLAGS)
    put(m, PD2, 0 | FLAGS | PS)
    yield m
    m.close()


def vcpu(cr3: int = PML4, *, wp: bool = True, nxe: bool = False) -> VirtualCpu:
    v = VirtualCpu.from_state(CpuState())
    v.cr3, v.cr0 = cr3, 0x80000011 | (1 << 16 if wp else 0)
    v.efer = 0x500 | (1 << 11 if nxe else 0)
    return v


@pytest.fixture
def area() -> Iterator[monitor.MonitorArea]:
    a = monitor.MonitorArea()
    yield a
    a.close()


# ---------------------------------------------------------------------- walker


def test_walk_translates_4k_and_2m_pages_and_sets_accessed(mem: GuestMemory) -> None:
    w = walk(mem, PML4, VA + 0x1234)
    assert (w.gpa, w.size, w.writable, w.dirty) == (PAGE_A + 0x234, 0x1000, True, False)
    assert [lvl for lvl, _, _ in w.tables] == [4, 3, 2, 1]
    assert all(get(mem, e) & A for e in w.entries)
    w = walk(mem, PML4, 0x1F_F008, write=True)
    assert (w.gpa, w.size, w.dirty) == (0x1F_F008, 2 << 20, True)
    assert get(mem, PD2) & (A | D) == A | D


def test_walk_faults_as_the_cpu(mem: GuestMemory) -> None:
    def err(va: int, **kw: Any) -> tuple[int | None, int | None]:
        with pytest.raises(GuestFault) as e:
            walk(mem, PML4, va, **kw)
        assert e.value.vector == 14
        return e.value.error_code, e.value.cr2
    assert err(VA + 0x3000) == (0, VA + 0x3000)                     # not present
    assert err(VA + 0x3000, write=True) == (2, VA + 0x3000)
    assert err(VA + 0x2000, write=True) == (3, VA + 0x2000)         # read-only, WP=1
    assert walk(mem, PML4, VA + 0x2000, write=True, wp=False).gpa == PAGE_B   # WP=0
    put(mem, PT + 16, PAGE_B | P | XD)
    assert err(VA + 0x2000) == (9, VA + 0x2000)                     # XD without NXE: RSVD
    assert err(VA + 0x2000, fetch=True, nxe=True) == (0x11, VA + 0x2000)
    put(mem, PT + 24, (1 << 32) | FLAGS)                            # above 4 GiB: RSVD
    assert err(VA + 0x3000) == (9, VA + 0x3000)
    put(mem, PD + 8, 0xFFF0_0000 | FLAGS)                           # a table with no RAM
    assert err(VA + 0x20_0000) == (9, VA + 0x20_0000)               # reads all ones
    put(mem, PD2 + 8, 0x20_1000 | FLAGS | PS)                       # 2 MiB page, bit 12
    assert walk(mem, PML4, 0x20_0000).gpa == 0x20_0000              # (PAT) is allowed
    put(mem, PD2 + 8, 0x20_2000 | FLAGS | PS)
    assert err(0x20_0000) == (9, 0x20_0000)                         # bits 20:13 reserved
    before = get(mem, PT + 24)
    assert get(mem, PT + 24) == before                              # a fault sets no A


# ---------------------------------------------------------------------- shadow


def shadow_pte(area: monitor.MonitorArea, sh: ShadowMmu, va: int) -> int:
    off = sh.tables.get((1, (va & ((1 << 48) - 1)) >> 21))
    if off is None:
        return 0
    return int(struct.unpack_from("<Q", area.view, off + 8 * ((va >> 12) & 511))[0])


def test_fill_maps_user_with_exact_dirty_and_write_protected_tables(
        mem: GuestMemory, area: monitor.MonitorArea) -> None:
    sh = ShadowMmu(mem, area.view, vcpu())
    assert sh.fault(VA, 0) is True                     # read miss: filled, resume
    e = shadow_pte(area, sh, VA)
    assert e & ~0xFFF == PAGE_A and e & (P | US) == P | US and not e & RW   # D=0: RO
    assert sh.fault(VA, 2) is True                     # first write: D set, now RW
    assert shadow_pte(area, sh, VA) & RW and get(mem, PT) & D
    # the shadow's root keeps the monitor's slot, supervisor-only
    root = struct.unpack_from("<512Q", area.view, monitor.SHADOW_PML4_OFF)
    assert root[511] == monitor.monitor_pml4e() and not root[511] & US
    # every guest table the walk used is a table page: its own mapping is read-only
    assert set(sh.table_pages) == {PML4, PDPT, PD, PT}
    assert sh.fault(PT, 2) is False                    # a write to PT: emulate it
    assert shadow_pte(area, sh, PT) & (P | RW) == P


def test_new_table_page_is_write_protected_where_already_mapped(
        mem: GuestMemory, area: monitor.MonitorArea) -> None:
    sh = ShadowMmu(mem, area.view, vcpu())
    put(mem, 0x16000, PAGE_B | FLAGS | D)              # a would-be PT, mapped as data
    put(mem, PT + 32, 0x16000 | FLAGS | D)
    assert sh.fault(VA + 0x4000, 2) and shadow_pte(area, sh, VA + 0x4000) & RW
    sh.resync_needed = False
    put(mem, PD + 8, 0x16000 | FLAGS)                  # now it is also a page table
    assert sh.fault(VA + 0x20_0000, 0)
    assert not shadow_pte(area, sh, VA + 0x4000) & RW and sh.resync_needed


def test_guest_faults_are_the_guests(mem: GuestMemory, area: monitor.MonitorArea) -> None:
    sh = ShadowMmu(mem, area.view, vcpu())
    with pytest.raises(GuestFault) as e:
        sh.fault(VA + 0x3000, 0)
    assert (e.value.error_code, e.value.cr2) == (0, VA + 0x3000)
    with pytest.raises(GuestFault) as e:
        sh.fault(VA + 0x2000, 2)
    assert e.value.error_code == 3
    with pytest.raises(GuestFault):                    # the monitor's slot: absent
        sh.fault(monitor.MON_GVA, 0)
    put(mem, PML4 + 511 * 8, PDPT | FLAGS)             # the guest maps slot 511 itself
    with pytest.raises(Refused, match="PML4 slot 511"):
        sh.fault(monitor.MON_GVA, 0)


def test_written_drops_the_pte_or_flushes(mem: GuestMemory,
                                          area: monitor.MonitorArea) -> None:
    sh = ShadowMmu(mem, area.view, vcpu())
    sh.fault(VA, 0)
    sh.fault(VA + 0x1000, 0)
    sh.resync_needed = False
    sh.written(PT + 8, 8)                              # the alias's PTE changed
    assert shadow_pte(area, sh, VA + 0x1000) == 0 and shadow_pte(area, sh, VA) & P
    assert sh.resync_needed
    sh.written(PD, 8)                                  # a PDE: everything goes
    assert sh.tables == {} and sh.count["flushes (page-table write)"] == 1
    assert not any(struct.unpack_from("<511Q", area.view, monitor.SHADOW_PML4_OFF))


def test_invlpg_and_a_full_pool(mem: GuestMemory, area: monitor.MonitorArea) -> None:
    sh = ShadowMmu(mem, area.view, vcpu(), pages=3)
    sh.fault(VA, 0)
    assert sh.in_use() == 3
    sh.invlpg(VA)
    assert shadow_pte(area, sh, VA) == 0 and sh.in_use() == 2
    sh.fault(VA, 0)                                    # one page free: not enough
    sh.fault(0x1000, 0)                                # another PML4 slot: pool full
    assert sh.count["flushes (pool full)"] >= 1 and sh.in_use() <= 3
    assert shadow_pte(area, sh, 0x1000) & P and shadow_pte(area, sh, VA) == 0


def test_guestview_translates_and_reports_table_writes(
        mem: GuestMemory, area: monitor.MonitorArea) -> None:
    v = vcpu()
    sh = ShadowMmu(mem, area.view, v)
    view = GuestView(mem)
    view.paging = sh
    guestmem.write(view, VA + 0xFFC, b"12345678")      # crosses into the alias page
    assert mem.read(PAGE_A + 0xFFC, 4) == b"1234" and mem.read(PAGE_A, 4) == b"5678"
    assert guestmem.read(view, VA + 0x1000, 4) == b"5678"
    with pytest.raises(GuestFault) as e:               # second page read-only: nothing
        guestmem.write(view, VA + 0x1FFC, b"abcdefgh")   # written at all
    assert e.value.cr2 == VA + 0x2000 and mem.read(PAGE_A + 0xFFC, 4) == b"1234"
    sh.fault(VA, 0)
    # the emulated store of a guest PTE through the view drops the shadow PTE
    regs = ks.KvmRegs()
    regs.rbx = PT
    h = Held(cast(Any, None), parked=True, rip=0x1000, rsp=0x8000, rflags=2)
    h._regs = regs
    out = Emulator(view, v, umip=False).pt_write(h, bytes.fromhex("48c70300000000"))
    assert out.kind == "pt write" and out.error is None and h.rip == 0x1007  # mov [rbx],0
    assert get(mem, PT) == 0 and shadow_pte(area, sh, VA) == 0
    out = Emulator(view, v, umip=False).pt_write(h, bytes.fromhex("480903"))   # or
    assert out.error is not None and "cannot emulate" in out.error
