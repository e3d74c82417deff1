"""Identity-mapped page tables for entering long mode (and 32-bit paging-free boot).

pyhv's boot page tables map guest-virtual == guest-physical for the first `span` bytes
with 2 MiB pages: one PML4 page, one PDPT page and one PD page per GiB, all inside
[PAGE_TABLES, PAGE_TABLES_END) of the address map (enough for 4 GiB; higher RAM is
reached by the guest's own tables, as every real kernel builds).

Entry bits (SDM Vol. 3A, 4.5): P=1, RW=2, US=4, PS=0x80 (2 MiB page in a PD).
"""

from __future__ import annotations

import struct

from pyhv.arch.x86 import layout

P, RW, US, PS = 0x1, 0x2, 0x4, 0x80
GIB = 1 << 30


def identity_tables(span: int = 4 * GIB, *, base: int = layout.PAGE_TABLES,
                    user: bool = False) -> tuple[int, bytes]:
    """(cr3, image) for tables placed at `base`; write `image` at `base`.

    user=True sets U/S on every level, so CPL 3 code may use the mapping too.
    """
    gibs = max(1, (span + GIB - 1) // GIB)
    if gibs > 4:
        raise ValueError("boot page tables cover at most 4 GiB")
    flags = P | RW | (US if user else 0)
    pml4 = base
    pdpt = base + 0x1000
    pds = base + 0x2000
    image = bytearray(0x2000 + 0x1000 * gibs)
    struct.pack_into("<Q", image, 0, pdpt | flags)
    for g in range(gibs):
        struct.pack_into("<Q", image, 0x1000 + 8 * g, (pds + 0x1000 * g) | flags)
        for i in range(512):
            struct.pack_into("<Q", image, 0x2000 + 0x1000 * g + 8 * i,
                             (g * GIB + i * (2 << 20)) | flags | PS)
    if base + len(image) > layout.PAGE_TABLES_END:
        raise ValueError("boot page tables overflow their area")
    return pml4, bytes(image)
