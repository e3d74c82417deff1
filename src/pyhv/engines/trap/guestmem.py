"""The guest's flat address space, as the monitor reads and writes it.

Design: how far this engine goes with guest paging. The real CPU runs the guest on the
monitor's page tables (monitor.py): an identity map of the first 4 GiB, user-accessible.
The guest's own CR3 is recorded by the virtual CPU but never walked, so guest-virtual ==
guest-physical below GUEST_SPAN, exactly the address space pyhv's loaders enter a
64-bit kernel with. (Shadow page tables, which would follow the guest's own tables and
write-protect them, are the full technique: docs/trap.md.)

When the monitor itself touches guest memory (a frame it pushes for a reflected event,
the operand of LGDT, the IDT gate it reads) it applies the same rules the CPU would
under that map, and reports a failure as the fault the guest should get:

    non-canonical address                 #GP(0)
    outside [0, GUEST_SPAN) or not RAM    #PF, "not present", CR2 = the address
"""

from __future__ import annotations

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


def _check(mem: GuestMemory, addr: int, size: int, write: bool) -> int:
    addr &= 0xFFFF_FFFF_FFFF_FFFF
    if not (canonical(addr) and canonical((addr + size - 1) & 0xFFFF_FFFF_FFFF_FFFF)):
        raise GuestFault(GP, 0)
    if addr + size > GUEST_SPAN or not mem.contains(addr, size):
        raise GuestFault(PF, PF_WRITE if write else 0, cr2=addr)
    return addr


def read(mem: GuestMemory, addr: int, size: int) -> bytes:
    return mem.read(_check(mem, addr, size, False), size)


def read_u64(mem: GuestMemory, addr: int) -> int:
    return int.from_bytes(read(mem, addr, 8), "little")


def write(mem: GuestMemory, addr: int, data: bytes) -> None:
    mem.write(_check(mem, addr, len(data), True), data)


def fetch(mem: GuestMemory, rip: int, size: int = 15) -> bytes:
    """Up to `size` instruction bytes at `rip` (fewer at the end of RAM; b"" if none)."""
    while size > 0:
        try:
            return read(mem, rip, size)
        except GuestFault:
            size -= 1
    return b""
