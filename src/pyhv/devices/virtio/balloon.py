"""virtio-balloon (virtio 1.1, 5.5 "Traditional Memory Balloon Device"): the host asks
the guest to give memory back, and gets it.

Configuration space (little-endian): num_pages u32 at 0 (the host's target: how many
4 KiB pages the guest should hand over, written by pyhv), actual u32 at 4 (how many it
holds, written by the driver). Queues: 0 inflateq, 1 deflateq, 2 statsq (feature
STATS_VQ). Features offered: STATS_VQ only (not MUST_TELL_HOST: a deflated page is the
guest's again at once; not DEFLATE_ON_OOM: Linux then takes the inflated pages out of
MemTotal, so the guest's own view shows the balloon).

Inflate: each buffer is an array of u32 page frame numbers (4 KiB pages, whatever the
host's page size). The device gives every such page back to the host kernel with
madvise(MADV_DONTNEED) on guest RAM's mapping (runs of contiguous frames in one call):
it leaves the process's RSS at once, and reads as zeros if the guest touches it again.
Deflate: the frames are the guest's again; nothing to do (they fault back in on use).
Stats: the driver keeps one buffer of {tag u16, value u64} entries on statsq; the device
keeps it, and to refresh the guest's view it returns it (`request_stats`), the driver
refills it and makes it available again; the last entries read are `guest_stats`.

Hostile drivers: a frame outside guest RAM (or past MAX_PFNS) is counted and skipped,
never madvised; a buffer with a partial entry has the remainder ignored; nothing here
can touch host memory outside guest RAM (GuestMemory bounds-checks). The inflated set
(`held`) is the device's record of the frames the guest says it gave up; `actual` is
the driver's claim, reported as is.

State record (`save_device`/`read_device`, pyhv.devices.state through the transport):
target and actual (the configuration space), the held frames as sorted runs
[first frame, count] (at most MAX_RUNS runs, each inside guest RAM: a hostile record
cannot make the list unbounded or name host memory), the counters, the last statistics
(at most MAX_STATS entries) and the head of the statistics buffer the device keeps (so
`request_stats` after a restore returns it to the driver, as it would have). The held
pages need no RAM of their own: they read as zeros in the saved RAM, as the guest
expects of them.

Threading: `set_target` and `request_stats` may be called from any thread; they post
to the run-loop thread (`post` given at construction: machine.deferred.post).
"""

from __future__ import annotations

import mmap
import struct
import threading
from collections.abc import Callable
from typing import Any

from pyhv.devices.state import U32, Reader
from pyhv.devices.virtio.device import VirtioContext, VirtioDevice
from pyhv.devices.virtio.queue import read_buffers
from pyhv.errors import GuestMemoryError
from pyhv.memory import GuestMemory

PAGE = 4096                    # the balloon's page, VIRTIO_BALLOON_PFN_SHIFT 12
F_STATS_VQ = 1 << 1
QUEUE_SIZE = 128
INFLATE, DEFLATE, STATS = 0, 1, 2
MAX_BUFFER = 256 * 4 * 64      # bytes of frame numbers read from one chain
STAT_NAMES = {0: "swap_in", 1: "swap_out", 2: "major_faults", 3: "minor_faults",
              4: "free_memory", 5: "total_memory", 6: "available_memory",
              7: "disk_caches", 8: "hugetlb_allocations", 9: "hugetlb_failures"}
_STAT = struct.Struct("<HQ")
MAX_STATS = 64                 # entries of one statistics buffer (as _take_stats reads)
MAX_RUNS = 1 << 16             # runs of held frames in a record


