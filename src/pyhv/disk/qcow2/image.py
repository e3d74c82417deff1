"""A qcow2 image as a block device: open and validate, read, write, discard, resize.

Address translation (qcow2.txt "Cluster mapping"):

    guest offset --> l1_index = offset / (cluster_size * l2_entries)
                     l2_index = (offset / cluster_size) % l2_entries
    L1[l1_index] --> L2 table (one cluster) --> L2[l2_index] --> host cluster

Write ordering (crash safety: a killed process, a host crash or a power loss at any
point leaves at most leaked clusters, and every guest sector reads as it was at the last
flush or as one of the writes issued since). The disk may persist the writes issued
between two flushes (fdatasync) in any order and any subset, so each rule below is a
flush barrier (`ImageFile.barrier`) between stages, never mere issue order:

  stage 0, issued at once: raised refcounts of new clusters, guest data (into new
           clusters, or in place), new L2 tables (copies, referenced by nothing yet);
  -- barrier --
  stage 1, deferred: the L2 entries and L1 entries pointing at what stage 0 wrote;
  -- barrier --
  stage 2, deferred: lowered refcounts of what the stage-1 writes stopped pointing at
           (copy-on-write, discard, a replaced L2 table).

Discard and zeroing (`_set_entries`, table by table) are stage-1 entry changes and
stage-2 releases like any other. `resize` commits with the header's size write: a grown
area reads zeros on the disk (write-back, barrier) before the size that exposes it; a
shrink's size is durable (barrier) before the cut-off clusters are deallocated.

Stages 1 and 2 are the write-back of dirty table entries (`_writeback`): the in-memory
L1 list and L2 arrays are the truth, the dirty ranges and pending frees say what the
file still lacks. Write-back runs on `flush`, `close`, before any whole-metadata
operation (snapshots, resize, header updates) and when too many tables are dirty, so an
allocating guest write costs no fdatasync of its own (QEMU's writeback cache does the
same). A cluster whose free is pending keeps its count until stage 2, so it cannot be
reused while the file still points at it. The other ordering points: a new refcount
block is durable before the table entry that points to it (refcount.py); a new
refcount table, L1 table or snapshot table (and everything else a whole-metadata rewrite
wrote) is durable before the header write that switches to it, and that switch is
durable before the clusters it released are reused (rewrite.py, refcount.py, `_grow_l1`).

A write to a cluster whose L2 entry has COPIED (refcount 1) goes in place; its refcount
is checked (a COPIED entry whose count is not 1 is corruption, refused). Anything else
(unallocated, zero, compressed, shared with a snapshot) is copied on write into a fresh
cluster; shared L2 tables are copied the same way before their entries change. A guest
cluster thus always reads as entirely before or entirely after a write.

Damaged images are never made worse: `validate()` runs the full check before any
whole-metadata change (snapshots, resize) and refuses an image with corruptions.

The dirty bit and lazy refcounts: pyhv keeps refcounts exact at all times; an image
opened read-write with the dirty bit set (left by QEMU with lazy_refcounts) has its
refcounts rebuilt first, then the bit is cleared. Autoclear bits pyhv does not implement
(bitmaps) are cleared on a read-write open, as the specification requires.

Locking: the file is opened with QEMU's permission locks (lock.py via fileio.py).

Thread safety: one RLock per image serializes every public method.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
from array import array
from collections import Counter, OrderedDict

from pyhv.disk.blockdev import BlockDevice, check_range
from pyhv.disk.lock import Access, access_for
from pyhv.disk.qcow2 import cluster as C
from pyhv.disk.qcow2.compress import compress_cluster, decompress_cluster
from pyhv.disk.qcow2.fileio import ImageFile
from pyhv.disk.qcow2.header import (
    AUTOCLEAR_BITMAPS,
    AUTOCLEAR_DATA_FILE_RAW,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    MAX_VIRTUAL_SIZE,
    l1_entries_needed,
    parse_header,
)
from pyhv.disk.qcow2.refcount import Refcounts
from pyhv.disk.qcow2.snapshot import Snapshot, parse_snapshots
from pyhv.errors import ImageError

L2_CACHE_BYTES = 32 << 20  # L2 tables are kept as array('Q'): 8 bytes an entry
MAX_ZERO_TABLE_BYTES = 1 << 30  # L2 tables a grow over a longer backing file may write


def _be_u64(raw: bytes) -> array[int]:
    a = array("Q", raw)
    if sys.byteorder == "little":
        a.byteswap()
    return a


def _u64_be(a: array[int]) -> bytes:
    if sys.byteorder == "little":
        b = array("Q", a)
        b.byteswap()
        return b.tobytes()
    return a.tobytes()


class Qcow2Image:
    """An open qcow2 file; `backing` is the already-opened backing device, if any."""

    format_name = "qcow2"

    def __init__(self, path: str, *, read_only: bool = False,
                 backing: BlockDevice | None = None, force_share: bool = False,
                 access: Access | None = None, unsafe: bool = False) -> None:
        """Open `path`; `access` overrides QEMU's default permissions (lock.py);
        `unsafe` (QEMU's cache=unsafe) drops the flush barriers, for new outputs only."""
        self.path = path
        self.f = ImageFile(path, read_only, access or access_for(
            "qcow2", read_only=read_only, force_share=force_share))
        self.f.unsafe = unsafe
        self.backing = backing
        self._lock = threading.RLock()
        self._l2_cache: OrderedDict[int, array[int]] = OrderedDict()
        # write-back state (stages 1 and 2, see the module docstring)
        self._dirty_l2: dict[int, tuple[array[int], int, int]] = {}  # off: (table, lo, hi)
        self._dirty_l1: tuple[int, int] | None = None
        self._frees: list[tuple[int, int]] = []  # (first cluster, count) to release
        self._zc: tuple[int, bytes] | None = None  # last decompressed cluster
        self._cpos = 0  # free byte in the last compressed-data cluster (0: none)
        self._cfreed = 0
        try:
            self._load()
            if not read_only:
                self._prepare_for_writes()
        except BaseException:
            self.f.close()
            raise

    # -- opening ---------------------------------------------------------------------------

    def _load(self) -> None:
        fsize = self.f.size
        head = os.pread(self.f.fd, 4096, 0)
        if len(head) >= 24:  # the header cluster may be larger than 4 KiB
            bits = int.from_bytes(head[20:24], "big")
            if 12 < bits <= MAX_CLUSTER_BITS:
                head = os.pread(self.f.fd, 1 << bits, 0)
        h = parse_header(head, fsize)
        self.h = h
        self.cb = h.cluster_bits
        self.cs = h.cluster_size
        self.l2e = h.l2_entries
        self.l1 = self.read_l1(h.l1_table_offset, h.l1_size)
        self.refs = Refcounts(self.f, h)
        self.snapshots: list[Snapshot] = []
        self.snap_table_bytes = 0
        if h.nb_snapshots:
            self.snapshots, self.snap_table_bytes = parse_snapshots(
                self.f.pread, h.snapshots_offset, h.nb_snapshots, self.cs, fsize)
        self._compute_metadata()
        self._l2_cache.clear()
        self._zc = None
        self._cpos = 0

    def _compute_metadata(self) -> None:
        """Clusters holding metadata; they must not overlap, and no L2 table or data
        cluster may point into them (a write would otherwise overwrite a table)."""
        cs, h = self.cs, self.h
        owner: dict[int, str] = {0: "the header"}

        def claim(off: int, nbytes: int, what: str, exclusive: bool = True) -> None:
            for ci in range(off // cs, (off + max(nbytes, 1) - 1) // cs + 1):
                other = owner.get(ci)
                if other is not None and exclusive:
                    raise ImageError(f"{what} at {ci * cs:#x} overlaps {other}")
                owner.setdefault(ci, what)

        claim(h.l1_table_offset, h.l1_size * 8, "the L1 table")
        claim(h.refcount_table_offset, h.refcount_table_clusters * cs, "the refcount table")
        for i, e in enumerate(self.refs.table):
            if e:
                claim(e, cs, f"refcount block {i}")
        if h.nb_snapshots:
            claim(h.snapshots_offset, self.snap_table_bytes, "the snapshot table")
        for sn in self.snapshots:
            if sn.l1_size:
                # a snapshot L1 may coincide with another snapshot's, never with the rest
                for ci in range(sn.l1_table_offset // cs,
                                (sn.l1_table_offset + sn.l1_size * 8 - 1) // cs + 1):
                    other = owner.get(ci)
                    if other is not None and not other.startswith("snapshot"):
                        raise ImageError(f"snapshot {sn.id_str} L1 table overlaps {other}")
                    owner.setdefault(ci, f"snapshot {sn.id_str} L1 table")
        meta = set(owner)
        used = [e for e in self.l1 if e]  # (a huge L1 is mostly empty: skip those fast)
        for e in used:
            off = e & C.OFFSET_MASK
            if off and off // cs in meta:
                raise ImageError(f"L1 entry {self.l1.index(e)}: L2 table at {off:#x} "
                                 f"overlaps metadata ({owner[off // cs]})")
        self.l2_tables = {(e & C.OFFSET_MASK) // cs for e in used if e & C.OFFSET_MASK}
        self.meta = meta
        snap_l2: set[int] = set()
        for sn in self.snapshots:
            if sn.l1_size:
                snap_l2.update((e & C.OFFSET_MASK) // cs
                               for e in self.read_l1(sn.l1_table_offset, sn.l1_size)
                               if e & C.OFFSET_MASK)
        self.snap_l2 = snap_l2
        self.refs.is_metadata = self._is_metadata

    def _is_metadata(self, ci: int) -> bool:
        return ci in self.meta or ci in self.l2_tables or ci in self.snap_l2

    def read_l1(self, offset: int, n: int) -> list[int]:
        raw = self.f.pread(offset, n * 8, "L1 table")
        l1 = list(struct.unpack(f">{n}Q", raw))
        for e in filter(None, l1):
            C.check_l1_entry(l1.index(e), e, self.cs, self.f.size)
        return l1

    def _prepare_for_writes(self) -> None:
        h = self.h
        if h.incompatible_features & INCOMPAT_CORRUPT:
            raise ImageError(f"{self.path} is marked corrupt; repair it with `pyhv img "
                             "check -r all` (or open it read-only)")
        if h.incompatible_features & INCOMPAT_DIRTY:
            from pyhv.disk.qcow2.rewrite import rewrite

            rewrite(self, active_l1=list(self.l1), snapshots=list(self.snapshots),
                    size=self.size)
            h = self.h  # reloaded
            h.incompatible_features &= ~INCOMPAT_DIRTY
            self.write_header()
        if h.autoclear_features & (AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW):
            h.autoclear_features = 0
            self.write_header()

    def write_header(self) -> None:
        """Rewrite cluster 0's header and extensions (not used for atomic commits).

        Everything written before is durable first (the header may switch what the
        image means, e.g. its backing file), and the header is durable after."""
        with self._lock:
            self._writeback()
            self.f.barrier()
            self.f.pwrite(0, self.h.pack())
            self.f.barrier()

    def validate(self) -> None:
        """Refuse to go on with an image that has corruptions (full check).

        Called before every whole-metadata change (snapshots, resize) and by the
        verbs that rewrite an image (commit, rebase): a damaged image is never made
        worse, the user is pointed at the repair."""
        from pyhv.disk.qcow2.check import check

        with self._lock:
            res = check(self)
            # an incomplete snapshot entry is completed by the change itself (QEMU too)
            n = res.corruptions - res.incomplete_snapshots
            if n or res.check_errors:
                first = next((m for m in res.messages if m.startswith("ERROR")
                              and not m.endswith("is incomplete")), "")
                detail = f" (first: {first[6:]})" if first else ""
                raise ImageError(
                    f"{self.path} has {n} corruption(s){detail}; it was not changed. "
                    f"Repair it first: pyhv img check -r all {self.path}")

    # -- block-device API ------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.h.size

    @property
    def read_only(self) -> bool:
        return self.f.read_only

    def _l2(self, off: int) -> array[int]:
        tbl = self._l2_cache.get(off)
        if tbl is not None:
            self._l2_cache.move_to_end(off)
            return tbl
        dirty = self._dirty_l2.get(off)
        if dirty is not None:  # evicted from the cache, but the file lacks its entries
            self._l2_cache[off] = dirty[0]
            return dirty[0]
        tbl = _be_u64(self.f.pread(off, self.cs, "L2 table"))
        fsize, ver, cb, meta = self.f.size, self.h.version, self.cb, self.meta
        l2t = self.l2_tables
        for i, e in enumerate(tbl):
            if e:
                C.check_l2_entry(f"L2 table {off:#x} entry {i}", e, ver, cb, fsize)
                if not e & C.COMPRESSED:
                    d = (e & C.OFFSET_MASK) >> cb
                    if d and (d in meta or d in l2t):
                        raise ImageError(f"L2 table {off:#x} entry {i}: data cluster "
                                         f"{d << cb:#x} overlaps metadata")
        self._l2_cache[off] = tbl
        while len(self._l2_cache) * self.cs > L2_CACHE_BYTES and len(self._l2_cache) > 1:
            self._l2_cache.popitem(last=False)
        return tbl

    def entry(self, gci: int) -> int:
        """The L2 entry of guest cluster `gci` (0 when its L2 table is unallocated)."""
        l1i, l2i = divmod(gci, self.l2e)
        if l1i >= len(self.l1):
            return 0
        off = self.l1[l1i] & C.OFFSET_MASK
        return self._l2(off)[l2i] if off else 0

    def _read_compressed(self, e: int) -> bytes:
        if self._zc is not None and self._zc[0] == e:
            return self._zc[1]
        off, length = C.decode_compressed(e, self.cb)
        length = min(length, self.f.size - off)
        data = decompress_cluster(self.f.pread(off, length, "compressed cluster"), self.cs)
        self._zc = (e, data)
        return data

    def _read_backing(self, out: bytearray, at: int, pos: int, n: int) -> None:
        b = self.backing
        if b is None:
            return
        m = min(n, b.size - pos)
        if m > 0:
            out[at:at + m] = b.read(pos, m)

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            check_range(self.size, offset, length)
            if length:
                kind, n, host = self.block_status(offset, length)
                if kind == "data" and n == length and host is not None \
                        and host + length <= self.f.size:
                    return os.pread(self.f.fd, length, host)  # one contiguous run
            out = bytearray(length)
            self._read_into(out, offset, length)
            return bytes(out)

    def _read_into(self, out: bytearray, offset: int, length: int) -> None:
        cs, cb, mask = self.cs, self.cb, C.OFFSET_MASK
        pos, end = offset, offset + length
        while pos < end:
            gci = pos >> cb
            e = self.entry(gci)
            within = pos & (cs - 1)
            n = min(cs - within, end - pos)
            kind = C.kind_of(e)
            if kind == C.KIND_NORMAL:
                host = (e & mask) + within
                # merge physically contiguous clusters into one pread
                while pos + n < end:
                    e2 = self.entry(gci + 1)
                    if C.kind_of(e2) != C.KIND_NORMAL or (e2 & mask) != host - within + cs:
                        break
                    gci += 1
                    within -= cs
                    n += min(cs, end - pos - n)
                m = max(0, min(n, self.f.size - host))  # past EOF reads as zeros
                if m:
                    at = pos - offset
                    got = os.preadv(self.f.fd, [memoryview(out)[at:at + m]], host)
                    if got != m:
                        raise ImageError(f"short read of data at {host:#x}")
            elif kind == C.KIND_UNALLOCATED:
                while pos + n < end and self.entry(gci + 1) == 0:
                    gci += 1
                    n += min(cs, end - pos - n)
                self._read_backing(out, pos - offset, pos, n)
            elif kind == C.KIND_COMPRESSED:
                data = self._read_compressed(e)
                out[pos - offset:pos - offset + n] = data[within:within + n]
            pos += n

    def _cluster_content(self, gci: int) -> bytearray:
        """The guest's current view of cluster `gci` (zero-padded past the disk's end)."""
        buf = bytearray(self.cs)
        start = gci << self.cb
        n = min(self.cs, self.size - start)
        if n > 0:
            self._read_into(buf, start, n)
        return buf

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        with self._lock:
            if self.read_only:
                raise ImageError(f"{self.path} is open read-only")
            mv = memoryview(data).cast("B")
            check_range(self.size, offset, len(mv))
            span = self.cs * self.l2e
            pos, end = offset, offset + len(mv)
            while pos < end:
                l1i = pos // span
                stop = min(end, (l1i + 1) * span)
                self._write_in_table(l1i, pos, mv[pos - offset:stop - offset])
                pos = stop

    def _l2_for_write(self, l1i: int) -> tuple[array[int], int]:
        e = self.l1[l1i]
        off = e & C.OFFSET_MASK
        if off and e & C.COPIED:
            return self._l2(off), off
        content = array("Q", self._l2(off)) if off else array("Q", bytes(self.cs))
        new = self.refs.alloc(1)  # stage 0: its count,
        self.f.pwrite(new, _u64_be(content))  # stage 0: the copy, referenced by nothing
        self._set_l1(l1i, new | C.COPIED)  # stage 1
        self.l2_tables.add(new >> self.cb)
        if off:
            self._free(off >> self.cb, 1)  # stage 2
            self._l2_cache.pop(off, None)
            self.l2_tables.discard(off >> self.cb)
        self._l2_cache[new] = content
        return content, new

    # -- write-back of dirty table entries (stages 1 and 2) --------------------------------

    def _set_l1(self, l1i: int, e: int) -> None:
        self.l1[l1i] = e
        d = self._dirty_l1
        self._dirty_l1 = (l1i, l1i + 1) if d is None else (min(d[0], l1i), max(d[1], l1i + 1))

    def _dirty(self, l2off: int, tbl: array[int], lo: int, hi: int) -> None:
        d = self._dirty_l2.get(l2off)
        self._dirty_l2[l2off] = (tbl, lo, hi) if d is None else \
            (tbl, min(d[1], lo), max(d[2], hi))

    def _free(self, ci: int, n: int) -> None:
        self._frees.append((ci, n))

    def _release(self, e: int) -> None:
        """Queue the release of what an old L2 entry referenced (after it was replaced)."""
        kind = C.kind_of(e)
        if kind == C.KIND_COMPRESSED:
            r = C.compressed_clusters(e, self.cb)
            self._free(r.start, len(r))
        elif e & C.OFFSET_MASK:
            self._free((e & C.OFFSET_MASK) >> self.cb, 1)

    def _maybe_writeback(self) -> None:
        if len(self._dirty_l2) * self.cs > L2_CACHE_BYTES // 2 or len(self._frees) > 65536:
            self._writeback()

    def _writeback(self) -> None:
        """Barrier, the dirty L2/L1 entries, barrier, the pending refcount decrements."""
        if self._dirty_l2 or self._dirty_l1 is not None:
            self.f.barrier()  # what the entries point at is durable first
            for off in sorted(self._dirty_l2):
                tbl, lo, hi = self._dirty_l2[off]
                self.f.pwrite(off + 8 * lo, _u64_be(tbl[lo:hi]))
            if self._dirty_l1 is not None:
                lo, hi = self._dirty_l1
                self.f.pwrite(self.h.l1_table_offset + 8 * lo,
                              struct.pack(f">{hi - lo}Q", *self.l1[lo:hi]))
            self._dirty_l2.clear()
            self._dirty_l1 = None
        if self._frees:
            self.f.barrier()  # nothing on disk points at these clusters any more
            frees, self._frees = self._frees, []
            per: Counter[int] = Counter()
            for ci, n in frees:
                for c in range(ci, ci + n):
                    per[c] += 1
            run: list[int] = []
            for c in sorted(per):  # runs of clusters released the same number of times
                if run and (c != run[-1] + 1 or per[c] != per[run[0]]):
                    self.refs.update(run[0], len(run), -per[run[0]])
                    run = []
                run.append(c)
            if run:
                self.refs.update(run[0], len(run), -per[run[0]])

    def writeback(self) -> None:
        """Write the deferred table entries and refcount decrements (ordered)."""
        with self._lock:
            if not self.read_only:
                self._writeback()

    def _write_in_table(self, l1i: int, pos: int, data: memoryview) -> None:
        tbl, l2off = self._l2_for_write(l1i)
        cs, cb, mask = self.cs, self.cb, C.OFFSET_MASK
        end = pos + len(data)
        base = pos
        while pos < end:
            gci = pos >> cb
            l2i = gci % self.l2e
            e = tbl[l2i]
            within = pos & (cs - 1)
            if C.kind_of(e) == C.KIND_NORMAL and e & C.COPIED:
                host = (e & mask) + within
                n = min(cs - within, end - pos)
                j = l2i + 1
                while pos + n < end:
                    e2 = tbl[j]
                    if not (C.kind_of(e2) == C.KIND_NORMAL and e2 & C.COPIED
                            and (e2 & mask) == host - within + (j - l2i) * cs):
                        break
                    n += min(cs, end - pos - n)
                    j += 1
                for hc in range(host >> cb, (host + n - 1 >> cb) + 1):
                    rc = self.refs.get(hc)
                    if rc != 1:
                        raise ImageError(
                            f"{self.path}: cluster {hc << cb:#x} is marked for in-place "
                            f"writes (COPIED) but its refcount is {rc}; not written. Repair "
                            f"the image: pyhv img check -r all {self.path}")
                self.f.pwrite(host, data[pos - base:pos - base + n])
                pos += n
                continue
            # copy-on-write / allocation of a run of clusters
            k = 1
            while (pos - within + k * cs) < end and l2i + k < self.l2e:
                e2 = tbl[l2i + k]
                if C.kind_of(e2) == C.KIND_NORMAL and e2 & C.COPIED:
                    break
                k += 1
            run_end = min(end, pos - within + k * cs)
            if not within and run_end - pos == k * cs:  # whole clusters: no merge needed
                host = self.refs.alloc(k)  # 1. refcounts
                self.f.pwrite(host, data[pos - base:run_end - base])  # 2. data
                self._set_run(tbl, l2off, l2i, k, host)  # 3. L2, 4. release
                pos = run_end
                continue
            buf = bytearray(k * cs)
            if within:
                buf[:cs] = self._cluster_content(gci)
            last_gci = gci + k - 1
            tail = run_end & (cs - 1)
            if tail and (last_gci != gci or not within):
                buf[(k - 1) * cs:] = self._cluster_content(last_gci)
            elif tail and last_gci == gci and within:
                pass  # already holds the old content of the single cluster
            buf[within:within + run_end - pos] = data[pos - base:run_end - base]
            host = self.refs.alloc(k)  # 1. refcounts
            self.f.pwrite(host, buf)  # 2. data
            self._set_run(tbl, l2off, l2i, k, host)  # 3. L2, 4. release
            pos = run_end

    def _set_run(self, tbl: array[int], l2off: int, l2i: int, k: int, host: int) -> None:
        """Point entries l2i..l2i+k at new clusters from `host`, then release the old."""
        old = tbl[l2i:l2i + k]
        tbl[l2i:l2i + k] = array("Q", [(host + i * self.cs) | C.COPIED for i in range(k)])
        self._dirty(l2off, tbl, l2i, l2i + k)  # stage 1: the L2 entries
        for oe in old:  # stage 2: release what the old entries held
            if oe:
                self._release(oe)
        self._maybe_writeback()

    def flush(self) -> None:
        """Every completed write durable: write-back (ordered), then fdatasync."""
        with self._lock:
            if not self.read_only:
                self._writeback()
                self.f.barrier()

    def discard(self, offset: int, length: int) -> None:
        """Deallocate the whole clusters inside the range (partial clusters are kept)."""
        with self._lock:
            if self.read_only:
                raise ImageError(f"{self.path} is open read-only")
            check_range(self.size, offset, length)
            if self.backing is not None and self.h.version < 3:
                return  # v2 cannot express "zeros over a backing file"
            first, last = self._whole_clusters(offset, length)
            self._set_entries(first, last, C.ZERO if self.backing is not None else 0)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zeros: zero clusters (v3) or deallocation (v2 without
        a backing file) for whole clusters, written zeros for the partial ones."""
        with self._lock:
            if self.read_only:
                raise ImageError(f"{self.path} is open read-only")
            check_range(self.size, offset, length)
            first, last = self._whole_clusters(offset, length)
            if first >= last:
                self.write(offset, bytes(length))
                return
            head = min(first << self.cb, offset + length) - offset
            if head:
                self.write(offset, bytes(head))
            tail_at = min(last << self.cb, self.size)
            if tail_at < offset + length:
                self.write(tail_at, bytes(offset + length - tail_at))
            if self.h.version >= 3:
                self._set_entries(first, last, C.ZERO)
            elif not self.h.backing_file:
                self._set_entries(first, last, 0)
            else:  # v2 over a backing file: only data clusters read as zeros
                pos, stop = first << self.cb, tail_at
                while pos < stop:
                    n = min(4 << 20, stop - pos)
                    self.write(pos, bytes(n))
                    pos += n

    def _whole_clusters(self, offset: int, length: int) -> tuple[int, int]:
        """Guest clusters [first, last) inside the range; the disk's last cluster counts
        as whole when the range reaches the disk's end."""
        cs = self.cs
        first = -(-offset // cs)
        last = (offset + length) // cs
        if offset + length == self.size:
            last = -(-self.size // cs)
        return first, max(first, last)

    def _set_entries(self, first: int, last: int, new_e: int) -> None:
        """Set the L2 entries of guest clusters [first, last) to `new_e` (0 or ZERO).

        Table by table: a table with nothing to change is left alone (absent ones are
        skipped a block of L1 entries at a time when `new_e` is 0, so the cost follows
        the allocated tables). The entries are stage-1 changes and the old references'
        releases stage-2 ones, written back in that order behind barriers (`_writeback`),
        as for any other write."""
        gci = first
        while gci < last:
            l1i, l2i = divmod(gci, self.l2e)
            n = min(last, (l1i + 1) * self.l2e) - gci
            gci += n
            off = self.l1[l1i] & C.OFFSET_MASK
            if not off:
                if not new_e:
                    gci = max(gci, self._next_l1_used(l1i + 1, last) * self.l2e)
                    continue
            elif self._l2(off)[l2i:l2i + n].count(new_e) == n:
                continue
            tbl, l2off = self._l2_for_write(l1i)
            old = tbl[l2i:l2i + n]
            tbl[l2i:l2i + n] = array("Q", [new_e]) * n
            self._dirty(l2off, tbl, l2i, l2i + n)  # stage 1: the entries,
            for oe in old:
                if oe:
                    self._release(oe)  # stage 2: what they referenced
            self._maybe_writeback()

    def write_compressed(self, gci: int, data: bytes) -> bool:
        """Store one whole guest cluster compressed (for convert -c) into an unallocated
        cluster; returns False (nothing written) if it does not compress."""
        with self._lock:
            if self.entry(gci) != 0:
                raise ImageError("compressed writes need an unallocated cluster")
            stream = compress_cluster(bytes(data).ljust(self.cs, b"\0"))
            if stream is None:
                return False
            l1i, l2i = divmod(gci, self.l2e)
            tbl, l2off = self._l2_for_write(l1i)
            cs = self.cs
            if self.refs.freed != self._cfreed:  # the packing cluster may have been freed
                self._cpos, self._cfreed = 0, self.refs.freed
            pack = bool(self._cpos % cs) and (self._cpos % cs) + len(stream) <= cs
            if pack and self.refs.get(self._cpos >> self.cb) >= self.refs.max_count:
                pack = False  # narrow refcounts: a saturated cluster takes no more streams
            if pack:
                off = self._cpos
                self.refs.update(off >> self.cb, 1, +1)
            else:
                off = self.refs.alloc(1)
            self.f.pwrite(off, stream)  # stage 0
            self._cpos = off + len(stream)
            tbl[l2i] = C.encode_compressed(off, len(stream), self.cb)
            self._dirty(l2off, tbl, l2i, l2i + 1)  # stage 1
            self._maybe_writeback()
            return True

    # -- allocation status (map, convert, commit) ------------------------------------------

    def block_status(self, offset: int, length: int) -> tuple[str, int, int | None]:
        """(kind, length, host offset) of the run starting at `offset`.

        kind is "data", "zero", "compressed" or "unallocated"; the run stays in one kind
        and, for data, in physically contiguous clusters. The walk skips whole L2 spans
        whose L1 entry is empty, so its cost follows the allocated metadata, not the
        length asked for."""
        with self._lock:
            cs, cb, l2e, mask = self.cs, self.cb, self.l2e, C.OFFSET_MASK
            end = offset + length
            gci = offset >> cb
            e = self.entry(gci)
            kind = C.kind_of(e)
            host = (e & mask) + (offset & (cs - 1)) if kind == C.KIND_NORMAL else None
            expect = (e & mask) + cs  # the next host cluster of a contiguous data run
            ci = gci + 1  # first guest cluster not yet known to extend the run
            stop = -(-end // cs)
            while ci < stop:
                l1i, l2i = divmod(ci, l2e)
                span_end = min(stop, (l1i + 1) * l2e)
                off = self.l1[l1i] & mask if l1i < len(self.l1) else 0
                if not off:
                    if kind != C.KIND_UNALLOCATED:
                        break
                    ci = max(span_end, self._next_l1_used(l1i + 1, stop) * l2e)
                    continue
                tbl = self._l2(off)
                j, jend = l2i, l2i + (span_end - ci)
                if kind == C.KIND_NORMAL:
                    while j < jend:
                        e2 = tbl[j]
                        if C.kind_of(e2) != C.KIND_NORMAL or (e2 & mask) != expect:
                            break
                        expect += cs
                        j += 1
                elif kind == C.KIND_UNALLOCATED:
                    while j < jend and not tbl[j] & ~C.COPIED:  # (validated entries)
                        j += 1
                else:
                    while j < jend and C.kind_of(tbl[j]) == kind:
                        j += 1
                ci += j - l2i
                if j < jend:
                    break
            n = min(ci << cb, end) - offset
            names = {C.KIND_NORMAL: "data", C.KIND_ZERO: "zero",
                     C.KIND_COMPRESSED: "compressed", C.KIND_UNALLOCATED: "unallocated"}
            return names[kind], n, host

    def _next_l1_used(self, l1i: int, stop_cluster: int) -> int:
        """The first L1 index >= l1i that has an entry, else the index that maps
        `stop_cluster`; empty stretches are skipped a block at a time (in C)."""
        end = -(-stop_cluster // self.l2e)
        lim = min(len(self.l1), end)
        while l1i < lim:
            blk = self.l1[l1i:min(lim, l1i + 4096)]
            if blk.count(0) == len(blk):
                l1i += len(blk)
                continue
            return l1i + next(k for k, e in enumerate(blk) if e)
        return end

    # -- resize ----------------------------------------------------------------------------

    def resize(self, new_size: int, *, shrink: bool = False) -> None:
        """Grow or (with shrink=True) shrink the virtual disk, as QEMU's qcow2 driver does.

        The header's size write is the commit point, in both directions:
        - growing makes the whole new area read as zeros before the new size is
          written (write-back, then a barrier; `_commit_size`): over a backing file
          longer than the old size, zero clusters (the unaligned head as explicit zeros,
          as qemu-img writes them; a v2 image has none, so that grow is refused, as
          qemu-img refuses it); otherwise whatever the file still maps past the old end
          (the cut-off part of the last cluster, entries an interrupted shrink left) is
          zeroed or deallocated. A crash before the size write leaves the old size.
        - shrinking writes the smaller size first (durable, a barrier), then deallocates
          the cut-off clusters and zeroes the cut-off part of the last cluster, none of
          which the guest can see any more. A crash leaves the old size unchanged or the
          new one, never a tail that reads as neither.
        So a later grow never brings cut-off data back."""
        with self._lock:
            if self.read_only:
                raise ImageError(f"{self.path} is open read-only")
            if self.snapshots and self.h.version < 3 and new_size != self.size:
                # v2 snapshots need not record their disk size: QEMU refuses too
                raise ImageError("Can't resize a v2 image which has snapshots")
            if new_size % 512:
                raise ImageError("the new size must be a multiple of 512")
            self.validate()
            need = l1_entries_needed(new_size, self.cb)
            if new_size > MAX_VIRTUAL_SIZE or need * 8 > MAX_L1_BYTES:
                raise ImageError(f"size {new_size} too large for {self.cs}-byte clusters")
            old_size = self.size
            if new_size < old_size:
                if not shrink:
                    raise ImageError("shrinking needs --shrink (data past the new end is lost)")
                self._shrink(new_size)  # (v3 snapshots keep their own size)
                return
            if new_size == old_size:
                return
            zero = self.backing is not None and self.backing.size > old_size
            if zero and self.h.version < 3:
                raise ImageError("cannot zero the grown area: a version 2 (compat=0.10) "
                                 "image has no zero clusters and its backing file is longer "
                                 "than the image (as qemu-img)")
            span = self.cs * self.l2e
            tables = -(-new_size // span) - old_size // span
            if zero and tables * self.cs > MAX_ZERO_TABLE_BYTES:
                raise ImageError(f"growing to {new_size} bytes over a longer backing file "
                                 f"needs {tables} L2 tables of zero clusters; refusing "
                                 f"more than {MAX_ZERO_TABLE_BYTES >> 20} MiB of them")
            if need > self.h.l1_size:
                self._grow_l1(need)
            self.h.size = new_size  # in memory only until the new area reads zeros
            try:
                if zero:
                    self.write_zeroes(old_size, new_size - old_size)
                else:
                    self._clear_past(old_size, new_size)
            except BaseException:
                self.h.size = old_size
                raise
            self._commit_size(new_size)

    def _clear_past(self, old_size: int, new_size: int) -> None:
        """Make [old_size, new_size) read as zeros where the file still maps anything:
        the part of the old end's cluster past it, and entries past it that a shrink
        interrupted before its deallocation left. (Nothing is read from a backing file
        here: it is not longer than old_size.)"""
        cs, cb = self.cs, self.cb
        cut = -(-old_size // cs)
        if old_size % cs and C.kind_of(self.entry(old_size >> cb)) in (C.KIND_NORMAL,
                                                                      C.KIND_COMPRESSED):
            self.write(old_size, bytes(min(cut << cb, new_size) - old_size))
        self._set_entries(cut, -(-new_size // cs), 0)

    def _shrink(self, new_size: int) -> None:
        old_size = self.size
        self._commit_size(new_size)
        self.f.barrier()  # the smaller size is durable before anything past it changes
        cs, cb = self.cs, self.cb
        self._set_entries(-(-new_size // cs), -(-old_size // cs), 0)  # plain deallocation
        if new_size % cs and C.kind_of(self.entry(new_size >> cb)) in (C.KIND_NORMAL,
                                                                      C.KIND_COMPRESSED):
            # the cut-off part of the last cluster, now past the end: zeroed, so that a
            # later grow by another tool (qemu-img does not zero it) cannot bring it back
            l1i = (new_size >> cb) // self.l2e
            self._write_in_table(l1i, new_size, memoryview(bytes(cs - new_size % cs)))

    def _commit_size(self, new_size: int) -> None:
        """Write the new virtual size into the header, once everything before it is
        durable (write-back, then a barrier): for a grow, the zeros of the new area."""
        self._writeback()
        self.f.barrier()
        self.h.size = new_size
        self.f.pwrite(24, struct.pack(">Q", new_size))

    def _grow_l1(self, need: int) -> None:
        """Move to a larger L1 table (the header switch keeps the old virtual size).

        Pending entries are written back first (the copy is taken from the in-memory
        table, the truth); the new table is durable before the header names it, and the
        switch is durable before the old table's clusters are released."""
        self._writeback()
        old_l1_off, old_l1_n = self.h.l1_table_offset, self.h.l1_size
        nbytes = need * 8
        ncl = -(-nbytes // self.cs)
        new_off = self.refs.alloc(ncl)
        tbl = self.l1 + [0] * (need - len(self.l1))
        self.f.pwrite(new_off, struct.pack(f">{need}Q", *tbl).ljust(ncl * self.cs, b"\0"))
        self.f.barrier()
        self.h.l1_table_offset, self.h.l1_size = new_off, need
        self.f.pwrite(24, struct.pack(">QI", self.h.size, 0) + self.h.pack_pointers())
        self.f.barrier()
        self.l1 = tbl
        self.refs.update(old_l1_off >> self.cb, -(-old_l1_n * 8 // self.cs), -1)
        self._compute_metadata()

    # -- snapshots -------------------------------------------------------------------------

    def snapshot_create(self, name: str) -> Snapshot:
        from pyhv.disk.qcow2 import snapshot

        with self._lock:
            self._need_rw()
            self.validate()
            return snapshot.create(self, name)

    def snapshot_apply(self, key: str) -> None:
        from pyhv.disk.qcow2 import snapshot

        with self._lock:
            self._need_rw()
            self.validate()
            snapshot.apply(self, key)

    def snapshot_delete(self, key: str) -> None:
        from pyhv.disk.qcow2 import snapshot

        with self._lock:
            self._need_rw()
            self.validate()
            snapshot.delete(self, key)

    def _need_rw(self) -> None:
        if self.read_only:
            raise ImageError(f"{self.path} is open read-only")

    def reload(self) -> None:
        """Re-read all metadata from the file (after a whole-metadata rewrite, which
        wrote back everything pending first)."""
        with self._lock:
            self.f.size = os.fstat(self.f.fd).st_size
            self._dirty_l2.clear()
            self._dirty_l1 = None
            self._frees = []
            self._load()

    def close(self) -> None:
        """Write back and flush (as QEMU does on close), then release the file."""
        with self._lock:
            try:
                if not self.read_only and self.f.fd >= 0:
                    self._writeback()
                    self.f.barrier()
            finally:
                if self.backing is not None:
                    self.backing.close()
                    self.backing = None
                self.f.close()

    def __enter__(self) -> Qcow2Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
