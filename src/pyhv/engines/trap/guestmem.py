"""The guest's linear address space, as the monitor reads and writes it.

Design: two modes (docs/trap.md, "Guest page tables").

    flat     until the guest writes CR3 (or runs INVLPG), it runs on the monitor's
             identity map of the first 4 GiB (monitor.py), which is what pyhv's loader
             enters a 64-bit kernel with: guest-virtual == guest-physical.
    paged    afterwards the guest's own page tables are followed (paging.py walks them,
             shadow.py shadows them for the real CPU): a `GuestView` with `paging` set
             translates every monitor access through them, and reports writes that land
             on the guest's page-table pages back to the shadow.

When the monitor itself touches guest memory (a frame it pushes for a reflected event,
the operand of LGDT, the IDT gate it reads) it applies the same rules the CPU would,
and reports a failure as the fault the guest should get:

    non-canonical address                 #GP(0)
    flat: outside [0, GUEST_SPAN)         #PF, "not present", CR2 = the address
    paged: what the guest's tables say    #PF with the walk's error code (paging.py)
    no RAM behind the address             #PF, "not present", CR2 = the address

All pages of a multi-page access are translated before any byte is written.

Functions take a `GuestMemory` (always flat: the unit tests, and the engine before it
has a view) or a `GuestView`.
"""

from __future__ import annotations

from typing import Protocol

from pyhv.engines.trap.monitor import GUEST_SPAN
from pyhv.memory import GuestMemory

GP, PF = 13, 14
PF_WRITE = 1 << 1


class GuestFault(Exception):
    """The fault an access by the monitor on the guest's behalf raises in the guest."""

    def __init__(self, vector: int, error_code: int | None = 0, cr2: int | None = None
                 ) -> None:
        super().__init__(f"vector {vector} error {error_code} cr2 {cr2}")
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2


def canonical(addr: int) -> bool:
    top = addr >> 47
    return top == 0 or top == 0x1FFFF


class Paging(Protocol):
    """The guest's own paging, as the shadow MMU exposes it to the monitor's accesses."""

    def translate(self, va: int, write: bool) -> int:
        """guest-physical address of `va` (sets A/D); raises GuestFault(#PF)."""
        ...

    def written(self, gpa: int, size: int) -> None:
        """The monitor wrote guest-physical [gpa, gpa+size): drop what it invalidates."""
        ...


class GuestView:
    """The guest's linear address space: flat, or through `paging` once it is set."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.paging: Paging | None = None


Mem = GuestMemory | GuestView


def _check(mem: GuestMemory, addr: int, size: int, write: bool) -> int:
    addr &= 0xFFFF_FFFF_FFFF_FFFF
    if not (canonical(addr) and canonical((addr + size - 1) & 0xFFFF_FFFF_FFFF_FFFF)):
        raise GuestFault(GP, 0)
    if addr + size > GUEST_SPAN or not mem.contains(addr, size):
        raise GuestFault(PF, PF_WRITE if write else 0, cr2=addr)
    return addr


def _chunks(view: GuestView, paging: Paging, addr: int, size: int, write: bool
            ) -> list[tuple[int, int, int]]:
    """[(linear, gpa, length)] of an access, every page translated and checked first."""
    addr &= 0xFFFF_FFFF_FFFF_FFFF
    if not (canonical(addr) and canonical((addr + size - 1) & 0xFFFF_FFFF_FFFF_FFFF)):
        raise GuestFault(GP, 0)
    out: list[tuple[int, int, int]] = []
    va, left = addr, size
    while left > 0:
        n = min(left, 0x1000 - (va & 0xFFF))
        gpa = paging.translate(va, write)
        if not view.mem.contains(gpa, n):
            raise GuestFault(PF, PF_WRITE if write else 0, cr2=va)
        out.append((va, gpa, n))
        va, left = (va + n) & 0xFFFF_FFFF_FFFF_FFFF, left - n
    return out


def read(mem: Mem, addr: int, size: int) -> bytes:
    if isinstance(mem, GuestView):
        if mem.paging is None:
            return mem.mem.read(_check(mem.mem, addr, size, False), size)
        return b"".join(mem.mem.read(gpa, n)
                        for _, gpa, n in _chunks(mem, mem.paging, addr, size, False))
    return mem.read(_check(mem, addr, size, False), size)


def read_u64(mem: Mem, addr: int) -> int:
    return int.from_bytes(read(mem, addr, 8), "little")


def write(mem: Mem, addr: int, data: bytes) -> None:
    if isinstance(mem, GuestView):
        paging = mem.paging
        if paging is None:
            mem.mem.write(_check(mem.mem, addr, len(data), True), data)
            return
        pos = 0
        for _, gpa, n in _chunks(mem, paging, addr, len(data), True):
            mem.mem.write(gpa, data[pos:pos + n])
            paging.written(gpa, n)
            pos += n
        return
    mem.write(_check(mem, addr, len(data), True), data)


def fetch(mem: Mem, rip: int, size: int = 15) -> bytes:
    """Up to `size` instruction bytes at `rip` (fewer at the end of RAM; b"" if none)."""
    while size > 0:
        try:
            return read(mem, rip, size)
        except GuestFault:
            size -= 1
    return b""
