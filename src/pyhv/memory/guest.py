"""Guest-physical memory: the set of RAM regions and bounds-checked access to them.

Design: `GuestMemory` holds non-overlapping `MemoryRegion`s sorted by address. Every
access names a guest-physical address (gpa) and a length and is checked to lie entirely
inside one region; anything else raises `GuestMemoryError`. This is the only way pyhv
code (loaders, devices, engines' helpers) touches guest RAM, so a hostile guest value
can never turn into a host read or write outside the mappings.

Writes made through this class (loaders, device DMA) are recorded in an optional dirty
bitmap (`track_dirty`), because a hardware engine's dirty log sees only the guest's own
writes; live migration needs both.

    gpa 0 ............... region 0 (low RAM, up to the PCI hole) ......... |
    gpa 4 GiB ........... region 1 (high RAM, when the guest has > ~3 GiB) |
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from pyhv.errors import GuestMemoryError, StateError
from pyhv.memory.region import MemoryRegion

PAGE_SIZE = 4096
PAGE_SHIFT = 12

T = TypeVar("T", bound=ctypes.Structure)

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemory:
    """Bounds-checked guest-physical memory made of one or more RAM regions."""

    def __init__(self, regions: list[MemoryRegion]) -> None:
        self.regions = sorted(regions, key=lambda r: r.gpa)
        for a, b in zip(self.regions, self.regions[1:], strict=False):
            if a.end > b.gpa:
                raise ValueError(f"overlapping memory regions {a} and {b}")
        self._dirty: set[int] | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def with_layout(cls, layout: list[tuple[int, int]],
                    backing: Path | None = None) -> GuestMemory:
        """Allocate one region per (gpa, size) pair; with `backing`, map each region
        copy-on-write from that file at file offset = gpa (a snapshot's RAM file, whose
        holes read as zeros). The file must cover every region: checked here, since a
        mapped page past its end would kill the process with SIGBUS."""
        if backing is None:
            return cls([MemoryRegion(gpa, size) for gpa, size in layout])
        try:
            fd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise StateError(f"cannot open the RAM file {backing}: {e.strerror}") from None
        regions: list[MemoryRegion] = []
        try:
            have = os.fstat(fd).st_size
            need = max(gpa + size for gpa, size in layout)
            if have < need:
                raise StateError(f"the RAM file {backing} holds {have} bytes; the guest's "
                                 f"RAM needs {need}")
            for gpa, size in layout:
                regions.append(MemoryRegion(gpa, size, backing=(fd, gpa)))
        except BaseException:
            for r in regions:
                r.close()
            raise
        finally:
            os.close(fd)            # each mapping keeps its own reference to the file
        return cls(regions)

    @property
    def size(self) -> int:
        """Total bytes of RAM."""
        return sum(r.size for r in self.regions)

    def close(self) -> None:
        for r in self.regions:
            r.close()
        self.regions = []

    # ------------------------------------------------------------------ lookup

    def region_of(self, gpa: int, size: int = 1) -> MemoryRegion:
        """The region holding all of [gpa, gpa + size), or GuestMemoryError."""
        if size < 0 or gpa < 0:
            raise GuestMemoryError(gpa, size, "is negative")
        for r in self.regions:
            if r.gpa <= gpa and gpa + size <= r.end:
                return r
        raise GuestMemoryError(gpa, size)

    def contains(self, gpa: int, size: int = 1) -> bool:
        try:
            self.region_of(gpa, size)
        except GuestMemoryError:
            return False
        return True

    def view(self, gpa: int, size: int) -> memoryview:
        """A zero-copy, writable view of [gpa, gpa + size) (must lie in one region)."""
        r = self.region_of(gpa, size)
        off = gpa - r.gpa
        return r.view[off:off + size]

    # ------------------------------------------------------------------ bytes

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.view(gpa, size))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        size = len(data)
        self.view(gpa, size)[:] = data
        if self._dirty is not None and size:
            self._dirty.update(range(gpa >> PAGE_SHIFT, ((gpa + size - 1) >> PAGE_SHIFT) + 1))

    def fill(self, gpa: int, size: int, byte: int = 0) -> None:
        self.write(gpa, bytes([byte]) * size)

    def read_cstring(self, gpa: int, max_len: int = 4096) -> bytes:
        """Read a NUL-terminated string of at most max_len bytes (stops at region end)."""
        r = self.region_of(gpa, 1)
        limit = min(gpa + max_len, r.end)
        data = bytes(r.view[gpa - r.gpa:limit - r.gpa])
        nul = data.find(b"\0")
        return data if nul < 0 else data[:nul]

    # ------------------------------------------------------------------ integers

    def read_u8(self, gpa: int) -> int:
        return self.view(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        return int(_U16.unpack(self.view(gpa, 2))[0])

    def read_u32(self, gpa: int) -> int:
        return int(_U32.unpack(self.view(gpa, 4))[0])

    def read_u64(self, gpa: int) -> int:
        return int(_U64.unpack(self.view(gpa, 8))[0])

    def write_u8(self, gpa: int, value: int) -> None:
        self.write(gpa, bytes((value & 0xFF,)))

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, _U16.pack(value & 0xFFFF))

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, _U32.pack(value & 0xFFFFFFFF))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, _U64.pack(value & 0xFFFFFFFFFFFFFFFF))

    # ------------------------------------------------------------------ structs

    def read_struct(self, gpa: int, kind: type[T]) -> T:
        """A copy of the ctypes structure stored at gpa."""
        return kind.from_buffer_copy(self.view(gpa, ctypes.sizeof(kind)))

    def write_struct(self, gpa: int, value: ctypes.Structure) -> None:
        self.write(gpa, bytes(value))

    # ------------------------------------------------------------------ dirty pages

    def track_dirty(self, enable: bool = True) -> None:
        """Start (or stop) recording pages written through this object."""
        self._dirty = set() if enable else None

    def take_dirty(self) -> set[int]:
        """Page frame numbers written through this object since the last call."""
        if self._dirty is None:
            return set()
        pages, self._dirty = self._dirty, set()
        return pages

    def pages(self) -> Iterator[int]:
        """Every guest page frame number backed by RAM."""
        for r in self.regions:
            yield from range(r.gpa >> PAGE_SHIFT, r.end >> PAGE_SHIFT)
