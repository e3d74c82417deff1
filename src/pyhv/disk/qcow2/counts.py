"""Expected reference counts, computed by walking every L1 table (as qemu-img check does).

A cluster's expected count is the number of paths that reach it: the header (cluster 0),
each cluster of the active and snapshot L1 tables, each L2 table once per L1 entry that
points to it, each data cluster once per L2 entry (per L1 path), each host cluster that a
compressed stream touches once per compressed entry, the snapshot table, and the refcount
table and blocks themselves.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

from pyhv.disk.qcow2 import cluster as C


class Counts:
    """A growable array of per-cluster counts."""

    def __init__(self, n: int = 0) -> None:
        self.a = array("q", bytes(8 * max(n, 16)))

    def add(self, ci: int, n: int = 1) -> None:
        if ci >= len(self.a):
            self.a.extend(array("q", bytes(8 * max(ci + 1 - len(self.a), len(self.a)))))
        self.a[ci] += n

    def add_range(self, off: int, nbytes: int, cb: int) -> None:
        if nbytes <= 0:
            return
        for ci in range(off >> cb, ((off + nbytes - 1) >> cb) + 1):
            self.add(ci)

    def get(self, ci: int) -> int:
        return self.a[ci] if ci < len(self.a) else 0

    def __len__(self) -> int:
        return len(self.a)


def add_l2_refs(counts: Counts, entries: Iterable[int], cb: int) -> None:
    """Count the data clusters one L2 table references."""
    for e in entries:
        if not e:
            continue
        if e & C.COMPRESSED:
            for ci in C.compressed_clusters(e, cb):
                counts.add(ci)
        else:
            off = e & C.OFFSET_MASK
            if off:
                counts.add(off >> cb)
