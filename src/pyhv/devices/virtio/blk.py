"""virtio-blk (virtio 1.1, 5.2 "Block Device") on pyhv's own block layer (pyhv.disk).

Configuration space (little-endian): capacity u64 (512-byte sectors) @0, size_max u32
@8, seg_max u32 @12, geometry @16, blk_size u32 @20, topology @24, writeback u8 @32,
num_queues u16 @34, max_discard_sectors u32 @36, max_discard_seg u32 @40,
discard_sector_alignment u32 @44, max_write_zeroes_sectors u32 @48,
max_write_zeroes_seg u32 @52, write_zeroes_may_unmap u8 @56 (60 bytes).

Features offered: SEG_MAX, BLK_SIZE, FLUSH, DISCARD, WRITE_ZEROES, and RO for a
read-only disk. One request queue of QUEUE_SIZE entries.

A request is a chain: header {type u32, reserved u32, sector u64} (device-readable),
then data (readable for OUT / DISCARD / WRITE_ZEROES, writable for IN / GET_ID), then
one status byte, the last writable byte (OK 0, IOERR 1, UNSUPP 2). Types: IN 0, OUT 1,
FLUSH 4, GET_ID 8 (20 bytes of serial), DISCARD 11, WRITE_ZEROES 13 (16-byte segments
{sector u64, num_sectors u32, flags u32}, flag bit 0 = unmap, write-zeroes only).

Design: `queue_notify` (run-loop thread) pops every available chain, checks its shape
(a chain without a 16-byte header or a status byte is a driver bug: the device needs a
reset, as QEMU does) and hands it to the disk's I/O thread, so the guest keeps running
while the disk works and any number of requests (up to the queue size) are in flight.
The I/O thread serves them in order, moving data between guest RAM (bounds-checked
GuestMemory) and the image in pieces of at most CHUNK bytes, writes the status byte and
posts the completion back to the run loop (`ctx.post`), which returns the chain and
raises the interrupt. A guest error gets a status, never an exception: a data length that
is not whole sectors, sectors past the end, a write, discard or write-zeroes to a
read-only disk, bad segment counts or flags (IOERR or UNSUPP), an unknown type (UNSUPP).
A failing image (ImageError, OSError) is IOERR. Anything else is a pyhv bug: it is
re-raised on the run-loop thread (internal error, status 70), not hidden.

Durability: a write completes only after the image has it (qcow2 metadata may still be
cached: FLUSH writes it back and fdatasyncs). `reset()` waits for the I/O thread to
finish what it has; `close()` (every way a run ends goes through Machine.close) also
flushes and closes the image, which releases its lock, so what the guest saw completed is
on the image and `qemu-img check` is clean afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pyhv.devices.state import Reader
from pyhv.devices.virtio.device import VirtioContext, VirtioDevice
from pyhv.devices.virtio.queue import Chain, read_buffers
from pyhv.disk.blockdev import BlockDevice
from pyhv.errors import GuestMemoryError, ImageError, StateError
from pyhv.memory import GuestMemory

_T = TypeVar("_T")

SECTOR = 512
QUEUE_SIZE = 256
CHUNK = 1 << 20               # bytes moved between guest RAM and the image at a time
ID_BYTES = 20

F_SIZE_MAX = 1 << 1
F_SEG_MAX = 1 << 2
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9
F_DISCARD = 1 << 13
F_WRITE_ZEROES = 1 << 14

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2

MAX_DISCARD_SECTORS = 1 << 22          # 2 GiB per segment (metadata work only)
MAX_WRITE_ZEROES_SECTORS = 1 << 16     # 32 MiB per segment (raw writes the zeros)
MAX_SEGMENTS = 1


@dataclass
class Request:
    head: int
    type: int
    sector: int
    data_in: list[tuple[int, int]]      # device-writable data buffers (status byte removed)
    data_out: list[tuple[int, int]]     # device-readable data buffers (header removed)
    status_at: int


def _drop_prefix(bufs: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    out = []
    for addr, length in bufs:
        if n >= length:
            n -= length
            continue
        out.append((addr + n, length - n))
        n = 0
    return out


def parse(memory: GuestMemory, chain: Chain) -> Request | None:
    """The request a chain carries, or None if it has no header or no status byte."""
    if chain.readable_len < 16 or not chain.writable:
        return None
    kind, _reserved, sector = struct.unpack("<IIQ", read_buffers(memory, chain.readable, 16))
    last_addr, last_len = chain.writable[-1]
    data_in = chain.writable[:-1] + ([(last_addr, last_len - 1)] if last_len > 1 else [])
    return Request(chain.head, kind, sector, data_in, _drop_prefix(chain.readable, 16),
                   last_addr + last_len - 1)


class VirtioBlk(VirtioDevice):
    device_type = 2
    pci_class = 0x010000           # mass storage (as QEMU's virtio-blk-pci)
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, disk: BlockDevice, *, serial: str = "", name: str = "virtio-blk",
                 reopen: Callable[[], BlockDevice] | None = None) -> None:
        super().__init__()
        self.disk = disk
        self.reopen = reopen            # opens the image again (pyhv.disk.handover)
        self.name = name
        self.serial = serial.encode()[:ID_BYTES]
        self.read_only = disk.read_only
        self.capacity = disk.size // SECTOR
        self.features = F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_DISCARD | F_WRITE_ZEROES \
            | (F_RO if self.read_only else 0)
        cfg = bytearray(60)
        struct.pack_into("<Q", cfg, 0, self.capacity)
        struct.pack_into("<I", cfg, 12, QUEUE_SIZE - 2)           # seg_max
        struct.pack_into("<I", cfg, 20, SECTOR)                   # blk_size
        struct.pack_into("<H", cfg, 34, 1)                        # num_queues
        struct.pack_into("<III", cfg, 36, MAX_DISCARD_SECTORS, MAX_SEGMENTS, 1)
        struct.pack_into("<II", cfg, 48, MAX_WRITE_ZEROES_SECTORS, MAX_SEGMENTS)
        cfg[56] = 1                                               # may unmap
        self.config = cfg
        self.ctx: VirtioContext | None = None
        self.memory: GuestMemory | None = None
        self.completed = 0
        self.errors = 0
        self._work: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name=f"pyhv-{name}", daemon=True)
        self._thread.start()
        self._closed = False

    # ------------------------------------------------------------------ run-loop side

    def activate(self, ctx: VirtioContext) -> None:
        self.ctx = ctx
        self.memory = ctx.memory

    def queue_notify(self, index: int) -> None:
        ctx = self.ctx
        if ctx is None:
            return
        while (chain := ctx.pop(index)) is not None:
            req = parse(ctx.memory, chain)
            if req is None:
                ctx.fail(f"{self.name}: a request without a 16-byte header or a status byte")
                return
            self._work.put(functools.partial(self._do, ctx, index, req))

    def reset(self) -> None:
        self._work.join()               # in-flight requests finish (their posts are dropped)
        self.ctx = None

    def quiesce(self) -> None:
        self._work.join()               # in-flight requests finish and post completions
        if not self.read_only:
            self.disk.flush()

    def save_device(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "read_only": self.read_only}

    def read_device(self, r: Reader, memory: GuestMemory) -> Callable[[], None]:
        capacity = r.int("capacity")
        read_only = r.bool("read_only")
        r.done()
        if capacity != self.capacity or read_only != self.read_only:
            raise StateError(f"{self.name}: the snapshot's disk has {capacity} sectors"
                             f"{' (read-only)' if read_only else ''}, this one "
                             f"{self.capacity}{' (read-only)' if self.read_only else ''}")
        return lambda: None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._work.join()
        self._work.put(None)
        self._thread.join(timeout=60)
        try:
            if not self.read_only:
                self.disk.flush()
        finally:
            self.disk.close()

    def call(self, fn: Callable[[], _T]) -> _T:
        """Run `fn` on the I/O thread, in order with the guest's requests, and return
        its result (live migration reads and tracks the disk this way: the image is
        only ever used from that thread)."""
        if self._closed:
            raise ImageError(f"{self.name}: the device is closed")
        box: list[tuple[bool, object]] = []
        done = threading.Event()

        def job() -> None:
            try:
                box.append((True, fn()))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box.append((False, e))
            finally:
                done.set()
        self._work.put(job)
        done.wait()
        ok, value = box[0]
        if not ok:
            assert isinstance(value, BaseException)
            raise value
        return value  # type: ignore[return-value]

    # ------------------------------------------------------------------ the I/O thread

    def _serve(self) -> None:
        while True:
            job = self._work.get()
            try:
                if job is None:
                    return
                job()
            finally:
                self._work.task_done()

    def _do(self, ctx: VirtioContext, index: int, req: Request) -> None:
        mem = ctx.memory
        try:
            status, written = self._execute(mem, req)
        except (ImageError, OSError, GuestMemoryError):
            status, written = S_IOERR, 0
        except Exception as e:  # noqa: BLE001 - a pyhv bug: reported on the run loop
            err = e

            def fail() -> None:
                raise RuntimeError(f"{self.name} I/O thread: {type(err).__name__}: "
                                   f"{err}") from err
            ctx.post(fail)
            return
        if status != S_OK:
            self.errors += 1
        with contextlib.suppress(GuestMemoryError):
            mem.write_u8(req.status_at, status)
        self.completed += 1
        ctx.post(lambda: ctx.complete(index, req.head, written + 1))

    def _execute(self, mem: GuestMemory, req: Request) -> tuple[int, int]:
        disk, t = self.disk, req.type
        if t in (T_IN, T_OUT):
            bufs = req.data_in if t == T_IN else req.data_out
            total = sum(n for _, n in bufs)
            if total % SECTOR or not self._in_range(req.sector, total // SECTOR):
                return S_IOERR, 0
            if t == T_OUT and self.read_only:
                return S_IOERR, 0
            if t == T_IN:
                self._read(mem, req.sector * SECTOR, bufs)
                return S_OK, total
            self._write(mem, req.sector * SECTOR, bufs)
            return S_OK, 0
        if t == T_FLUSH:
            if not self.read_only:
                disk.flush()
            return S_OK, 0
        if t == T_GET_ID:
            n = min(ID_BYTES, sum(k for _, k in req.data_in))
            data = self.serial.ljust(ID_BYTES, b"\0")[:n]
            done = 0
            for addr, k in req.data_in:
                take = min(k, n - done)
                if take <= 0:
                    break
                mem.write(addr, data[done:done + take])
                done += take
            return S_OK, n
        if t in (T_DISCARD, T_WRITE_ZEROES):
            return self._discard_or_zero(mem, req), 0
        return S_UNSUPP, 0

    def _in_range(self, sector: int, count: int) -> bool:
        return sector >= 0 and sector + count <= self.capacity

    def _read(self, mem: GuestMemory, offset: int, bufs: list[tuple[int, int]]) -> None:
        i, skip = 0, 0
        total = sum(n for _, n in bufs)
        done = 0
        while done < total:
            data = memoryview(self.disk.read(offset + done, min(CHUNK, total - done)))
            pos = 0
            while pos < len(data):
                addr, n = bufs[i]
                take = min(n - skip, len(data) - pos)
                mem.write(addr + skip, data[pos:pos + take])
                pos += take
                skip += take
                if skip == n:
                    i, skip = i + 1, 0
            done += len(data)

    def _write(self, mem: GuestMemory, offset: int, bufs: list[tuple[int, int]]) -> None:
        pending = bytearray()
        at = offset
        for addr, n in bufs:
            pos = 0
            while pos < n:
                take = min(n - pos, CHUNK - len(pending))
                pending += mem.view(addr + pos, take)
                pos += take
                if len(pending) >= CHUNK:
                    self.disk.write(at, bytes(pending))
                    at += len(pending)
                    pending.clear()
        if pending:
            self.disk.write(at, bytes(pending))

    def _discard_or_zero(self, mem: GuestMemory, req: Request) -> int:
        raw = read_buffers(mem, req.data_out, 16 * (MAX_SEGMENTS + 1))
        total = sum(n for _, n in req.data_out)
        if total == 0 or total % 16 or total // 16 > MAX_SEGMENTS:
            return S_IOERR
        if self.read_only:
            return S_IOERR
        zero = req.type == T_WRITE_ZEROES
        limit = MAX_WRITE_ZEROES_SECTORS if zero else MAX_DISCARD_SECTORS
        segs = [struct.unpack_from("<QII", raw, 16 * k) for k in range(total // 16)]
        for sector, count, flags in segs:
            if flags & ~(1 if zero else 0):
                return S_UNSUPP
            if count > limit or not self._in_range(sector, count):
                return S_IOERR
        for sector, count, _flags in segs:
            off, length = sector * SECTOR, count * SECTOR
            if not zero:
                self.disk.discard(off, length)
                continue
            wz = getattr(self.disk, "write_zeroes", None)
            if wz is not None:
                wz(off, length)
            else:
                while length:
                    n = min(CHUNK, length)
                    self.disk.write(off, bytes(n))
                    off, length = off + n, length - n
        return S_OK
