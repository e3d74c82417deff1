"""RAM pages in the stream: PAGES records, zero pages as markers.

Design: a PAGES record is

    u32 count | count x u64 entry | the non-zero pages' bytes, in entry order

where entry = pfn << 1 | zero (bit 0 set: the page is all zeros and no bytes follow).
`PageReader` reads pages of a machine's RAM by frame number (`pack` makes records of at
most BATCH pages from a list of frames); `apply_record` checks a record against the
destination's RAM and writes it.

Invariants: `apply_record` checks the whole record (count, sizes, every frame inside
RAM) before writing any page, so a bad record changes nothing. A zero page is written
as zeros (the destination's RAM is not assumed clean: the kernel image was loaded).
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable, Iterable, Iterator

from pyhv.memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory
from pyhv.migration.stream import MigrationError

BATCH = 256
ZERO = bytes(PAGE_SIZE)
COUNT = struct.Struct("<I")


class PageReader:
    """Page frames -> their bytes, for one machine's RAM regions."""

    def __init__(self, memory: GuestMemory) -> None:
        self.regions = sorted(memory.regions, key=lambda r: r.gpa)
        self.starts = [r.gpa >> PAGE_SHIFT for r in self.regions]

    def view(self, pfn: int) -> memoryview:
        i = bisect.bisect_right(self.starts, pfn) - 1
        if i < 0:
            raise MigrationError(f"page frame {pfn:#x} is outside RAM")
        r = self.regions[i]
        off = (pfn - self.starts[i]) << PAGE_SHIFT
        if off >= r.size:
            raise MigrationError(f"page frame {pfn:#x} is outside RAM")
        return r.view[off:off + PAGE_SIZE]

    def frames(self) -> list[int]:
        return [pfn for r, s in zip(self.regions, self.starts, strict=True)
                for pfn in range(s, s + (r.size >> PAGE_SHIFT))]

    def pack(self, pfns: Iterable[int], on_page: Callable[[int, bytes], None] | None = None
             ) -> Iterator[tuple[bytes, int, int]]:
        """PAGES payloads for `pfns`: (payload, pages, zero pages) per record;
        `on_page(pfn, data)` sees each page's bytes as they go into a record."""
        batch: list[int] = []
        for pfn in pfns:
            batch.append(pfn)
            if len(batch) == BATCH:
                yield self._record(batch, on_page)
                batch = []
        if batch:
            yield self._record(batch, on_page)

    def _record(self, batch: list[int], on_page: Callable[[int, bytes], None] | None
                ) -> tuple[bytes, int, int]:
        entries = []
        data = []
        zeros = 0
        for pfn in batch:
            page = bytes(self.view(pfn))
            if on_page is not None:
                on_page(pfn, page)
            if page == ZERO:
                entries.append(pfn << 1 | 1)
                zeros += 1
            else:
                entries.append(pfn << 1)
                data.append(page)
        head = COUNT.pack(len(batch)) + struct.pack(f"<{len(batch)}Q", *entries)
        return head + b"".join(data), len(batch), zeros


def apply_record(reader: PageReader, payload: bytes) -> int:
    """Write one PAGES record into RAM; returns the pages written."""
    if len(payload) < COUNT.size:
        raise MigrationError("a PAGES record shorter than its count")
    count: int = COUNT.unpack_from(payload)[0]
    if not 1 <= count <= BATCH or len(payload) < COUNT.size + 8 * count:
        raise MigrationError(f"a PAGES record with a bad count ({count})")
    entries = struct.unpack_from(f"<{count}Q", payload, COUNT.size)
    data_pages = sum(1 for e in entries if not e & 1)
    if len(payload) != COUNT.size + 8 * count + data_pages * PAGE_SIZE:
        raise MigrationError(f"a PAGES record of {len(payload)} bytes does not hold its "
                             f"{data_pages} data pages")
    views = [reader.view(e >> 1) for e in entries]       # every frame checked first
    at = COUNT.size + 8 * count
    for e, view in zip(entries, views, strict=True):
        if e & 1:
            view[:] = ZERO
        else:
            view[:] = payload[at:at + PAGE_SIZE]
            at += PAGE_SIZE
    return count
