"""Consistency check and repair, with qemu-img check's categories and exit codes.

The check recomputes every cluster's expected count (counts.py) by walking the active
and snapshot L1 tables, validating each entry as it goes, then compares with the stored
refcounts:

    stored > expected   leak        (wasted space, harmless)      exit 3
    stored < expected   corruption  (a write could free live data) exit 2
    COPIED flag disagreeing with a stored refcount in the active tables: corruption
    entries that are unaligned, past the end of the file, or inside metadata: corruption
    a v3 snapshot table entry without the disk size: corruption ("incomplete", as
        qemu-img reports it; `incomplete_snapshots` counts them: every rewrite, and so
        every snapshot operation and repair, writes complete entries)

Repair (`-r leaks` or `-r all`) is the whole-metadata rewrite (rewrite.py): a recounted
refcount structure and COPIED flags, committed by one header write.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pyhv.disk.qcow2 import cluster as C
from pyhv.disk.qcow2.counts import Counts, add_l2_refs
from pyhv.errors import ImageError

if TYPE_CHECKING:
    from pyhv.disk.qcow2.image import Qcow2Image


@dataclass
class CheckResult:
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    messages: list[str] = field(default_factory=list)
    allocated_clusters: int = 0
    total_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    incomplete_snapshots: int = 0

    @property
    def exit_status(self) -> int:
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0


def _walk_l1(img: Qcow2Image, res: CheckResult, counts: Counts, l1: list[int],
             active: bool) -> None:
    cs, cb = img.cs, img.cb
    last_host = -1
    for i, e in enumerate(l1):
        off = e & C.OFFSET_MASK
        if not off:
            continue
        try:
            C.check_l1_entry(i, e, cs, img.f.size)
        except ImageError as err:
            res.corruptions += 1
            res.messages.append(f"ERROR {err}")
            continue
        counts.add(off >> cb)
        raw = img.f.pread(off, cs, "L2 table")
        ents = list(struct.unpack(f">{img.l2e}Q", raw))
        good = []
        for j, e2 in enumerate(ents):
            if not e2:
                continue
            try:
                C.check_l2_entry(f"L2 table {off:#x} entry {j}", e2, img.h.version, cb,
                                 img.f.size)
                d = (e2 & C.OFFSET_MASK) >> cb
                if not e2 & C.COMPRESSED and d and (d in img.meta or d in img.l2_tables):
                    raise ImageError(f"L2 table {off:#x} entry {j}: data cluster overlaps "
                                     "metadata")
            except ImageError as err:
                res.corruptions += 1
                res.messages.append(f"ERROR {err}")
                continue
            good.append(e2)
            if active and (e2 & C.COMPRESSED or e2 & C.OFFSET_MASK):
                res.allocated_clusters += 1
                if e2 & C.COMPRESSED:
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1  # as qemu-img counts them
                elif e2 & C.OFFSET_MASK:
                    h2 = e2 & C.OFFSET_MASK
                    if last_host >= 0 and h2 != last_host + cs:
                        res.fragmented_clusters += 1
                    last_host = h2
        add_l2_refs(counts, good, cb)


def expected_counts(img: Qcow2Image, res: CheckResult) -> Counts:
    cs, cb, h = img.cs, img.cb, img.h
    counts = Counts(-(-img.f.size // cs))
    counts.add(0)
    counts.add_range(h.l1_table_offset, h.l1_size * 8, cb)
    counts.add_range(h.refcount_table_offset, h.refcount_table_clusters * cs, cb)
    for e in img.refs.table:
        if e:
            counts.add(e >> cb)
    if h.nb_snapshots:
        counts.add_range(h.snapshots_offset, img.snap_table_bytes, cb)
    _walk_l1(img, res, counts, img.l1, True)
    for sn in img.snapshots:
        if sn.l1_size:
            counts.add_range(sn.l1_table_offset, sn.l1_size * 8, cb)
            try:
                l1 = img.read_l1(sn.l1_table_offset, sn.l1_size)
            except ImageError as err:
                res.corruptions += 1
                res.messages.append(f"ERROR snapshot {sn.id_str}: {err}")
                continue
            _walk_l1(img, res, counts, l1, False)
    return counts


def _differing(img: Qcow2Image, counts: Counts, blocks: list[int]) -> Iterator[int]:
    """The clusters of `blocks` to compare one by one; a block whose stored counts
    equal the expected ones as a whole (the common case) yields only -(its highest
    cluster with a count + 1), or nothing if it has none (one list comparison instead
    of a Python call per cluster: the check before a snapshot is applied is on
    `pyhv run --restore`'s path)."""
    per = img.refs.per_block
    for bi in blocks:
        lo, hi = bi * per, (bi + 1) * per
        blk = img.refs.block(bi)
        part = counts.a[lo:hi]
        exp = part.tolist() + [0] * (per - len(part))
        if blk is not None and blk == exp:
            used = part.tobytes().rstrip(b"\0")      # 8 bytes a count
            if used:
                yield -(lo + (len(used) - 1) // 8) - 1
            continue
        yield from range(lo, hi)


def check(img: Qcow2Image, repair: str | None = None) -> CheckResult:
    """Check `img`; with repair "leaks" or "all", fix what was found (image opened rw)."""
    res = CheckResult()
    img.writeback()  # the walk reads tables from the file: no entry may be pending
    counts = expected_counts(img, res)
    cs, cb = img.cs, img.cb
    per = img.refs.per_block
    blocks = {bi for bi, e in enumerate(img.refs.table) if e}
    blocks.update(ci // per for ci in range(len(counts)) if counts.a[ci])
    file_clusters = -(-img.f.size // cs)
    highest = 0
    for ci in _differing(img, counts, sorted(blocks)):
        if ci < 0:                  # a block that matched as a whole: its highest count
            highest = max(highest, -ci - 1)
            continue
        exp = counts.get(ci)
        got = img.refs.get(ci)
        if got:
            highest = ci
        if got == exp:
            continue
        if got > exp:
            if ci >= file_clusters and exp == 0:
                res.leaks += 1
                res.messages.append(f"Leaked cluster {ci} refcount={got} reference={exp} "
                                    "(beyond the end of the file)")
                continue
            res.leaks += 1
            res.messages.append(f"Leaked cluster {ci} refcount={got} reference={exp}")
        else:
            res.corruptions += 1
            res.messages.append(f"ERROR cluster {ci} refcount={got} reference={exp}")
    # COPIED flags of the active tables against the stored refcounts
    for i, e in enumerate(img.l1):
        off = e & C.OFFSET_MASK
        if not off or off + cs > img.f.size:
            continue
        if (img.refs.get(off >> cb) == 1) != bool(e & C.COPIED):
            res.corruptions += 1
            res.messages.append(f"ERROR OFLAG_COPIED L2 cluster: l1_index={i} "
                                f"l1_entry={e:x} refcount={img.refs.get(off >> cb)}")
        raw = img.f.pread(off, cs, "L2 table")
        for e2 in struct.unpack(f">{img.l2e}Q", raw):
            if not e2 or e2 & C.COMPRESSED or not e2 & C.OFFSET_MASK:
                continue
            rc = img.refs.get((e2 & C.OFFSET_MASK) >> cb)
            if (rc == 1) != bool(e2 & C.COPIED):
                res.corruptions += 1
                res.messages.append(f"ERROR OFLAG_COPIED data cluster: l2_entry={e2:x} "
                                    f"refcount={rc}")
    if img.h.version >= 3:
        for i, sn in enumerate(img.snapshots):
            if sn.disk_size is None:
                res.corruptions += 1
                res.incomplete_snapshots += 1
                res.messages.append(f"ERROR snapshot table entry {i} is incomplete")
    res.total_clusters = -(-img.size // cs)
    res.image_end_offset = (highest + 1) * cs  # as qemu-img: past the last counted cluster
    if repair and (res.leaks or res.corruptions):
        if repair == "leaks" and res.corruptions:
            res.messages.append("corruptions were not repaired (use -r all)")
            return res
        from pyhv.disk.qcow2.rewrite import rewrite

        rewrite(img, active_l1=list(img.l1), snapshots=list(img.snapshots), size=img.size)
        after = check(img)
        res.leaks_fixed = res.leaks - after.leaks
        res.corruptions_fixed = res.corruptions - after.corruptions
        res.leaks, res.corruptions = after.leaks, after.corruptions
        res.image_end_offset = after.image_end_offset
    return res
