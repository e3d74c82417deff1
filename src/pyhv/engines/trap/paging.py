"""The guest's own 4-level page tables, walked as the CPU would walk them at CPL 0.

Design: a pure function over `GuestMemory` (no KVM), used by the shadow MMU (shadow.py)
to fill shadow entries and by the monitor's own accesses to guest-virtual memory
(guestmem.GuestView). It follows SDM Vol. 3A 4.5 for a supervisor access in long mode
(the guest kernel believes it runs at CPL 0; there is no ring compression, so every
access is a supervisor access):

    CR3 -> PML4E -> PDPTE (PS: 1 GiB page) -> PDE (PS: 2 MiB page) -> PTE
    not present at any level               #PF, P=0
    reserved bit set in a present entry    #PF, P=1 RSVD=1
    write to a read-only page, CR0.WP=1     #PF, P=1 W=1
    fetch from an XD page, EFER.NXE=1       #PF, P=1 I=1
    (U/S is not checked: supervisor accesses may use user pages; no SMEP/SMAP;
     `Walk.user` says whether every level allows CPL 3, for a caller that needs it)

The guest's physical address space is the 4 GiB the monitor maps, and the walker
treats it as MAXPHYADDR = 32: an address bit at or above bit 32 in a present entry is
a reserved bit. That is what keeps every walk and every shadow entry inside the guest's
space: no entry can name the monitor's slot at 2 TiB. (CPUID still reports the host's
width: KVM checks the real CR3, which is in that slot, against it. So a guest that
puts an address above 4 GiB in an entry gets a RSVD #PF where hardware would map it:
a deliberate monitor policy, docs/trap.md.) An entry read from a guest-physical
address with no RAM behind it reads as all ones, as on a PC bus with nothing there,
and so faults with RSVD: the walk never reads host memory outside guest RAM.

A successful walk sets the accessed bit in every entry it used and, for a write, the
dirty bit in the leaf, as the CPU does; a walk that faults changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyhv.engines.trap.guestmem import GuestFault
from pyhv.memory import GuestMemory

PF = 14
P, RW, US, PWT, PCD, A, D, PS, G = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80, 0x100
XD = 1 << 63
PHYS_BITS = 32
ADDR = ((1 << 52) - 1) & ~0xFFF                     # bits 51:12 of an entry
RSVD_HIGH = ((1 << 52) - 1) & ~((1 << PHYS_BITS) - 1)   # bits 51:PHYS_BITS
PF_P, PF_W, PF_U, PF_RSVD, PF_I = 0x1, 0x2, 0x4, 0x8, 0x10
ALL_ONES = (1 << 64) - 1
SHIFT = {4: 39, 3: 30, 2: 21, 1: 12}                # bits of VA a level's entry covers
VA_MASK = (1 << 48) - 1


@dataclass
class Walk:
    """A successful translation of one guest-virtual page."""

    va: int                     # the address walked
    gpa: int                    # guest-physical address of va
    writable: bool              # R/W=1 at every level
    nx: bool                    # XD=1 at some level (only with EFER.NXE)
    size: int                   # leaf page size: 4 KiB, 2 MiB or 1 GiB
    dirty: bool                 # the leaf's D bit (after this walk's own update)
    entries: list[int] = field(default_factory=list)           # gpa of each entry used
    tables: list[tuple[int, int, int]] = field(default_factory=list)
    user: bool = True           # U/S=1 at every level (what CPL 3 may reach)
    # (level, table page gpa, VA prefix it serves: va >> (SHIFT[level] + 9))

    @property
    def frame(self) -> int:
        return self.gpa & ~0xFFF


def read_entry(mem: GuestMemory, gpa: int) -> int:
    """An 8-byte entry at `gpa`, or all ones where there is no RAM (never a host read)."""
    if not mem.contains(gpa, 8):
        return ALL_ONES
    return int.from_bytes(mem.read(gpa, 8), "little")


def reserved(entry: int, level: int, *, nxe: bool) -> bool:
    if entry & RSVD_HIGH:
        return True
    if not nxe and entry & XD:
        return True
    if level == 4 and entry & PS:
        return True
    if entry & PS and level == 3:
        return bool(entry & 0x3FFF_E000)              # bits 29:13 of a 1 GiB page
    if entry & PS and level == 2:
        return bool(entry & 0x1F_E000)                # bits 20:13 of a 2 MiB page
    return False


def walk(mem: GuestMemory, cr3: int, va: int, *, write: bool = False, fetch: bool = False,
         nxe: bool = False, wp: bool = True) -> Walk:
    """Translate `va` through the tables at `cr3`; raises GuestFault(#PF) as the CPU would."""
    access = (PF_W if write else 0) | (PF_I if fetch and nxe else 0)
    table = cr3 & ADDR & ((1 << PHYS_BITS) - 1)
    writable, nx, user = True, False, True
    used: list[int] = []
    tables: list[tuple[int, int, int]] = []
    vnorm = va & VA_MASK
    level = 4
    while True:
        shift = SHIFT[level]
        tables.append((level, table, vnorm >> (shift + 9)))
        addr = table + 8 * ((vnorm >> shift) & 511)
        entry = read_entry(mem, addr)
        if not entry & P:
            raise GuestFault(PF, access, cr2=va)
        if reserved(entry, level, nxe=nxe):
            raise GuestFault(PF, access | PF_P | PF_RSVD, cr2=va)
        used.append(addr)
        writable = writable and bool(entry & RW)
        user = user and bool(entry & US)
        nx = nx or (nxe and bool(entry & XD))
        if level == 1 or (entry & PS and level in (2, 3)):
            size = 1 << shift
            gpa = (entry & ADDR & ~(size - 1)) | (vnorm & (size - 1))
            break
        table = entry & ADDR
        level -= 1
    if write and wp and not writable:
        raise GuestFault(PF, access | PF_P, cr2=va)
    if fetch and nx:
        raise GuestFault(PF, access | PF_P, cr2=va)
    leaf = read_entry(mem, used[-1])
    for i, addr in enumerate(used):
        entry = leaf if i == len(used) - 1 else read_entry(mem, addr)
        new = entry | A | (D if write and i == len(used) - 1 else 0)
        if new != entry:
            mem.write(addr, new.to_bytes(8, "little"))
        if i == len(used) - 1:
            leaf = new
    return Walk(va, gpa, writable, nx, size, bool(leaf & D), used, tables, user)
