"""The monitor's hidden area: the real GDT, IDT, TSS, stubs and page tables.

Design: the guest kernel believes it owns the CPU at CPL 0 with its own GDT/IDT/TSS and
page tables. The real CPU runs it at CPL 3 on tables the monitor owns, placed in memory
the guest cannot see: a KVM memory slot of its own, far above guest RAM, mapped by the
real (shadow) page tables at the top of the address space with U/S=0, so CPL 3 code
touching it takes a #PF, which the monitor reflects as "not present".

    guest-virtual                               guest-physical
    0x0000_0000_0000_0000 .. 4 GiB  U=1, RW  -> the same address (guest RAM, MMIO hole)
    MON_GVA      0xffff_ff80_0000_0000  U=0  -> MON_GPA (2 TiB): 2 MiB of monitor RAM
    MON_GVA + 2M 0xffff_ff80_0020_0000  U=0  -> MON_GPA + 2 MiB: no RAM (MMIO exits)

Inside the monitor's 2 MiB (offsets from MON_GVA / MON_GPA):

    0x0_0000  shadow GDT (64 KiB)   slots 0..0xffcf mirror the guest's GDT with DPL 3;
                                    the monitor's own descriptors sit at the top:
                                      0xffd0 monitor TSS (16 bytes)
                                      0xffe0 fallback CPL 3 code64    (CS 0xffe3)
                                      0xffe8 fallback CPL 3 data      (SS 0xffeb)
                                      0xfff0 monitor code64, DPL 0    (the gates' CS)
    0x1_0000  IDT: 256 interrupt gates, DPL 0, each to its stub
    0x1_1000  TSS: RSP0 = STACK_TOP, I/O map base past the limit (every port faults)
    0x1_2000  stubs, 16 bytes a vector: `movabs [SIGNAL + vector], al; iretq`
    0x1_3000  page tables: PML4, the guest's PDPT and 4 PDs, the monitor's PDPT and PD
    0x2_0000  monitor stack (RSP0 = 0x3_0000): where CPL 3 exceptions push their frame
    0x3_0000  shadow PML4 (the real CR3 once the guest uses its own page tables:
              shadow.py); slot 511 is the monitor's, as in the flat PML4
    0x3_1000  shadow page pool, up to the end of the 2 MiB: the shadow PDPTs, PDs and
              PTs built from the guest's tables (SHADOW_POOL_PAGES of them)

The stub's one store reaches an address with no RAM behind it, so KVM returns an MMIO
write to pyhv naming the vector; pyhv reads the frame the CPU pushed (at a fixed place,
since RSP0 is fixed and aligned), rewrites it with where the guest should go next, and
resumes: the stub's IRETQ (which KVM-PVM emulates in long mode) takes the guest back to
CPL 3. No other monitor code ever runs at CPL 0 (docs/host.md: CPL 0 code on this host is
emulated instruction by instruction).

For vectors that push an error code the frame starts 8 bytes lower; the monitor writes
the resume frame (RIP, CS, RFLAGS, RSP, SS) where the CPU's frame started, so the stub
needs no `add rsp, 8` and every stub is the same two instructions.
"""

from __future__ import annotations

import struct

from pyhv.arch.x86 import gdt
from pyhv.arch.x86.cpustate import Segment
from pyhv.memory import MemoryRegion

MON_GPA = 0x200_0000_0000
MON_GVA = 0xFFFF_FF80_0000_0000
MON_SIZE = 2 << 20
SIGNAL_GPA = MON_GPA + MON_SIZE          # unbacked: stores here are MMIO exits
SIGNAL_GVA = MON_GVA + MON_SIZE
HIDDEN_START = MON_GVA                   # the guest-virtual range the guest cannot touch
HIDDEN_END = MON_GVA + 2 * MON_SIZE

GDT_OFF = 0x0
GDT_LIMIT = 0xFFFF
IDT_OFF = 0x1_0000
IDT_LIMIT = 256 * 16 - 1
TSS_OFF = 0x1_1000
TSS_LIMIT = 0x67
STUBS_OFF = 0x1_2000
STUB_SIZE = 16
PT_OFF = 0x1_3000
STACK_OFF = 0x2_0000
STACK_TOP_OFF = 0x3_0000
STACK_TOP = MON_GVA + STACK_TOP_OFF
MON_PDPT_OFF = PT_OFF + 0x6000            # the monitor's own PDPT (PML4 slot 511)
SHADOW_PML4_OFF = 0x3_0000
SHADOW_POOL_OFF = 0x3_1000
SHADOW_POOL_PAGES = (MON_SIZE - SHADOW_POOL_OFF) >> 12
SHADOW_CR3 = MON_GPA + SHADOW_PML4_OFF

GUEST_SPAN = 4 << 30                     # the guest's flat identity space
MIRROR_END = 0xFFD0                      # guest GDT slots mirrored: [0, MIRROR_END)
SEL_TSS = 0xFFD0
SEL_UCODE = 0xFFE0 | 3
SEL_UDATA = 0xFFE8 | 3
SEL_KCODE = 0xFFF0

# Vectors whose frame carries an error code (SDM Vol. 3A, Table 6-1).
ERROR_CODE_VECTORS = frozenset((8, 10, 11, 12, 13, 14, 17, 21, 29, 30))

# Page-table entry bits (SDM Vol. 3A, 4.5).
_P, _RW, _US, _PS = 0x1, 0x2, 0x4, 0x80


def frame_offset(vector: int) -> int:
    """Offset in the monitor area of the frame the CPU pushed for `vector`."""
    return STACK_TOP_OFF - (48 if vector in ERROR_CODE_VECTORS else 40)


