"""A split virtqueue (virtio 1.1, 2.6 "Split Virtqueues"), the device's side.

Layout in guest memory, little-endian (size = N, a power of two up to 32768):

    descriptor table  16 * N bytes, 16-aligned: addr u64 | len u32 | flags u16 | next u16
                      flags: NEXT 1, WRITE 2 (device writes), INDIRECT 4 (addr/len is a
                      table of descriptors, len a multiple of 16)
    available ring    6 + 2 * N bytes, 2-aligned: flags u16 | idx u16 | ring[N] u16 |
                      used_event u16 (with EVENT_IDX)
    used ring         6 + 8 * N bytes, 4-aligned: flags u16 | idx u16 |
                      ring[N] {id u32, len u32} | avail_event u16 (with EVENT_IDX)

Design: `pop()` takes the next available head and walks its chain into a `Chain`: the
head's id and two lists of (guest address, length), the device-readable buffers then the
device-writable ones. Every rule the driver must keep is checked during the walk, and a
broken one raises `QueueError` (the transport then sets DEVICE_NEEDS_RESET and the queue
stops): a head or next index outside the table, a chain with more descriptors than the
table (a loop), an indirect table that is empty, not a multiple of 16, longer than
MAX_INDIRECT entries, nested in another indirect table or combined with NEXT, a readable
buffer after a writable one, a buffer or ring outside guest RAM, and an available index
that moved more than N past the device's. Zero-length buffers are legal and dropped.
`push(head, written)` puts a used element and advances the used index; `should_notify()`
says whether the driver asked for an interrupt for the used elements pushed since the
last time (VIRTQ_AVAIL_F_NO_INTERRUPT, or with EVENT_IDX the used_event rule of 2.6.7.2).
With EVENT_IDX the device always asks to be notified of every new buffer
(avail_event = its next index), so it never sleeps on a queue with work.

Every access goes through GuestMemory (bounds-checked): a guest address can never reach
host memory outside guest RAM. An indirect table is copied once before it is walked, so
a driver rewriting it meanwhile cannot change a chain half-way through its checks. Work
is bounded: a chain walk visits at most N (or MAX_INDIRECT) descriptors, and `pop` takes
at most N heads per avail index window.

Threading: the run-loop thread only (the transport and the device's run-loop side);
devices hand the `Chain` (plain data) to their I/O threads.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from pyhv.devices.state import Reader
from pyhv.errors import GuestMemoryError, StateError
from pyhv.memory import GuestMemory

F_NEXT = 1
F_WRITE = 2
F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768
MAX_INDIRECT = 1024          # entries in one indirect table (Linux never uses more)
_DESC = struct.Struct("<QIHH")   # addr, len, flags, next


class QueueError(Exception):
    """The driver broke the virtqueue's rules: the device needs a reset."""


@dataclass
class Chain:
    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


def read_buffers(memory: GuestMemory, bufs: list[tuple[int, int]], limit: int) -> bytes:
    """Up to `limit` bytes from the start of a buffer list."""
    out = bytearray()
    for addr, n in bufs:
        take = min(n, limit - len(out))
        if take <= 0:
            break
        out += memory.read(addr, take)
    return bytes(out)


def write_buffers(memory: GuestMemory, bufs: list[tuple[int, int]], data: bytes,
                  skip: int = 0) -> int:
    """Write `data` into a buffer list starting `skip` bytes in; returns bytes written."""
    done = 0
    for addr, n in bufs:
        if skip >= n:
            skip -= n
            continue
        take = min(n - skip, len(data) - done)
        if take <= 0:
            break
        memory.write(addr + skip, data[done:done + take])
        done += take
        skip = 0
    return done


