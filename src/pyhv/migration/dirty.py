"""Which RAM pages to send again: the engine's dirty log, or a comparison with what
was sent.

Design: a tracker is started before round 1, asked `dirty()` after each round (the
page frames whose content the destination does not have yet, sorted), told `sent(pfn,
data)` for every page that goes out, and closed at the end.

- `EngineLog` (kvm, trap, bt, pv): the engine's dirty log (KVM_GET_DIRTY_LOG + pyhv's
  own writes): every write after the log was read sets the page's bit again, so a page
  is never missed.
- `ShadowCompare` (emu): unicorn has no dirty log, and the engine's digest log compares
  each page with its digest at the last call, which misses a page that changed and
  changed back between that call and the time it was read for sending (an A-B-A on a
  lock word, say: the destination would keep the middle value). Instead this keeps a
  copy of what was sent (the destination's RAM, page for page) and `dirty()` compares
  guest RAM with it, 64 KiB at a time with libc's memcmp (outside the GIL), then page by
  page inside a chunk that differs. Exact by construction: after the last pass in the
  pause the destination holds every byte of guest RAM. It costs one copy of guest RAM
  for the duration of the migration; the scan runs at memcmp speed (128 MiB: tens of
  ms, where hashing every page took about half a second here).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import TYPE_CHECKING, Protocol

from pyhv.memory import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from pyhv.machine import Machine

CHUNK = 64 * 1024
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_memcmp = _libc.memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int


class Tracker(Protocol):
    def start(self) -> None: ...
    def dirty(self) -> list[int]: ...
    def sent(self, pfn: int, data: bytes) -> None: ...
    def close(self) -> None: ...


def tracker_for(machine: Machine) -> Tracker:
    return ShadowCompare(machine) if machine.engine_name == "emu" else EngineLog(machine)


class EngineLog:
    def __init__(self, machine: Machine) -> None:
        assert machine.engine is not None
        self.engine = machine.engine
        self.on = False

    def start(self) -> None:
        self.engine.enable_dirty_tracking(True)
        self.on = True

    def dirty(self) -> list[int]:
        return sorted(self.engine.dirty_pages())

    def sent(self, pfn: int, data: bytes) -> None:
        pass

    def close(self) -> None:
        if self.on:
            self.engine.enable_dirty_tracking(False)
            self.on = False


class ShadowCompare:
    def __init__(self, machine: Machine) -> None:
        assert machine.memory is not None
        self.regions = [(r.gpa >> PAGE_SHIFT, r.size, r.host_addr)
                        for r in machine.memory.regions]
        self.shadows: list[bytearray] = []
        self._anchors: list[ctypes.Array[ctypes.c_char]] = []
        self.addrs: list[int] = []

    def start(self) -> None:
        for _, size, _ in self.regions:
            shadow = bytearray(size)
            anchor = (ctypes.c_char * size).from_buffer(shadow)
            self.shadows.append(shadow)
            self._anchors.append(anchor)
            self.addrs.append(ctypes.addressof(anchor))

    def dirty(self) -> list[int]:
        out: list[int] = []
        for (base, size, ram), shadow in zip(self.regions, self.addrs, strict=True):
            for off in range(0, size, CHUNK):
                n = min(CHUNK, size - off)
                if _memcmp(ram + off, shadow + off, n) == 0:
                    continue
                for p in range(off, off + n, PAGE_SIZE):
                    if _memcmp(ram + p, shadow + p, PAGE_SIZE) != 0:
                        out.append(base + (p >> PAGE_SHIFT))
        return out

    def sent(self, pfn: int, data: bytes) -> None:
        for (base, size, _), shadow in zip(self.regions, self.shadows, strict=True):
            off = (pfn - base) << PAGE_SHIFT
            if 0 <= off < size:
                shadow[off:off + PAGE_SIZE] = data
                return

    def close(self) -> None:
        self._anchors.clear()
        self.addrs.clear()
        self.shadows.clear()
