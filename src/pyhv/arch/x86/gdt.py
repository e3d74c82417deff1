"""Segment descriptors: encode a `Segment` into the 8-byte GDT format and back.

Layout of a code/data descriptor (SDM Vol. 3A, Figure 3-8):

    63      56 55 54 53 52 51    48 47 46 45 44 43  40 39       16 15        0
    | base 31:24| G|DB| L|AVL|lim 19:16| P| DPL | S| type | base 23:0 | limit 15:0 |

System descriptors (TSS, LDT) are 16 bytes in long mode: the upper 8 hold base 63:32.
"""

from __future__ import annotations

import struct

from pyhv.arch.x86.cpustate import Segment


def encode(seg: Segment) -> int:
    """The low 8 bytes of seg's descriptor, as an integer."""
    limit = seg.limit >> 12 if seg.g else seg.limit
    if limit > 0xFFFFF:
        raise ValueError(f"segment limit {seg.limit:#x} needs G=1")
    base = seg.base & 0xFFFFFFFF
    return ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | ((seg.type & 0xF) << 40)
            | (seg.s << 44) | ((seg.dpl & 3) << 45) | (seg.present << 47)
            | (((limit >> 16) & 0xF) << 48) | (seg.avl << 52) | (seg.l << 53)
            | (seg.db << 54) | (seg.g << 55) | (((base >> 24) & 0xFF) << 56))


def decode(selector: int, desc: int, high: int = 0) -> Segment:
    """A Segment from a raw descriptor (high: the upper 8 bytes of a 16-byte one)."""
    limit = (desc & 0xFFFF) | (((desc >> 48) & 0xF) << 16)
    g = (desc >> 55) & 1
    if g:
        limit = (limit << 12) | 0xFFF
    base = ((desc >> 16) & 0xFFFFFF) | (((desc >> 56) & 0xFF) << 24)
    s = (desc >> 44) & 1
    if not s:
        base |= (high & 0xFFFFFFFF) << 32
    return Segment(selector=selector, base=base, limit=limit, type=(desc >> 40) & 0xF, s=s,
                   dpl=(desc >> 45) & 3, present=(desc >> 47) & 1, avl=(desc >> 52) & 1,
                   l=(desc >> 53) & 1, db=(desc >> 54) & 1, g=g)


def table(entries: list[Segment | None]) -> bytes:
    """A GDT image: entry i holds entries[i] (None = null descriptor). System segments
    take two slots in long mode; pass them followed by None."""
    out = bytearray()
    skip = False
    for seg in entries:
        if skip:
            skip = False
            continue
        if seg is None:
            out += bytes(8)
            continue
        out += struct.pack("<Q", encode(seg))
        if not seg.s:
            out += struct.pack("<Q", (seg.base >> 32) & 0xFFFFFFFF)
            skip = True
    return bytes(out)
