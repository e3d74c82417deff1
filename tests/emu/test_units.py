"""Unit tests of the emu engine's parts: page walks, the CPU model, descriptor caches,
the unicorn layout self-check, and the engine's answer when unicorn is missing."""

from __future__ import annotations

import struct

import pytest

from pyhv.arch.x86 import cpuid
from pyhv.arch.x86.cpustate import CR0_PE, CR0_PG, CR0_WP, CR4_PAE, CR4_PSE, EFER_LMA, Segment
from pyhv.engines import emu as emu_pkg
from pyhv.engines.emu import EmuEngine, layout
from pyhv.engines.emu.cpu import descriptor_cache, seg_flags, seg_from
from pyhv.engines.emu.mmu import Mmu, PageFault
from pyhv.errors import HostError
from pyhv.memory import GuestMemory

MIB = 1 << 20


def mem() -> GuestMemory:
    return GuestMemory.with_layout([(0, 8 * MIB)])


def q(m: GuestMemory, addr: int, v: int) -> None:
    m.write(addr, struct.pack("<Q", v))


def test_four_level_walk_4k_2m_1g_and_ad_bits() -> None:
    m = mem()
    q(m, 0x1000, 0x2000 | 3)            # PML4[0] -> PDPT
    q(m, 0x2000, 0x3000 | 3)            # PDPT[0] -> PD
    q(m, 0x2008, 0x4000_0000 | 0x83)    # PDPT[1]: 1 GiB page at 1 GiB
    q(m, 0x3000, 0x4000 | 3)            # PD[0] -> PT
    q(m, 0x3008, 0x60_0000 | 0x81)      # PD[1]: 2 MiB page, read-only
    q(m, 0x4000 + 8 * 5, 0x7000 | 3)    # PT[5]: 4 KiB page
    mmu = Mmu(m, CR0_PE | CR0_PG | CR0_WP, 0x1000, CR4_PAE, EFER_LMA)
    assert mmu.translate(0x5123) == 0x7123
    assert mmu.translate(0x20_0000 + 0x1234) == 0x60_1234
    assert mmu.translate(0x4000_0000 + 0x12_3456) == 0x4012_3456
    mmu.translate(0x5000, write=True)
    assert m.read_u64(0x4000 + 8 * 5) & 0x60 == 0x60             # accessed + dirty
    with pytest.raises(PageFault) as e:
        mmu.translate(0x6000)
    assert e.value.error_code == 0 and e.value.addr == 0x6000
    with pytest.raises(PageFault) as e:
        mmu.translate(0x20_0000, write=True)                     # read-only, WP=1
    assert e.value.error_code == 3


def test_pae_and_32bit_walks() -> None:
    m = mem()
    q(m, 0x1000 + 8 * 1, 0x2000 | 1)       # PDPTE[1] (1-2 GiB)
    q(m, 0x2000, 0x40_0000 | 0x83)         # PD[0]: 2 MiB page
    mmu = Mmu(m, CR0_PE | CR0_PG, 0x1000, CR4_PAE, 0)
    assert mmu.translate(0x4000_0000 + 0x345) == 0x40_0345
    m.write(0x5000, struct.pack("<I", 0x80_0000 | 0x83))  # 32-bit PDE[0]: 4 MiB page
    mmu32 = Mmu(m, CR0_PE | CR0_PG, 0x5000, CR4_PSE, 0)
    assert mmu32.translate(0x12_3456) == 0x92_3456
    assert Mmu(m, CR0_PE, 0, 0, 0).translate(0x1234) == 0x1234


def test_cpu_model() -> None:
    model = cpuid.DEFAULT_MODEL
    a, b, c, d = model.leaf(0)
    assert struct.pack("<III", b, d, c) == b"GenuineIntel" and a == cpuid.CpuModel.MAX_BASIC
    _a, ebx, ecx, edx = model.leaf(1, apic_id=3)
    assert edx & cpuid.SSE2 and edx & cpuid.FXSR and not edx & cpuid.APIC
    assert ecx & cpuid.HYPERVISOR and not ecx & (cpuid.XSAVE | cpuid.AVX)
    assert ebx >> 24 == 3
    brand = b"".join(struct.pack("<4I", *model.leaf(leaf)) for leaf in
                     (0x80000002, 0x80000003, 0x80000004))
    assert brand.rstrip(b"\0") == b"pyhv virtual CPU"
    assert cpuid.CpuModel(family=6, model=0x3C).signature() == 0x306C3
    host = {1: (0, 0, cpuid.SSE3, cpuid.BASE_EDX & ~cpuid.PAT)}
    assert not cpuid.DEFAULT_MODEL.intersect(host).features_edx & cpuid.PAT
    assert len(model.table()) > 10


def test_segment_cache_conversions() -> None:
    seg = Segment.flat(0x2B, code=True, bits=64, dpl=3)
    assert seg_from(0x2B, seg.base, seg.limit, seg_flags(seg)) == seg
    base, limit, flags = descriptor_cache(0x00AFFB000000FFFF)  # type 0xB (accessed)
    assert (base, limit) == (0, 0xFFFFFFFF) and flags == seg_flags(seg)
    null = Segment(present=0, unusable=1, limit=0, type=0, s=0)
    assert seg_from(0, 0, 0, seg_flags(null)) == null


def test_layout_self_check_passes_and_detects_a_wrong_offset(monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    layout.self_check()
    monkeypatch.setattr(layout, "_checked", None)
    monkeypatch.setattr(layout, "OLD_EXCEPTION", layout.OLD_EXCEPTION + 4)
    with pytest.raises(HostError, match="unicorn==2.1.4"):
        layout.self_check()


def test_probe_names_the_package_when_unicorn_is_missing(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.setattr(emu_pkg, "IMPORT_ERROR", "ModuleNotFoundError: No module named 'x'")
    why = EmuEngine.probe()
    assert why is not None and "unicorn" in why
    with pytest.raises(HostError, match="unicorn"):
        EmuEngine(mem())
