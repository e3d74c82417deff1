"""Read guest bytes at a CS:RIP as the guest sees them, for reports (crash messages).

Design: `code_bytes(mem, state, rip)` forms the linear address of `rip` in the code
segment of `state` (CS.base + RIP; 32-bit wrap outside long mode, the base ignored in
64-bit code) and translates it through the guest's own page tables when CR0.PG is set,
in any paging mode (SDM Vol. 3A, 4.3-4.5): 32-bit with 4 KiB and 4 MiB pages, PAE, and
4-level with 4 KiB, 2 MiB and 1 GiB pages. It works from a `CpuState` and
`GuestMemory` alone, so every engine's crash report uses the same code.

Invariants: read-only (no Accessed/Dirty bit is set, unlike a CPU walk: a report must
not change the guest); every access goes through `GuestMemory`'s bounds checks; a page
that is not present or not RAM ends the bytes there (fewer bytes, or none), never an
exception; at most 15 bytes, the longest x86 instruction.
"""

from __future__ import annotations

from pyhv.arch.x86.cpustate import CR0_PG, CR4_PAE, CR4_PSE, EFER_LMA, CpuState
from pyhv.memory import GuestMemory

MAX_INSN = 15
P, PS = 0x1, 0x80
ADDR_MASK = 0x000F_FFFF_FFFF_F000


def code_address(state: CpuState, rip: int) -> int:
    """The linear address of `rip` in `state`'s code segment."""
    if state.efer & EFER_LMA and state.cs.l:
        return rip & 0xFFFF_FFFF_FFFF_FFFF
    return (state.cs.base + rip) & 0xFFFF_FFFF


def _entry(mem: GuestMemory, gpa: int, size: int) -> int | None:
    if not mem.contains(gpa, size):
        return None
    return int.from_bytes(mem.read(gpa, size), "little")


def translate(mem: GuestMemory, state: CpuState, la: int) -> int | None:
    """The guest-physical address of linear address `la`, or None (not mapped)."""
    if not state.cr0 & CR0_PG:
        return la
    levels: tuple[int, ...]
    if state.efer & EFER_LMA:
        table, levels, width = state.cr3 & ADDR_MASK, (39, 30, 21, 12), 8
    elif state.cr4 & CR4_PAE:
        pdpte = _entry(mem, (state.cr3 & 0xFFFF_FFE0) + 8 * ((la >> 30) & 3), 8)
        if pdpte is None or not pdpte & P:
            return None
        table, levels, width = pdpte & ADDR_MASK, (21, 12), 8
    else:
        table, levels, width = state.cr3 & 0xFFFF_F000, (22, 12), 4
    index_mask = 0x1FF if width == 8 else 0x3FF
    frame = 0xFFFF_F000 if width == 4 else ADDR_MASK
    for shift in levels:
        e = _entry(mem, table + width * ((la >> shift) & index_mask), width)
        if e is None or not e & P:
            return None
        if shift == 12:
            return (e & frame) | (la & 0xFFF)
        if e & PS and width == 8 and shift in (30, 21):          # 1 GiB or 2 MiB page
            mask = (1 << shift) - 1
            return (e & ADDR_MASK & ~mask) | (la & mask)
        if e & PS and width == 4 and state.cr4 & CR4_PSE:        # 4 MiB page:
            base = (e & 0xFFC0_0000) | (((e >> 13) & 0xFF) << 32)  # bits 20:13 = 39:32
            return base | (la & 0x3F_FFFF)
        table = e & frame
    return None


def read_linear(mem: GuestMemory, state: CpuState, la: int, size: int) -> bytes:
    """Up to `size` bytes from linear address `la`, stopping at the first byte that is
    not mapped to RAM."""
    out = bytearray()
    while len(out) < size:
        addr = la + len(out)
        gpa = translate(mem, state, addr)
        if gpa is None:
            break
        chunk = min(size - len(out), 0x1000 - (addr & 0xFFF))
        while chunk > 0 and not mem.contains(gpa, chunk):
            chunk -= 1
        if chunk == 0:
            break
        out += mem.read(gpa, chunk)
    return bytes(out)


def code_bytes(mem: GuestMemory, state: CpuState, rip: int, size: int = MAX_INSN) -> bytes:
    """Up to `size` instruction bytes at `rip` in `state`'s code segment, through the
    guest's paging: what a crash report pairs with the RIP it prints."""
    return read_linear(mem, state, code_address(state, rip), size)