class Virtqueue:
    """One split virtqueue; the transport fills in size and addresses from the driver."""

    def __init__(self, index: int, max_size: int, memory: GuestMemory) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two up to 32768")
        self.index = index
        self.max_size = max_size
        self.memory = memory
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.enabled = False
        self.desc = 0
        self.avail = 0
        self.used = 0
        self.event_idx = False
        self.last_avail = 0        # next avail ring slot the device reads
        self.used_idx = 0          # next used ring slot the device writes
        self.signalled_used = 0    # used index at the last notification decision
        self.msix_vector = 0xFFFF

    # ------------------------------------------------------------------ set-up

    def check(self) -> None:
        """Validate what the driver configured (at queue_enable / DRIVER_OK)."""
        n = self.size
        if not 1 <= n <= self.max_size or n & (n - 1):
            raise QueueError(f"queue {self.index}: size {n} is not a power of two "
                             f"up to {self.max_size}")
        for what, addr, length, align in (
                ("descriptor table", self.desc, 16 * n, 16),
                ("available ring", self.avail, 6 + 2 * n, 2),
                ("used ring", self.used, 6 + 8 * n, 4)):
            if addr % align:
                raise QueueError(f"queue {self.index}: {what} at {addr:#x} is not "
                                 f"{align}-byte aligned")
            if not self.memory.contains(addr, length):
                raise QueueError(f"queue {self.index}: {what} at {addr:#x} "
                                 f"(+{length:#x}) is outside guest RAM")

    # ------------------------------------------------------------------ state records

    def save_state(self) -> dict[str, Any]:
        return {"size": self.size, "enabled": self.enabled, "desc": self.desc,
                "avail": self.avail, "used": self.used, "event_idx": self.event_idx,
                "last_avail": self.last_avail, "used_idx": self.used_idx,
                "signalled_used": self.signalled_used, "msix_vector": self.msix_vector}

    def read_state(self, r: Reader) -> dict[str, Any]:
        """Checked fields (`done()` included); an enabled queue must pass `check()`
        (its rings inside guest RAM), which reads no guest memory."""
        out: dict[str, Any] = {
            "size": r.int("size", 1, self.max_size), "enabled": r.bool("enabled"),
            "desc": r.int("desc"), "avail": r.int("avail"), "used": r.int("used"),
            "event_idx": r.bool("event_idx"), "last_avail": r.int("last_avail", 0, 0xFFFF),
            "used_idx": r.int("used_idx", 0, 0xFFFF),
            "signalled_used": r.int("signalled_used", 0, 0xFFFF),
            "msix_vector": r.int("msix_vector", 0, 0xFFFF)}
        r.done()
        probe = Virtqueue(self.index, self.max_size, self.memory)
        for k, v in out.items():
            setattr(probe, k, v)
        if probe.size & (probe.size - 1):
            raise r.fail("size", f"= {probe.size} is not a power of two")
        if probe.enabled:
            try:
                probe.check()
            except QueueError as e:
                raise StateError(f"{r.what}: {e}") from None
        return out

    def take_state(self, fields: dict[str, Any]) -> None:
        for k, v in fields.items():
            setattr(self, k, v)

    # ------------------------------------------------------------------ guest memory

    def _u16(self, gpa: int) -> int:
        try:
            return self.memory.read_u16(gpa)
        except GuestMemoryError as e:
            raise QueueError(str(e)) from e

    def avail_idx(self) -> int:
        return self._u16(self.avail + 2)

    def has_work(self) -> bool:
        return self.enabled and self.avail_idx() != self.last_avail

    # ------------------------------------------------------------------ taking buffers

    def pop(self) -> Chain | None:
        """The next available chain, or None; QueueError when the driver broke a rule."""
        if not self.enabled:
            return None
        idx = self.avail_idx()
        pending = (idx - self.last_avail) & 0xFFFF
        if pending == 0:
            self._arm_event()
            return None
        if pending > self.size:
            raise QueueError(f"queue {self.index}: available index {idx} is {pending} "
                             f"ahead of the device (queue size {self.size})")
        head = self._u16(self.avail + 4 + 2 * (self.last_avail % self.size))
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        chain = self._walk(head)
        if pending == 1:
            self._arm_event()
        return chain

    def _arm_event(self) -> None:
        if self.event_idx:
            try:
                self.memory.write_u16(self.used + 4 + 8 * self.size, self.last_avail)
            except GuestMemoryError as e:
                raise QueueError(str(e)) from e

    def _desc(self, table: int, i: int) -> tuple[int, int, int, int]:
        try:
            return _DESC.unpack_from(self.memory.view(table + 16 * i, 16))
        except GuestMemoryError as e:
            raise QueueError(str(e)) from e

    def _walk(self, head: int) -> Chain:
        if head >= self.size:
            raise QueueError(f"queue {self.index}: head {head} outside the table")
        chain = Chain(head)
        table, limit, i = self.desc, self.size, head
        count = 0
        indirect: bytes | None = None     # the indirect table, copied once
        contains = self.memory.contains
        while True:
            count += 1
            if count > limit:
                raise QueueError(f"queue {self.index}: descriptor chain longer than "
                                 f"{limit} (a loop?)")
            if indirect is None:
                addr, length, flags, nxt = self._desc(table, i)
            else:
                addr, length, flags, nxt = _DESC.unpack_from(indirect, 16 * i)
            if flags & F_INDIRECT:
                if indirect is not None:
                    raise QueueError(f"queue {self.index}: indirect table inside an "
                                     "indirect table")
                if flags & F_NEXT:
                    raise QueueError(f"queue {self.index}: indirect descriptor with NEXT")
                if length == 0 or length % 16 or length // 16 > MAX_INDIRECT:
                    raise QueueError(f"queue {self.index}: indirect table of {length} bytes")
                if not contains(addr, length):
                    raise QueueError(f"queue {self.index}: indirect table at {addr:#x} "
                                     f"(+{length:#x}) is outside guest RAM")
                indirect = self.memory.read(addr, length)
                limit, i, count = length // 16, 0, 0
                continue
            if length:
                if not contains(addr, length):
                    raise QueueError(f"queue {self.index}: buffer at {addr:#x} "
                                     f"(+{length:#x}) is outside guest RAM")
                if flags & F_WRITE:
                    chain.writable.append((addr, length))
                elif chain.writable:
                    raise QueueError(f"queue {self.index}: a readable buffer after a "
                                     "writable one")
                else:
                    chain.readable.append((addr, length))
            if not flags & F_NEXT:
                return chain
            if nxt >= limit:
                raise QueueError(f"queue {self.index}: next index {nxt} outside the table")
            i = nxt

    # ------------------------------------------------------------------ returning buffers

    def push(self, head: int, written: int) -> None:
        """Return chain `head` with `written` bytes written into its writable buffers."""
        slot = self.used + 4 + 8 * (self.used_idx % self.size)
        try:
            self.memory.write(slot, head.to_bytes(4, "little")
                              + (written & 0xFFFFFFFF).to_bytes(4, "little"))
            self.used_idx = (self.used_idx + 1) & 0xFFFF
            self.memory.write_u16(self.used + 2, self.used_idx)
        except GuestMemoryError as e:
            raise QueueError(str(e)) from e

    def should_notify(self) -> bool:
        """Whether the used elements pushed since the last call need an interrupt."""
        old, new = self.signalled_used, self.used_idx
        self.signalled_used = new
        if old == new:
            return False
        if self.event_idx:
            event = self._u16(self.avail + 4 + 2 * self.size)
            return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not self._u16(self.avail) & AVAIL_F_NO_INTERRUPT
