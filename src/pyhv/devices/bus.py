"""Port-I/O and MMIO buses: route an access to the device that owns its address.

Design (after Firecracker's `Bus`): every device implements one protocol,
`read(offset, size) -> int` and `write(offset, size, value)`, where `offset` is relative
to the base the device was registered at and `size` is 1, 2, 4 or 8 bytes. The run loop
hands each port or MMIO exit to a bus; it never knows which device answers.

Unclaimed addresses behave like an empty ISA/PCI bus: reads return all ones, writes are
dropped. Both are counted (`unhandled_reads`, `unhandled_writes`) so `--stats` can show a
guest poking at hardware that is not there; the first MISS_ADDRS_MAX distinct addresses
are also counted one by one (`unhandled_addrs`), later ones only in `unhandled_other`, so
a guest sweeping the MMIO space cannot grow the counter without bound; in strict mode
they raise `UnhandledIo` instead, which ends the run with the address named (`--strict-io`).

Ranges may also be withdrawn (`unregister`): PCI BARs come and go as the guest moves them
or turns decoding off (devices/pci), and `is_free` lets such an owner check a range first.

Invariants: ranges never overlap (registration refuses it); a device only ever sees
offsets inside its own range; values passed to `write` are masked to `size` bytes.
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Protocol

from pyhv.errors import PyhvError

MISS_ADDRS_MAX = 256       # distinct unclaimed addresses counted one by one
_MASKS = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}


class BusDevice(Protocol):
    """What every device on a bus implements."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class UnhandledIo(PyhvError):
    """An access no device claims, raised only in strict mode."""

    exit_status = 4


class Bus:
    """Address ranges -> devices, for one address space (port I/O or MMIO)."""

    def __init__(self, name: str, *, strict: bool = False) -> None:
        self.name = name
        self.strict = strict
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, BusDevice, str]] = []  # (start, end, dev, name)
        self.accesses: Counter[str] = Counter()
        self.unhandled_reads = 0
        self.unhandled_writes = 0
        self.unhandled_addrs: Counter[int] = Counter()   # at most MISS_ADDRS_MAX keys
        self.unhandled_other = 0       # misses at addresses beyond those

    def register(self, base: int, length: int, device: BusDevice, name: str = "") -> None:
        """Claim [base, base + length) for device; overlapping claims are refused."""
        if length <= 0:
            raise ValueError("empty bus range")
        end = base + length
        i = bisect.bisect_right(self._starts, base)
        if i > 0 and self._ranges[i - 1][1] > base:
            raise ValueError(f"{self.name}: {base:#x} overlaps {self._ranges[i - 1][3]}")
        if i < len(self._ranges) and self._ranges[i][0] < end:
            raise ValueError(f"{self.name}: {base:#x}+{length:#x} overlaps {self._ranges[i][3]}")
        label = name or type(device).__name__
        self._starts.insert(i, base)
        self._ranges.insert(i, (base, end, device, label))

    def is_free(self, base: int, length: int) -> bool:
        """True when no registered range meets [base, base + length)."""
        end = base + length
        i = bisect.bisect_right(self._starts, base)
        if i > 0 and self._ranges[i - 1][1] > base:
            return False
        return not (i < len(self._ranges) and self._ranges[i][0] < end)

    def unregister(self, base: int, device: BusDevice) -> None:
        """Withdraw the range registered at `base` for `device` (KeyError if none)."""
        i = bisect.bisect_left(self._starts, base)
        if i < len(self._ranges) and self._ranges[i][0] == base \
                and self._ranges[i][2] is device:
            del self._starts[i]
            del self._ranges[i]
            return
        raise KeyError(f"{self.name}: nothing registered at {base:#x} for that device")

    def find(self, addr: int) -> tuple[int, BusDevice, str] | None:
        """(base, device, name) owning addr, or None."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            start, end, dev, label = self._ranges[i]
            if addr < end:
                return start, dev, label
        return None

    def devices(self) -> list[tuple[int, int, str]]:
        """(base, length, name) of every registered range, in address order."""
        return [(s, e - s, n) for s, e, _, n in self._ranges]

    def _miss(self, addr: int) -> None:
        if addr in self.unhandled_addrs or len(self.unhandled_addrs) < MISS_ADDRS_MAX:
            self.unhandled_addrs[addr] += 1
        else:
            self.unhandled_other += 1

    def read(self, addr: int, size: int) -> int:
        hit = self.find(addr)
        if hit is None:
            self.unhandled_reads += 1
            self._miss(addr)
            if self.strict:
                raise UnhandledIo(f"{self.name} read of {size} bytes at {addr:#x}: no device")
            return _MASKS.get(size, (1 << (8 * size)) - 1)
        base, dev, label = hit
        self.accesses[label] += 1
        return dev.read(addr - base, size) & _MASKS.get(size, (1 << (8 * size)) - 1)

    def write(self, addr: int, size: int, value: int) -> None:
        hit = self.find(addr)
        if hit is None:
            self.unhandled_writes += 1
            self._miss(addr)
            if self.strict:
                raise UnhandledIo(
                    f"{self.name} write of {value:#x} ({size} bytes) at {addr:#x}: no device")
            return
        base, dev, label = hit
        self.accesses[label] += 1
        dev.write(addr - base, size, value & _MASKS.get(size, (1 << (8 * size)) - 1))

    # Byte-buffer forms, used by engines whose exits carry raw bytes (KVM).

    def read_into(self, addr: int, buf: memoryview) -> None:
        size = len(buf)
        buf[:] = self.read(addr, size).to_bytes(size, "little")

    def write_bytes(self, addr: int, data: bytes | memoryview) -> None:
        self.write(addr, len(data), int.from_bytes(data, "little"))
