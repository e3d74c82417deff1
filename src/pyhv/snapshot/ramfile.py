"""Guest RAM as a sparse file: written without its zero pages, checked, read back.

Design: the file holds guest-physical address A at file offset A (regions above the
PCI hole leave a hole in the file, which costs nothing), so a region maps from the file
at offset = its gpa (`GuestMemory.with_layout(..., backing=path)`, copy-on-write).
Zero pages are never written: the file is truncated to its full length first and only
runs of non-zero pages are written, so an idle guest's file is mostly holes.

The checksum is defined on the content, not on how the filesystem stores it: SHA-256
over every non-zero page in address order, each as its page number (8 bytes, little
endian) followed by its 4096 bytes. Writing computes it from the pages it writes;
checking reads only the file's data extents (SEEK_DATA/SEEK_HOLE) and hashes the
non-zero pages in them, so checking costs the guest's used memory, not its RAM size,
and any changed, zeroed or added page changes the checksum.

The quick check (`extent_digest`, what `pyhv run --restore` checks by default): SHA-256
of the file's size and its data extents as the filesystem reports them (SEEK_DATA/
SEEK_HOLE), recorded after the file was written. It costs a few lseeks per extent, not
a read of the guest's used memory, and catches a truncated or extended file, a page
zeroed by punching a hole, data written into a hole, a file replaced by another
snapshot's; it does NOT catch bytes changed inside pages that hold data (the full
checksum does: `pyhv snapshot-verify DIR`, `pyhv run --restore DIR --verify`). A
filesystem that reports extents differently (a copy that filled the holes, a
filesystem without SEEK_DATA) makes the quick digest differ: the caller then falls back
to the full checksum, so a good snapshot is never refused for where it was copied.

Invariants: a page of the file reads as the page of RAM at capture time (holes are zero
pages); the writer reports progress in bytes of RAM scanned.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from pyhv.errors import StateError
from pyhv.memory import PAGE_SIZE, GuestMemory

CHUNK = 1 << 20                 # scanned at once (zero chunks are skipped whole)
ZERO_PAGE = bytes(PAGE_SIZE)
ZERO_CHUNK = bytes(CHUNK)

Progress = Callable[[int, int], None]     # (bytes done, bytes in all)


def ram_file_size(memory: GuestMemory) -> int:
    return max(r.end for r in memory.regions)


def write_ram(memory: GuestMemory, path: Path, progress: Progress | None = None) -> str:
    """Write `memory` to a new sparse file at `path`; returns the content checksum."""
    total = memory.size
    done = 0
    digest = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, ram_file_size(memory))
        for r in memory.regions:
            view = r.view
            for off in range(0, r.size, CHUNK):
                chunk = view[off:off + CHUNK].tobytes()
                if chunk != ZERO_CHUNK[:len(chunk)]:
                    _write_chunk(fd, r.gpa + off, chunk, digest)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _write_chunk(fd: int, gpa: int, chunk: bytes, digest: hashlib._Hash) -> None:
    """Write the runs of non-zero pages of `chunk` (at `gpa`), hashing each page."""
    run_start: int | None = None
    for p in range(0, len(chunk), PAGE_SIZE):
        page = chunk[p:p + PAGE_SIZE]
        if page != ZERO_PAGE:
            digest.update(((gpa + p) // PAGE_SIZE).to_bytes(8, "little"))
            digest.update(page)
            if run_start is None:
                run_start = p
        elif run_start is not None:
            os.pwrite(fd, chunk[run_start:p], gpa + run_start)
            run_start = None
    if run_start is not None:
        os.pwrite(fd, chunk[run_start:], gpa + run_start)


def _extents(fd: int, size: int) -> list[tuple[int, int]]:
    """[(start, end)] of the file's data (the whole file if it cannot say)."""
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:      # no data after pos
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, min(end, size)))
            pos = end
    except (OSError, AttributeError):
        return [(0, size)]
    return out


def extent_digest(path: Path) -> str:
    """The quick check's digest: the file's size and data extents (module docstring)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise StateError(f"cannot open {path}: {e.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        digest = hashlib.sha256(size.to_bytes(8, "little"))
        for start, end in _extents(fd, size):
            digest.update(start.to_bytes(8, "little") + end.to_bytes(8, "little"))
    finally:
        os.close(fd)
    return digest.hexdigest()


def ram_checksum(path: Path) -> str:
    """The content checksum of a RAM file (see the module docstring)."""
    digest = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise StateError(f"cannot open {path}: {e.strerror}") from None
    next_page = 0                 # pages below were hashed (extents may share a page)
    try:
        size = os.fstat(fd).st_size
        for start, end in _extents(fd, size):
            first = max(start - start % PAGE_SIZE, next_page * PAGE_SIZE)
            last = -(-end // PAGE_SIZE) * PAGE_SIZE
            for off in range(first, last, CHUNK):
                chunk = os.pread(fd, min(CHUNK, last - off), off)
                for p in range(0, len(chunk), PAGE_SIZE):
                    page = chunk[p:p + PAGE_SIZE]
                    if page != ZERO_PAGE[:len(page)]:
                        digest.update(((off + p) // PAGE_SIZE).to_bytes(8, "little"))
                        digest.update(page.ljust(PAGE_SIZE, b"\0"))
            next_page = last // PAGE_SIZE
    finally:
        os.close(fd)
    return digest.hexdigest()


def read_ram_into(memory: GuestMemory, path: Path) -> None:
    """Make `memory` hold the RAM file's content (a revert in a running VM): zero every
    region, then copy the file's data extents in."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size < ram_file_size(memory):
            raise StateError(f"the RAM file {path} holds {size} bytes; the guest's RAM "
                             f"needs {ram_file_size(memory)}")
        for r in memory.regions:
            for off in range(0, r.size, CHUNK):
                n = min(CHUNK, r.size - off)
                r.view[off:off + n] = ZERO_CHUNK[:n]
        for start, end in _extents(fd, size):
            for r in memory.regions:
                lo, hi = max(start, r.gpa), min(end, r.end)
                for off in range(lo, hi, CHUNK):
                    n = min(CHUNK, hi - off)
                    got = os.preadv(fd, [r.view[off - r.gpa:off - r.gpa + n]], off)
                    if got != n:
                        raise StateError(f"short read from {path} at {off:#x}")
    finally:
        os.close(fd)
