"""Cluster reference counts: the refcount table, refcount blocks, and allocation.

Layout (qcow2.txt "Cluster Refcounts"):

    refcount table (refcount_table_clusters clusters of u64 BE)
      entry i --> refcount block i (one cluster, 0 = not allocated)
                    holds cluster_size*8 / refcount_bits counts, for host clusters
                    [i*per_block, (i+1)*per_block); counts narrower than a byte are packed
                    least-significant bits first, wider ones are big-endian integers.

Every host cluster in use (header, tables, data) has a count equal to the number of
references to it; qemu-img check recomputes them by walking all L1 tables.

Allocation first reuses free clusters (count 0: released by copy-on-write, discard,
snapshot deletion or a metadata rewrite), scanning from a hint that only moves back when
a count drops to 0; otherwise it appends at `next_free` (the end of the file, or past the
last counted cluster). A free cluster is referenced by nothing, so reusing it is as safe
as appending.

Crash-safety rules kept here:
- a new refcount block is written (with its own count, if it covers itself) and made
  durable (a flush barrier) before the table entry that points to it;
- counts are raised before any reference to a cluster is written and lowered after the
  last reference is removed, so an interrupted update leaves only leaks;
- when the table is full, or when a whole new structure is wanted (snapshots, repair),
  `write_structure` writes a complete new table and blocks past the end of the file; the
  caller switches to it with one atomic header write (header.pack_pointers), with a
  barrier before it (the new structure durable first) and one after it (the switch
  durable before the old structure's clusters, now free, are reused).
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from collections.abc import Callable, Sequence

from pyhv.disk.qcow2.fileio import ImageFile
from pyhv.disk.qcow2.header import MAX_REFTABLE_BYTES, Header
from pyhv.errors import ImageError

_TYPECODE = {1: "B", 2: "H", 4: "I" if array("I").itemsize == 4 else "L", 8: "Q"}
OFFSET_MASK = 0xFFFFFFFFFFFFFE00  # refcount table entry: bits 9-63
# Clusters counted past the end of the file are normal after a crash (counted, then the
# write never happened), but only a few: more than this is a hostile or broken image.
CLAIM_SLACK_BYTES = 16 << 20


def decode_counts(data: bytes, order: int) -> list[int]:
    """Unpack a refcount block (or part of one) into a list of counts."""
    bits = 1 << order
    if bits >= 8:
        a = array(_TYPECODE[bits // 8])
        a.frombytes(data)
        if sys.byteorder == "little" and bits > 8:
            a.byteswap()
        return a.tolist()
    per = 8 // bits
    mask = (1 << bits) - 1
    return [(byte >> (j * bits)) & mask for byte in data for j in range(per)]


def encode_counts(values: Sequence[int], order: int) -> bytes:
    """Pack counts (len a multiple of 8/bits for sub-byte widths) into bytes."""
    bits = 1 << order
    if bits >= 8:
        a = array(_TYPECODE[bits // 8], values)
        if sys.byteorder == "little" and bits > 8:
            a.byteswap()
        return a.tobytes()
    per = 8 // bits
    out = bytearray(len(values) // per)
    for i, v in enumerate(values):
        if v:
            out[i // per] |= v << ((i % per) * bits)
    return bytes(out)


class Refcounts:
    """The refcount table and a write-through cache of refcount blocks."""

    def __init__(self, f: ImageFile, h: Header) -> None:
        self.f = f
        self.h = h
        self.cs = h.cluster_size
        self.order = h.refcount_order
        self.max_count = (1 << (1 << self.order)) - 1
        self.per_block = self.cs * 8 >> self.order
        self._blocks: dict[int, list[int]] = {}
        self._next_free: int | None = None
        self._free_hint = 0
        # set by the image: clusters known to hold tables, never reused even if counted 0
        self.is_metadata: Callable[[int], bool] = lambda ci: False
        self.freed = 0  # clusters whose count dropped to 0 (compressed packing restarts)
        self.load_table()

    # -- loading ---------------------------------------------------------------------------

    def load_table(self) -> None:
        h = self.h
        raw = self.f.pread(h.refcount_table_offset, h.refcount_table_clusters * self.cs,
                           "refcount table")
        n = len(raw) // 8
        table = list(struct.unpack(f">{n}Q", raw))
        for i, e in enumerate(table):
            if e & ~OFFSET_MASK:
                raise ImageError(f"refcount table entry {i} has reserved bits set ({e:#x})")
            if e and (e % self.cs or e + self.cs > self.f.size):
                raise ImageError(f"refcount block {i} at {e:#x} is unaligned or lies past "
                                 "the end of the file")
        self.table = table
        self._blocks.clear()
        self._free_hint = 0

    def block(self, bi: int) -> list[int] | None:
        """Counts of refcount block `bi` (None if the block is not allocated)."""
        if bi >= len(self.table) or not self.table[bi]:
            return None
        blk = self._blocks.get(bi)
        if blk is None:
            blk = decode_counts(self.f.pread(self.table[bi], self.cs, "refcount block"),
                                self.order)
            self._blocks[bi] = blk
        return blk

    def get(self, ci: int) -> int:
        blk = self.block(ci // self.per_block)
        return 0 if blk is None else blk[ci % self.per_block]

    # -- updates (write-through) -------------------------------------------------------------

    def _write_range(self, bi: int, a: int, b: int) -> None:
        """Write counts [a, b) of block bi to disk (rounded out to whole bytes)."""
        blk = self._blocks[bi]
        bits = 1 << self.order
        if bits < 8:
            per = 8 // bits
            a, b = a - a % per, b + (-b % per)
        self.f.pwrite(self.table[bi] + a * bits // 8, encode_counts(blk[a:b], self.order))

    def update(self, ci: int, n: int, delta: int) -> None:
        """Add `delta` to the counts of clusters [ci, ci+n), block by block."""
        while n > 0:
            bi, k = divmod(ci, self.per_block)
            m = min(n, self.per_block - k)
            blk = self.block(bi)
            if blk is None:
                if delta < 0:
                    raise ImageError(f"refcount of cluster {ci} would drop below zero")
                self._ensure_block(bi)
                blk = self.block(bi)
                assert blk is not None
            for j in range(k, k + m):
                v = blk[j] + delta
                if v < 0:
                    raise ImageError(f"refcount of cluster {bi * self.per_block + j} would "
                                     "drop below zero")
                if v > self.max_count:
                    raise ImageError(f"refcount overflow on cluster {bi * self.per_block + j}"
                                     f" (refcount_bits={1 << self.order})")
                blk[j] = v
                if v == 0:
                    self._free_hint = min(self._free_hint, bi * self.per_block + j)
                    self.freed += 1
            self._write_range(bi, k, k + m)
            ci += m
            n -= m

    def _ensure_block(self, bi: int) -> None:
        """Allocate refcount block `bi` in place (table must have room)."""
        if bi < len(self.table) and self.table[bi]:
            return
        if bi >= len(self.table):
            self.grow(bi)
            if bi < len(self.table) and self.table[bi]:
                return
        r = self.next_free()
        self._next_free = r + self.cs
        rci = r // self.cs
        rbi = rci // self.per_block
        blk = [0] * self.per_block
        if rbi == bi:
            blk[rci % self.per_block] = 1
        else:
            self.update(rci, 1, +1)  # counted by a later block (created first if needed)
        self.f.pwrite(r, encode_counts(blk, self.order))  # block before table entry
        self.f.barrier()
        self.f.pwrite(self.h.refcount_table_offset + bi * 8, struct.pack(">Q", r))
        self.table[bi] = r
        self._blocks[bi] = blk

    def next_free(self) -> int:
        """Host offset of the first cluster past everything in use."""
        if self._next_free is None:
            last = -1
            for bi in range(len(self.table) - 1, -1, -1):
                blk = self.block(bi)
                if blk is None:
                    continue
                nz = [j for j, v in enumerate(blk) if v]
                if nz:
                    last = bi * self.per_block + nz[-1]
                    break
            end = -(-self.f.size // self.cs)
            slack = max(8, CLAIM_SLACK_BYTES // self.cs)
            if last + 1 > end + slack:
                raise ImageError(f"refcounts claim cluster {last} far past the end of the "
                                 f"file ({end} clusters)")
            self._next_free = max(end, last + 1) * self.cs
        return self._next_free

    def _find_free(self, n: int) -> int | None:
        """First run of `n` free clusters (count 0) inside one refcount block, below
        next_free and at or after the hint; None if there is none."""
        end = self.next_free() // self.cs
        ci = self._free_hint
        while ci + n <= end:
            bi, k = divmod(ci, self.per_block)
            blk = self.block(bi)
            limit = min(self.per_block, end - bi * self.per_block)
            if blk is None:
                return None  # not counted at all: stay clear of it
            try:
                j = blk.index(0, k, limit)
            except ValueError:
                ci = (bi + 1) * self.per_block
                continue
            base = bi * self.per_block
            if self.is_metadata(base + j):  # a table whose count is wrong: never reuse
                ci = base + j + 1
                continue
            m = 1
            while m < n and j + m < limit and blk[j + m] == 0 \
                    and not self.is_metadata(base + j + m):
                m += 1
            if m == n:
                return base + j
            ci = base + j + m
        self._free_hint = max(self._free_hint, min(ci, end))
        return None

    def alloc(self, n: int) -> int:
        """Allocate `n` contiguous clusters with count 1; return the host offset.

        Free clusters (count 0, e.g. released by copy-on-write or discard) are reused
        first; otherwise the file grows at next_free."""
        ci = self._find_free(n)
        if ci is not None:
            self._free_hint = ci + n
            self.update(ci, n, +1)
            return ci * self.cs
        off = self.next_free()
        self._next_free = off + n * self.cs
        last_bi = (off // self.cs + n - 1) // self.per_block
        if last_bi >= len(self.table):
            self.grow(last_bi)
        self.update(off // self.cs, n, +1)
        return off

    def grow(self, need_bi: int) -> None:
        """Move to a larger refcount table (copying every count); atomic header switch."""
        ncl = max(need_bi + 1, len(self.table)) * self.per_block
        counts = array("q", bytes(8 * ncl))
        for bi in range(len(self.table)):
            blk = self.block(bi)
            if blk is not None:
                counts[bi * self.per_block:(bi + 1) * self.per_block] = array("q", blk)
        # the old structure is freed by the switch
        t0 = self.h.refcount_table_offset // self.cs
        for c in range(t0, t0 + self.h.refcount_table_clusters):
            counts[c] -= 1
        for e in self.table:
            if e:
                counts[e // self.cs] -= 1
        start = self.next_free() // self.cs
        self.commit_structure(counts, start)

    def commit_structure(self, counts: array[int], start: int) -> None:
        """Write a new structure for `counts` at cluster `start`, switch to it, reload."""
        off, tc, end = write_structure(self.f, self.h, counts, start)
        self.h.refcount_table_offset = off
        self.h.refcount_table_clusters = tc
        self.f.barrier()
        self.f.pwrite(36, self.h.pack_pointers())  # the atomic switch
        self.f.barrier()
        self.load_table()
        self._next_free = end * self.cs


def write_structure(f: ImageFile, h: Header, counts: array[int],
                    start: int) -> tuple[int, int, int]:
    """Write refcount blocks and a table for `counts` at clusters >= `start`.

    `counts[i]` is the wanted count of host cluster i (clusters past the array are free);
    the new blocks and table count themselves. Nothing written here is referenced until
    the caller commits the returned (table_offset, table_clusters) to the header. Returns
    also the first cluster index past the new structure.
    """
    cs = h.cluster_size
    order = h.refcount_order
    per = cs * 8 >> order
    maxc = (1 << (1 << order)) - 1
    used: set[int] = set()
    for i in range(0, len(counts), per):
        chunk = counts[i:i + per]
        if any(chunk):
            if max(chunk) > maxc:
                raise ImageError(f"refcount overflow (refcount_bits={1 << order})")
            if min(chunk) < 0:
                raise ImageError("refcount below zero")
            used.add(i // per)
    nbl, tc = 0, 1
    while True:
        end = start + nbl + tc
        idx = used | set(range(start // per, (end - 1) // per + 1))
        entries = max(idx) + 1
        tc_new = max(1, math.ceil(entries * 2 * 8 / cs))
        if tc_new * cs > MAX_REFTABLE_BYTES:
            raise ImageError("refcount table would exceed its maximum size")
        if len(idx) == nbl and tc_new == tc:
            break
        nbl, tc = len(idx), tc_new
    order_idx = sorted(idx)
    block_at = {bi: start + j for j, bi in enumerate(order_idx)}
    table_at = start + nbl
    extra = dict.fromkeys(range(start, start + nbl + tc), 1)
    for bi in order_idx:
        vals = list(counts[bi * per:(bi + 1) * per])
        vals += [0] * (per - len(vals))
        for c, v in extra.items():
            if bi * per <= c < (bi + 1) * per:
                vals[c - bi * per] = v
        f.pwrite(block_at[bi] * cs, encode_counts(vals, order))
    table = [0] * (tc * cs // 8)
    for bi, c in block_at.items():
        table[bi] = c * cs
    f.pwrite(table_at * cs, struct.pack(f">{len(table)}Q", *table))
    return table_at * cs, tc, start + nbl + tc
