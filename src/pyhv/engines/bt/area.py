"""The binary translator's own memory: translation cache, vCPU state page, lookup tables.

Design: translated code runs natively at CPL 3, so the translation cache (TC) and the
memory it works on must be reachable at CPL 3, unlike the trap monitor's slot (PML4 slot
511, supervisor-only). The translator's area is a KVM memory slot of its own mapped in
the *lower* half (chosen when the whole upper half was believed closed to CPL 3 on
KVM-PVM; only slot 256 is, docs/pvm.md, so it could move up and give slot 255 back), in
PML4 slot 255 (guest-virtual 0x7f80_0000_0000), a slot the guest's own address space may
not use (its tables are refused there, as slot 511 is for the trap monitor):

    offset      what                      real mapping (CPL 3)
    0x00_0000   page tables of slot 255   not mapped
    0x04_0000   S: the vCPU state page    RW, XD       (spilled registers, virtual IF...)
    0x08_0000   KEYS: 64 Ki guest RIPs    read-only, XD (the indirect-branch lookup)
    0x10_0000   VALS: 64 Ki TC addresses  read-only, XD
    0x18_0000   TC header: COMMON, MISS   read-only, executable
    0x18_1000   TC blocks, `tc_size` bytes read-only, executable
    end         CALLOUT: one page with no RAM behind it: a store there is an MMIO exit

Guest pages are never executable to the real CPU (every shadow leaf carries XD); only
the TC is. The TC is read-only to CPL 3 (pyhv writes it from the host side), so a guest
store to it faults and is reflected as a not-present #PF. What CPL 3 can write here is
S, whose contents the guest could set anyway with legal instructions (its own registers,
its virtual IF); pyhv validates everything it takes from S. Reads of the area by the
guest are not prevented: on x86-64 there are no segment limits to hide it (VMware's
32-bit BT used them; its 64-bit BT needed AMD's long-mode segment limits), and this
CPU has no protection keys.

S page layout (byte offsets), shared by the translator's code and pyhv:

    0x000  16 GPRs in encoding order (RAX..R15; RSP at 0x20), spilled by COMMON
    0x080  RFLAGS (COMMON's pushfq; popfq'd on the way back)
    0x088  RESUME: where COMMON jumps after a call-out (pyhv writes it)
    0x090  SITE: the call-out site id (dword), written before COMMON or a lookup
    0x098  JUMP: the TC address a lookup hit jumps through
    0x0a0  TARGET: the guest address an indirect branch went to
    0x0a8  VIF: the virtual IF as the RFLAGS bit (0 or 0x200)
    0x0b0  VIOPL: the virtual IOPL as RFLAGS bits (0..0x3000)
    0x0b8  VCS, 0x0c0 VSS, 0x0c8 VTR, 0x0d0 VLDTR (selectors), 0x0d8 VCR0
    0x0e0  VGDTR (limit, base: 10 bytes), 0x0f0 VIDTR
    0x100  saved RCX, 0x108 saved R10, 0x110 saved R11 (lookups), 0x118 SCRATCH
    0x120  IRET: the 5-qword frame inline IRETQ copied (RIP, CS, RFLAGS, RSP, SS)
    0x148  GATE: the IDT gate inline INT n read (low qword)
"""

from __future__ import annotations

import struct

from pyhv.engines.trap.monitor import MON_GPA
from pyhv.memory import MemoryRegion

BT_GPA = MON_GPA + 0x1000_0000
BT_GVA = 0x7F80_0000_0000
BT_SLOT = 255                              # PML4 slot of BT_GVA
PT_OFF = 0x0
S_OFF = 0x4_0000
KEYS_OFF = 0x8_0000
VALS_OFF = 0x10_0000
LOOKUP_ENTRIES = 1 << 16                   # indexed by the low 16 bits of the guest RIP
HEADER_OFF = 0x18_0000
TC_OFF = 0x18_1000
MIN_TC = 64 << 10
MAX_TC = 64 << 20
DEFAULT_TC = 4 << 20
SENTINEL = 0x8000_0000_0000_0001           # non-canonical: no guest RIP equals it

S = BT_GVA + S_OFF
S_GPRS, S_RSP, S_RFLAGS, S_RESUME, S_SITE = 0x0, 0x20, 0x80, 0x88, 0x90
S_JUMP, S_TARGET, S_VIF, S_VIOPL = 0x98, 0xA0, 0xA8, 0xB0
S_VCS, S_VSS, S_VTR, S_VLDTR, S_VCR0 = 0xB8, 0xC0, 0xC8, 0xD0, 0xD8
S_VGDTR, S_VIDTR = 0xE0, 0xF0
S_SAVE_RCX, S_SAVE_R10, S_SAVE_R11, S_SCRATCH = 0x100, 0x108, 0x110, 0x118
S_IRET, S_GATE = 0x120, 0x148

_P, _RW, _US = 0x1, 0x2, 0x4
_XD = 1 << 63