class VirtioBalloon(VirtioDevice):
    device_type = 5
    pci_class = 0xFF0000
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)
    features = F_STATS_VQ
    name = "virtio-balloon"

    def __init__(self, post: Callable[[Callable[[], None]], None] | None = None) -> None:
        super().__init__()
        self.config = bytearray(8)
        self._post = post
        self.ctx: VirtioContext | None = None
        self.held: set[int] = set()          # frames the guest inflated
        self.inflated = self.deflated = self.bad_frames = 0
        self.guest_stats: dict[str, int] = {}
        self.stats_updates = 0
        self._stats_head: int | None = None
        self._lock = threading.Lock()        # guest_stats read by other threads

    # ------------------------------------------------------------------ host side

    @property
    def target_pages(self) -> int:
        return int.from_bytes(self.config[0:4], "little")

    @property
    def actual_pages(self) -> int:
        return int.from_bytes(self.config[4:8], "little")

    def set_target(self, pages: int) -> None:
        """Ask the guest to hold `pages` 4 KiB pages in the balloon (any thread)."""
        if not 0 <= pages < 1 << 32:
            raise ValueError(f"balloon target {pages} pages is out of range")

        def apply() -> None:
            self.config[0:4] = pages.to_bytes(4, "little")
            if self.ctx is not None:
                self.ctx.config_changed()
        if self._post is None:
            apply()
        else:
            self._post(apply)

    def request_stats(self) -> None:
        """Ask the driver for fresh memory statistics (any thread)."""
        def apply() -> None:
            if self.ctx is not None and self._stats_head is not None:
                head, self._stats_head = self._stats_head, None
                self.ctx.complete(STATS, head, 0)
        if self._post is None:
            apply()
        else:
            self._post(apply)

    def report(self) -> dict[str, object]:
        with self._lock:
            stats = dict(self.guest_stats)
        return {"target_pages": self.target_pages, "actual_pages": self.actual_pages,
                "held_pages": len(self.held), "inflated": self.inflated,
                "deflated": self.deflated, "bad_frames": self.bad_frames,
                "guest_stats": stats, "stats_updates": self.stats_updates}

    # ------------------------------------------------------------------ device side

    def config_write(self, offset: int, data: bytes) -> None:
        if offset >= 4 and offset + len(data) <= 8:       # only `actual` is the driver's
            self.config[offset:offset + len(data)] = data

    def activate(self, ctx: VirtioContext) -> None:
        """Serve what the driver queued before DRIVER_OK too: Linux primes the stats
        queue with its first report and kicks it during probe, before DRIVER_OK (a
        notify the transport ignores)."""
        self.ctx = ctx
        for i in range(len(self.queue_sizes)):
            if ctx.queue(i).enabled:
                self.queue_notify(i)

    def queue_notify(self, index: int) -> None:
        ctx = self.ctx
        if ctx is None:
            return
        while (chain := ctx.pop(index)) is not None:
            if index == STATS:
                self._take_stats(ctx.memory, chain.readable)
                self._stats_head = chain.head
                continue
            raw = read_buffers(ctx.memory, chain.readable, MAX_BUFFER)
            pfns = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw) - 3, 4)]
            if index == INFLATE:
                self._inflate(ctx.memory, pfns)
            else:
                self.deflated += len(pfns)
                self.held.difference_update(pfns)
            ctx.complete(index, chain.head, 0)

    def _take_stats(self, memory: GuestMemory, bufs: list[tuple[int, int]]) -> None:
        raw = read_buffers(memory, bufs, _STAT.size * 64)
        stats = {}
        for off in range(0, len(raw) - _STAT.size + 1, _STAT.size):
            tag, value = _STAT.unpack_from(raw, off)
            stats[STAT_NAMES.get(tag, f"tag{tag}")] = value
        with self._lock:
            self.guest_stats = stats
        self.stats_updates += 1

    def _inflate(self, memory: GuestMemory, pfns: list[int]) -> None:
        """madvise(DONTNEED) each run of contiguous frames inside guest RAM."""
        frames = set(pfns)
        valid = sorted(p for p in frames if memory.contains(p * PAGE, PAGE))
        self.bad_frames += len(frames) - len(valid)
        self.inflated += len(pfns)
        i = 0
        while i < len(valid):
            j = i + 1
            while j < len(valid) and valid[j] == valid[j - 1] + 1:
                j += 1
            self._discard(memory, valid[i] * PAGE, (j - i) * PAGE)
            i = j

    def _discard(self, memory: GuestMemory, gpa: int, size: int) -> None:
        try:
            region = memory.region_of(gpa, size)
        except GuestMemoryError:                   # a run across two regions: page by page
            for a in range(gpa, gpa + size, PAGE):
                self._discard(memory, a, PAGE)
            return
        off = gpa - region.gpa
        # the host's page may be larger than the balloon's: only whole host pages go
        lo = -(-off // mmap.PAGESIZE) * mmap.PAGESIZE
        hi = (off + size) // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo:
            region.advise(mmap.MADV_DONTNEED, lo, hi - lo)
        self.held.update(range(gpa // PAGE, (gpa + size) // PAGE))

    def reset(self) -> None:
        self.ctx = None
        self._stats_head = None
        self.config[4:8] = bytes(4)

    # ------------------------------------------------------------------ state record

    def save_device(self) -> dict[str, Any]:
        with self._lock:
            stats = dict(self.guest_stats)
        return {"target": self.target_pages, "actual": self.actual_pages,
                "held": _runs(self.held), "inflated": self.inflated,
                "deflated": self.deflated, "bad_frames": self.bad_frames,
                "stats": stats, "stats_updates": self.stats_updates,
                "stats_head": self._stats_head}

    def read_device(self, r: Reader, memory: GuestMemory) -> Callable[[], None]:
        target, actual = r.int("target", 0, U32), r.int("actual", 0, U32)
        raw = r.subs_list("held", max_len=MAX_RUNS)
        held: set[int] = set()
        for i, run in enumerate(raw):
            if not (isinstance(run, list) and len(run) == 2
                    and all(type(x) is int for x in run) and run[0] >= 0 and run[1] > 0
                    and memory.contains(run[0] * PAGE, run[1] * PAGE)):
                raise r.fail("held", f"[{i}] is not a [frame, count] run inside guest RAM")
            held.update(range(run[0], run[0] + run[1]))
        counters = {k: r.int(k) for k in ("inflated", "deflated", "bad_frames",
                                           "stats_updates")}
        sr = r.sub("stats")
        names = sr.keys()
        if len(names) > MAX_STATS:
            raise r.fail("stats", f"has more than {MAX_STATS} entries")
        stats = {str(k): sr.int(k) for k in names}
        sr.done()
        head = r.opt_int("stats_head", 0, QUEUE_SIZE - 1)
        r.done()

        def take() -> None:
            self.config[0:4] = target.to_bytes(4, "little")
            self.config[4:8] = actual.to_bytes(4, "little")
            self.held = held
            self.inflated, self.deflated = counters["inflated"], counters["deflated"]
            self.bad_frames = counters["bad_frames"]
            self.stats_updates = counters["stats_updates"]
            with self._lock:
                self.guest_stats = stats
            self._stats_head = head
        return take


def _runs(frames: set[int]) -> list[list[int]]:
    """Sorted [first, count] runs of `frames`."""
    out: list[list[int]] = []
    for f in sorted(frames):
        if out and out[-1][0] + out[-1][1] == f:
            out[-1][1] += 1
        else:
            out.append([f, 1])
    return out
