"""Linear-address access for the emu engine's own work (delivery, syscall, error reports).

Design: exception and interrupt delivery reads the IDT, GDT, LDT and TSS and pushes the
return frame at *linear* addresses, as the CPU would. unicorn's TLB is not reachable
from Python, so this module walks the guest's page tables itself (SDM Vol. 3A, 4.3-4.5):
no paging, 32-bit (4 KiB and 4 MiB pages), PAE, and 4-level paging (4 KiB, 2 MiB and
1 GiB pages). Accesses made here are supervisor ("implicit") accesses: U/S is not
checked, R/W is enforced for writes when CR0.WP=1, and the Accessed/Dirty bits are set
like the hardware does. A failed walk raises `PageFault` with the architectural error
code and the faulting address; physical addresses outside RAM raise `BadPhysical`
(the caller turns that into the right fault: delivery cannot use MMIO as a stack).

Invariant: every byte goes through `GuestMemory` (bounds-checked); nothing here reads
host memory directly.
"""

from __future__ import annotations

import struct

from pyhv.arch.x86.cpustate import CR0_PG, CR0_WP, CR4_PAE, CR4_PSE, EFER_LMA
from pyhv.errors import GuestMemoryError
from pyhv.memory import GuestMemory

P, RW, US, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
PF_P, PF_W, PF_U, PF_RSVD, PF_I = 1, 2, 4, 8, 16
ADDR_MASK = 0x000F_FFFF_FFFF_F000


class PageFault(Exception):
    def __init__(self, addr: int, error_code: int) -> None:
        super().__init__(f"#PF at {addr:#x} (error code {error_code:#x})")
        self.addr = addr
        self.error_code = error_code


class BadPhysical(Exception):
    def __init__(self, gpa: int) -> None:
        super().__init__(f"physical address {gpa:#x} is not RAM")
        self.gpa = gpa


class Mmu:
    """Translate and access linear addresses under one set of control registers."""

    def __init__(self, mem: GuestMemory, cr0: int, cr3: int, cr4: int, efer: int) -> None:
        self.mem = mem
        self.cr0, self.cr3, self.cr4, self.efer = cr0, cr3, cr4, efer

    # ------------------------------------------------------------------ translation

    def _entry(self, gpa: int, size: int) -> int:
        try:
            return self.mem.read_u64(gpa) if size == 8 else self.mem.read_u32(gpa)
        except GuestMemoryError:
            raise BadPhysical(gpa) from None

    def _set_bits(self, gpa: int, size: int, old: int, bits: int) -> None:
        if old & bits != bits:
            if size == 8:
                self.mem.write_u64(gpa, old | bits)
            else:
                self.mem.write_u32(gpa, old | bits)

    def translate(self, la: int, write: bool = False) -> int:
        """The guest-physical address of linear address la (supervisor access)."""
        if not self.cr0 & CR0_PG:
            return la & 0xFFFFFFFF if not self.efer & EFER_LMA else la
        err_w = PF_W if write else 0
        if self.efer & EFER_LMA:
            levels = [(39, 8), (30, 8), (21, 8), (12, 8)]
            table = self.cr3 & ADDR_MASK
        elif self.cr4 & CR4_PAE:
            pdpte_addr = (self.cr3 & 0xFFFFFFE0) + 8 * ((la >> 30) & 3)
            pdpte = self._entry(pdpte_addr, 8)
            if not pdpte & P:
                raise PageFault(la, err_w)
            levels = [(21, 8), (12, 8)]
            table = pdpte & ADDR_MASK
        else:
            levels = [(22, 4), (12, 4)]
            table = self.cr3 & 0xFFFFF000
        walked: list[tuple[int, int, int]] = []
        for depth, (shift, size) in enumerate(levels):
            idx = (la >> shift) & (0x1FF if size == 8 else 0x3FF)
            addr = table + idx * size
            e = self._entry(addr, size)
            if not e & P:
                raise PageFault(la, err_w)
            if write and not e & RW and self.cr0 & CR0_WP:
                raise PageFault(la, PF_P | err_w)
            walked.append((addr, size, e))
            last = depth == len(levels) - 1
            large = not last and e & PS and (shift in (21, 30) if size == 8 else
                                              bool(self.cr4 & CR4_PSE))
            if last or large:
                for a_addr, a_size, a_e in walked[:-1]:
                    self._set_bits(a_addr, a_size, a_e, A)
                self._set_bits(addr, size, e, A | (D if write else 0))
                if size == 4:
                    if large:   # 4 MiB page: bits 20:13 are physical 39:32
                        base = (e & 0xFFC00000) | (((e >> 13) & 0xFF) << 32)
                        return base | (la & 0x3FFFFF)
                    return (e & 0xFFFFF000) | (la & 0xFFF)
                mask = (1 << shift) - 1
                return (e & ADDR_MASK & ~mask) | (la & mask)
            table = e & ADDR_MASK
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ access

    def read(self, la: int, size: int) -> bytes:
        out = bytearray()
        while size > 0:
            chunk = min(size, 0x1000 - (la & 0xFFF))
            gpa = self.translate(la)
            try:
                out += self.mem.read(gpa, chunk)
            except GuestMemoryError:
                raise BadPhysical(gpa) from None
            la += chunk
            size -= chunk
        return bytes(out)

    def write(self, la: int, data: bytes) -> None:
        # translate every page first so a fault leaves memory untouched
        pieces = []
        off = 0
        while off < len(data):
            chunk = min(len(data) - off, 0x1000 - ((la + off) & 0xFFF))
            pieces.append((self.translate(la + off, write=True), data[off:off + chunk]))
            off += chunk
        for gpa, piece in pieces:
            try:
                self.mem.write(gpa, piece)
            except GuestMemoryError:
                raise BadPhysical(gpa) from None

    def read_u16(self, la: int) -> int:
        return int(struct.unpack("<H", self.read(la, 2))[0])

    def read_u32(self, la: int) -> int:
        return int(struct.unpack("<I", self.read(la, 4))[0])

    def read_u64(self, la: int) -> int:
        return int(struct.unpack("<Q", self.read(la, 8))[0])