def s_addr(off: int) -> int:
    """Guest-virtual address of S page offset `off` (for RIP-relative operands)."""
    return S + off


class BtArea:
    """The translator's region (its own KVM slot at BT_GPA) and its page tables."""

    def __init__(self, tc_size: int = DEFAULT_TC) -> None:
        if not MIN_TC <= tc_size <= MAX_TC or tc_size % 0x1000:
            raise ValueError(f"translation cache of {tc_size} bytes (4 KiB multiples, "
                             f"{MIN_TC >> 10} KiB to {MAX_TC >> 20} MiB)")
        self.tc_size = tc_size
        self.size = (TC_OFF + tc_size + 0x1F_FFFF) & ~0x1F_FFFF
        self.callout_gpa = BT_GPA + self.size          # no memory slot: MMIO
        self.callout_gva = BT_GVA + self.size
        self.tc_start = BT_GVA + TC_OFF
        self.tc_end = self.tc_start + tc_size
        self.header = BT_GVA + HEADER_OFF
        self.region = MemoryRegion(BT_GPA, self.size)
        self.view = self.region.view
        self._page_tables()
        self.reset_lookup(0)

    # ------------------------------------------------------------------ mapping

    def _page_tables(self) -> None:
        """PDPT -> PD -> 4 KiB PTs for the mapped part of the area and CALLOUT."""
        pdpt, pd = PT_OFF, PT_OFF + 0x1000
        n_pts = (self.size + 0x1000 + 0x1F_FFFF) >> 21
        if 2 + n_pts > S_OFF >> 12:
            raise ValueError("translation cache too large for the area's page tables")
        self._put(pdpt, (BT_GPA + pd) | _P | _RW | _US)
        for t in range(n_pts):
            pt = PT_OFF + 0x2000 + 0x1000 * t
            self._put(pd + 8 * t, (BT_GPA + pt) | _P | _RW | _US)
        for off in range(S_OFF, self.size + 0x1000, 0x1000):
            if off < KEYS_OFF:
                flags = (_P | _RW | _US | _XD) if off == S_OFF else 0
            elif off < HEADER_OFF:
                flags = _P | _US | _XD
            elif off < self.size:
                flags = _P | _US
            else:
                flags = _P | _RW | _US | _XD                  # CALLOUT (no RAM)
            if flags:
                pt = PT_OFF + 0x2000 + 0x1000 * (off >> 21)
                self._put(pt + 8 * ((off >> 12) & 511), (BT_GPA + off) | flags)

    def pml4e(self) -> int:
        """The entry for PML4 slot 255 in every real PML4."""
        return (BT_GPA + PT_OFF) | _P | _RW | _US

    def _put(self, off: int, value: int) -> None:
        struct.pack_into("<Q", self.view, off, value)

    # ------------------------------------------------------------------ lookup

    def reset_lookup(self, miss: int) -> None:
        """Every KEYS entry to SENTINEL, every VALS entry to `miss`."""
        self.view[KEYS_OFF:KEYS_OFF + 8 * LOOKUP_ENTRIES] = (
            struct.pack("<Q", SENTINEL) * LOOKUP_ENTRIES)
        self.view[VALS_OFF:VALS_OFF + 8 * LOOKUP_ENTRIES] = (
            struct.pack("<Q", miss) * LOOKUP_ENTRIES)

    def set_lookup(self, guest: int, tc: int) -> None:
        i = guest & (LOOKUP_ENTRIES - 1)
        struct.pack_into("<Q", self.view, KEYS_OFF + 8 * i, guest)
        struct.pack_into("<Q", self.view, VALS_OFF + 8 * i, tc)

    def drop_lookup(self, guest: int, miss: int) -> None:
        i = guest & (LOOKUP_ENTRIES - 1)
        if struct.unpack_from("<Q", self.view, KEYS_OFF + 8 * i)[0] == guest:
            struct.pack_into("<Q", self.view, KEYS_OFF + 8 * i, SENTINEL)
            struct.pack_into("<Q", self.view, VALS_OFF + 8 * i, miss)

    # ------------------------------------------------------------------ code and S

    def write_code(self, gva: int, code: bytes) -> None:
        off = gva - BT_GVA
        if not HEADER_OFF <= off <= off + len(code) <= TC_OFF + self.tc_size:
            raise ValueError(f"code at {gva:#x} outside the translation cache")
        self.view[off:off + len(code)] = code

    def read_code(self, gva: int, size: int) -> bytes:
        off = gva - BT_GVA
        return bytes(self.view[off:off + size])

    def s_get(self, off: int) -> int:
        return int(struct.unpack_from("<Q", self.view, S_OFF + off)[0])

    def s_put(self, off: int, value: int) -> None:
        struct.pack_into("<Q", self.view, S_OFF + off, value & 0xFFFF_FFFF_FFFF_FFFF)

    def in_area(self, gva: int) -> bool:
        return BT_GVA <= gva < BT_GVA + self.size + 0x1000

    def close(self) -> None:
        self.region.close()
