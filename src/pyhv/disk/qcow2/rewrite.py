"""Whole-metadata rewrite: the atomic commit behind snapshots, repair and dirty images.

    before:  [hdr][old L1][old L2s][data...][old refcounts][old snapshot table]
    write:                                        ... [new L2 copies][new L1]
                                                      [new snapshot table]
                                                      [new refcount blocks][new table]
    commit:  one pwrite of header bytes 24..72 (size, L1, refcount and snapshot pointers)

Everything new goes past the current end of the file and is referenced by nothing until
the commit, so a crash before it leaves the old image untouched, and a crash after it
leaves the new one complete. Flush barriers make that hold on the disk too: the image's
pending table entries are written back first (a new snapshot keeps the old active L1
and its L2 tables, which must be complete on disk), everything new is durable before the
header switch, and the switch is durable before any cluster it released is reused.
Counts are recomputed from scratch (counts.py) for the new state, so the rewrite also
repairs leaks and wrong refcounts; COPIED flags in the new active tables are set from
the recomputed counts.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from pyhv.disk.qcow2 import cluster as C
from pyhv.disk.qcow2.counts import Counts, add_l2_refs
from pyhv.disk.qcow2.fileio import InjectedFault
from pyhv.disk.qcow2.refcount import write_structure
from pyhv.disk.qcow2.snapshot import Snapshot

if TYPE_CHECKING:
    from pyhv.disk.qcow2.image import Qcow2Image


def rewrite(img: Qcow2Image, *, active_l1: list[int], snapshots: list[Snapshot],
            size: int) -> None:
    """Make `active_l1` (its L2 tables copied) and `snapshots` the image's state.

    A failure before the commit (a refcount overflow in narrow refcounts, an I/O error)
    cuts the file back to its old end: what was written past it is referenced by
    nothing, so the image is left exactly as it was (a simulated crash, InjectedFault,
    is left as a crash would leave it). Barriers: everything new is durable before the
    header switch, and the switch before any cluster it released can be reused."""
    img.writeback()  # pending entries first: they belong to the old state, kept intact
    old_end = img.f.size
    try:
        l1_off, rt_off, rt_ncl, st_off = _write_new(img, active_l1, snapshots, size)
    except InjectedFault:
        raise
    except BaseException:
        if img.f.size > old_end:
            img.f.truncate(old_end)
        raise
    h = img.h
    h.size = size
    h.l1_size, h.l1_table_offset = len(active_l1), l1_off
    h.refcount_table_offset, h.refcount_table_clusters = rt_off, rt_ncl
    h.nb_snapshots, h.snapshots_offset = len(snapshots), st_off
    img.f.barrier()  # the new tables, snapshot table and refcounts before the switch
    img.f.pwrite(24, struct.pack(">QI", size, 0) + h.pack_pointers())  # the commit
    img.f.barrier()  # the switch before the old metadata's clusters are reused
    img.reload()


def _write_new(img: Qcow2Image, active_l1: list[int], snapshots: list[Snapshot],
               size: int) -> tuple[int, int, int, int]:
    """Write the new tables past the end of the file; return (L1 offset, refcount
    table offset and clusters, snapshot table offset) for the commit."""
    cs, cb, f, h = img.cs, img.cb, img.f, img.h
    cursor = img.refs.next_free() // cs
    # 1. reserve: active L2 copies, active L1, snapshot table
    copies: dict[int, tuple[int, int]] = {}
    for i, e in enumerate(active_l1):
        off = e & C.OFFSET_MASK
        if off:
            copies[i] = (off, cursor)
            cursor += 1
    l1_ci = cursor
    l1_ncl = max(1, -(-len(active_l1) * 8 // cs))
    cursor += l1_ncl
    table = b"".join(sn.pack(h.version, size) for sn in snapshots)
    st_ci = cursor if snapshots else 0
    st_ncl = -(-len(table) // cs)
    cursor += st_ncl
    # 2. count every reference of the new state
    counts = Counts(cursor)
    counts.add(0)
    for ci in range(l1_ci, l1_ci + l1_ncl):
        counts.add(ci)
    for ci in range(st_ci, st_ci + st_ncl):
        counts.add(ci)
    contents: dict[int, list[int]] = {}
    for i, (src, dst) in copies.items():
        counts.add(dst)
        contents[i] = list(img._l2(src))
        add_l2_refs(counts, contents[i], cb)
    for sn in snapshots:
        if not sn.l1_size:
            continue
        counts.add_range(sn.l1_table_offset, sn.l1_size * 8, cb)
        for e in img.read_l1(sn.l1_table_offset, sn.l1_size):
            off = e & C.OFFSET_MASK
            if off:
                counts.add(off >> cb)
                add_l2_refs(counts, img._l2(off), cb)
    # 3. write the new tables, COPIED flags from the new counts
    new_l1 = [0] * len(active_l1)
    for i, (_src, dst) in copies.items():
        ents = contents[i]
        for j, e in enumerate(ents):
            if e and not e & C.COMPRESSED and e & C.OFFSET_MASK:
                one = counts.get((e & C.OFFSET_MASK) >> cb) == 1
                ents[j] = (e | C.COPIED) if one else (e & ~C.COPIED)
        f.pwrite(dst * cs, struct.pack(f">{len(ents)}Q", *ents))
        new_l1[i] = dst * cs | (C.COPIED if counts.get(dst) == 1 else 0)
    f.pwrite(l1_ci * cs, struct.pack(f">{len(new_l1)}Q", *new_l1).ljust(l1_ncl * cs, b"\0"))
    if snapshots:
        f.pwrite(st_ci * cs, table.ljust(st_ncl * cs, b"\0"))
    # 4. a fresh refcount structure, then the one-write commit
    rt_off, rt_ncl, _end = write_structure(f, h, counts.a, cursor)
    return l1_ci * cs, rt_off, rt_ncl, st_ci * cs