def stub_code(vector: int) -> bytes:
    """`movabs [SIGNAL_GVA + vector], al; iretq`, padded with int3."""
    code = b"\xa2" + struct.pack("<Q", SIGNAL_GVA + vector) + b"\x48\xcf"
    return code.ljust(STUB_SIZE, b"\xcc")


def _gate(target: int) -> bytes:
    """A 64-bit interrupt gate (type 0xE, P=1, DPL 0, IST 0) on the monitor's CS."""
    lo = ((target & 0xFFFF) | (SEL_KCODE << 16) | (0x8E << 40)
          | (((target >> 16) & 0xFFFF) << 48))
    return struct.pack("<QQ", lo, target >> 32)


def monitor_descriptors() -> bytes:
    """The top 0x30 bytes of the shadow GDT (from MIRROR_END)."""
    tss = Segment.system(SEL_TSS, MON_GVA + TSS_OFF, TSS_LIMIT, 0x9)
    return gdt.table([tss, None,
                      Segment.flat(SEL_UCODE, code=True, bits=64, dpl=3),
                      Segment.flat(SEL_UDATA, code=False, bits=64, dpl=3),
                      Segment.flat(SEL_KCODE, code=True, bits=64, dpl=0),
                      None])


def page_tables() -> bytes:
    """The real page tables (image for PT_OFF): guest identity + hidden monitor."""
    pml4, gpdpt, gpd = 0, 0x1000, 0x2000
    mpdpt, mpd = MON_PDPT_OFF - PT_OFF, 0x7000
    image = bytearray(0x8000)
    base = MON_GPA + PT_OFF
    struct.pack_into("<Q", image, pml4, (base + gpdpt) | _P | _RW | _US)
    struct.pack_into("<Q", image, pml4 + 511 * 8, (base + mpdpt) | _P | _RW)
    for g in range(GUEST_SPAN >> 30):
        struct.pack_into("<Q", image, gpdpt + 8 * g, (base + gpd + 0x1000 * g) | _P | _RW | _US)
        for i in range(512):
            struct.pack_into("<Q", image, gpd + 0x1000 * g + 8 * i,
                             ((g << 30) + (i << 21)) | _P | _RW | _US | _PS)
    struct.pack_into("<Q", image, mpdpt, (base + mpd) | _P | _RW)
    struct.pack_into("<Q", image, mpd, MON_GPA | _P | _RW | _PS)
    struct.pack_into("<Q", image, mpd + 8, SIGNAL_GPA | _P | _RW | _PS)
    return bytes(image)


CR3 = MON_GPA + PT_OFF


def monitor_pml4e() -> int:
    """PML4 slot 511 of every real PML4: the monitor's PDPT, supervisor-only."""
    return (MON_GPA + MON_PDPT_OFF) | _P | _RW


class MonitorArea:
    """The monitor's own RAM (one region, its own KVM slot) and what lives in it."""

    def __init__(self) -> None:
        self.region = MemoryRegion(MON_GPA, MON_SIZE)
        self.view = self.region.view
        self._write(IDT_OFF, b"".join(_gate(MON_GVA + STUBS_OFF + v * STUB_SIZE)
                                      for v in range(256)))
        tss = bytearray(TSS_LIMIT + 1)
        struct.pack_into("<Q", tss, 4, STACK_TOP)               # RSP0
        struct.pack_into("<H", tss, 0x66, TSS_LIMIT + 1)        # no I/O bitmap
        self._write(TSS_OFF, bytes(tss))
        self._write(STUBS_OFF, b"".join(stub_code(v) for v in range(256)))
        self._write(PT_OFF, page_tables())
        self._write(SHADOW_PML4_OFF + 511 * 8, monitor_pml4e().to_bytes(8, "little"))
        self._write(GDT_OFF + MIRROR_END, monitor_descriptors())

    def _write(self, off: int, data: bytes) -> None:
        self.view[off:off + len(data)] = data

    def mirror_gdt(self, entries: bytes) -> None:
        """Copy the guest's GDT image (already DPL-adjusted) into the shadow GDT."""
        n = min(len(entries), MIRROR_END)
        self.view[GDT_OFF:GDT_OFF + n] = entries[:n]
        self.view[GDT_OFF + n:GDT_OFF + MIRROR_END] = bytes(MIRROR_END - n)

    def shadow_descriptor(self, selector: int) -> int:
        """The low 8 bytes of the shadow GDT's descriptor for `selector`."""
        off = selector & 0xFFF8
        return int.from_bytes(self.view[off:off + 8], "little")

    def read_frame(self, vector: int) -> tuple[int | None, int, int, int, int, int]:
        """(error code, RIP, CS, RFLAGS, RSP, SS) of the frame the CPU pushed."""
        off = frame_offset(vector)
        if vector in ERROR_CODE_VECTORS:
            err, rip, cs, fl, rsp, ss = struct.unpack_from("<6Q", self.view, off)
            return err & 0xFFFF_FFFF, rip, cs & 0xFFFF, fl, rsp, ss & 0xFFFF
        rip, cs, fl, rsp, ss = struct.unpack_from("<5Q", self.view, off)
        return None, rip, cs & 0xFFFF, fl, rsp, ss & 0xFFFF

    def write_frame(self, vector: int, rip: int, cs: int, rflags: int, rsp: int,
                    ss: int) -> None:
        """The frame the stub's IRETQ will pop (where the CPU's frame for `vector` began)."""
        struct.pack_into("<5Q", self.view, frame_offset(vector), rip, cs, rflags, rsp, ss)

    def is_stub(self, rip: int) -> bool:
        return MON_GVA + STUBS_OFF <= rip < MON_GVA + STUBS_OFF + 256 * STUB_SIZE

    def close(self) -> None:
        self.region.close()
