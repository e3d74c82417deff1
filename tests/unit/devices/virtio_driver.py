"""A minimal virtio 1.x PCI driver for tests: what Linux's virtio_pci_modern does, written
from the spec (virtio 1.1, 3.1.1 and 4.1.4), through pyhv's own PCI host bridge, port bus
and MMIO bus, so the tests exercise the same paths a guest's accesses take.

    m = TestMachine(); fn = m.add(SomeVirtioDevice()); d = Driver(m, slot)
    d.init(features) ; d.setup_queue(0, 8) ; d.driver_ok()
    head = d.q[0].add([(b"out", False), (16, True)]) ; d.notify(0) ; d.q[0].take_used()
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyhv.devices.bus import Bus
from pyhv.devices.deferred import DeferredCalls
from pyhv.devices.irq import RecordingIrq
from pyhv.devices.pci.host import PciHost
from pyhv.devices.virtio import transport as T
from pyhv.devices.virtio.device import VirtioDevice
from pyhv.devices.virtio.queue import F_INDIRECT, F_NEXT, F_WRITE
from pyhv.memory import GuestMemory

RAM = 4 << 20


class TestMachine:
    __test__ = False

    def __init__(self, ram: int = RAM) -> None:
        self.memory = GuestMemory.with_layout([(0, ram)])
        self.pio = Bus("port I/O")
        self.mmio = Bus("MMIO")
        self.irqs: dict[int, RecordingIrq] = {}
        self.level: list[int] = []
        self.deferred = DeferredCalls()
        self.host = PciHost(self.pio, self.mmio, self.memory, self._line, self.level.append)
        for base, length, dev, name in self.host.regions():
            self.pio.register(base, length, dev, name)

    def _line(self, n: int) -> RecordingIrq:
        return self.irqs.setdefault(n, RecordingIrq())

    def add(self, device: VirtioDevice) -> tuple[int, T.VirtioPciFunction]:
        fn = T.VirtioPciFunction(device, self.memory, self.deferred)
        return self.host.add(fn), fn

    def cfg_read(self, slot: int, reg: int, size: int = 4) -> int:
        self.pio.write(0xCF8, 4, 0x8000_0000 | (slot << 11) | (reg & 0xFC))
        return self.pio.read(0xCFC + (reg & 3), size)

    def cfg_write(self, slot: int, reg: int, size: int, value: int) -> None:
        self.pio.write(0xCF8, 4, 0x8000_0000 | (slot << 11) | (reg & 0xFC))
        self.pio.write(0xCFC + (reg & 3), size, value)

    def close(self) -> None:
        self.memory.close()


@dataclass
class DriverQueue:
    mem: GuestMemory
    index: int
    size: int
    desc: int
    avail: int
    used: int
    free: list[int] = field(default_factory=list)
    chains: dict[int, list[int]] = field(default_factory=dict)
    avail_idx: int = 0
    last_used: int = 0
    data_next: int = 0
    data_end: int = 0

    def alloc(self, n: int) -> int:
        at = self.data_next
        self.data_next += (n + 15) & ~15
        assert self.data_next <= self.data_end, "test driver out of buffer space"
        return at

    def put_desc(self, i: int, addr: int, length: int, flags: int, nxt: int,
                 table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.mem.write(base + 16 * i, addr.to_bytes(8, "little") + length.to_bytes(4, "little")
                       + flags.to_bytes(2, "little") + nxt.to_bytes(2, "little"))

    def add(self, bufs: list[tuple[bytes | int, bool]], indirect: bool = False
            ) -> tuple[int, list[int]]:
        """Make a chain of buffers available: (bytes to send | size to receive, writable).
        Returns (head, guest addresses of the buffers)."""
        addrs = []
        for b, _w in bufs:
            n = b if isinstance(b, int) else len(b)
            a = self.alloc(max(n, 1))
            if not isinstance(b, int):
                self.mem.write(a, b)
            addrs.append(a)
        if indirect:
            table = self.alloc(16 * len(bufs))
            for k, ((b, w), a) in enumerate(zip(bufs, addrs, strict=True)):
                n = b if isinstance(b, int) else len(b)
                last = k == len(bufs) - 1
                self.put_desc(k, a, n, (F_WRITE if w else 0) | (0 if last else F_NEXT),
                              0 if last else k + 1, table)
            head = self.free.pop(0)
            self.chains[head] = [head]
            self.put_desc(head, table, 16 * len(bufs), F_INDIRECT, 0)
        else:
            ids = [self.free.pop(0) for _ in bufs]
            for k, ((b, w), a) in enumerate(zip(bufs, addrs, strict=True)):
                n = b if isinstance(b, int) else len(b)
                last = k == len(bufs) - 1
                self.put_desc(ids[k], a, n, (F_WRITE if w else 0) | (0 if last else F_NEXT),
                              0 if last else ids[k + 1])
            head = ids[0]
            self.chains[head] = ids
        self.publish(head)
        return head, addrs

    def publish(self, head: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def take_used(self) -> list[tuple[int, int]]:
        out = []
        idx = self.mem.read_u16(self.used + 2)
        while self.last_used != idx:
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            out.append((self.mem.read_u32(slot), self.mem.read_u32(slot + 4)))
            self.free += self.chains.pop(out[-1][0], [])
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


class Driver:
    """Drives one virtio function through config space and its BAR 0."""

    def __init__(self, m: TestMachine, slot: int) -> None:
        self.m = m
        self.slot = slot
        self.bar = m.cfg_read(slot, 0x10) & ~0xF
        self.q: dict[int, DriverQueue] = {}
        self.next_ram = 0x10000

    def common_read(self, off: int, size: int) -> int:
        return self.m.mmio.read(self.bar + T.COMMON + off, size)

    def common_write(self, off: int, size: int, value: int) -> None:
        self.m.mmio.write(self.bar + T.COMMON + off, size, value)

    @property
    def status(self) -> int:
        return self.common_read(0x14, 1)

    def device_features(self) -> int:
        self.common_write(0x00, 4, 0)
        lo = self.common_read(0x04, 4)
        self.common_write(0x00, 4, 1)
        return lo | self.common_read(0x04, 4) << 32

    def init(self, features: int | None = None) -> bool:
        """Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; True if it stuck."""
        self.common_write(0x14, 1, 0)
        self.common_write(0x14, 1, T.S_ACKNOWLEDGE)
        self.common_write(0x14, 1, T.S_ACKNOWLEDGE | T.S_DRIVER)
        f = self.device_features() if features is None else features
        self.common_write(0x08, 4, 0)
        self.common_write(0x0C, 4, f & 0xFFFFFFFF)
        self.common_write(0x08, 4, 1)
        self.common_write(0x0C, 4, f >> 32)
        self.common_write(0x14, 1, T.S_ACKNOWLEDGE | T.S_DRIVER | T.S_FEATURES_OK)
        return bool(self.status & T.S_FEATURES_OK)

    def setup_queue(self, index: int, size: int, data_bytes: int = 0x10000,
                    enable: bool = True) -> DriverQueue:
        self.common_write(0x16, 2, index)
        desc = self.next_ram
        avail = desc + 16 * size
        used = (avail + 6 + 2 * size + 3) & ~3
        data = (used + 6 + 8 * size + 0xFFF) & ~0xFFF
        self.next_ram = data + data_bytes
        self.m.memory.fill(desc, self.next_ram - desc)
        self.common_write(0x18, 2, size)
        self.common_write(0x20, 8, desc)
        self.common_write(0x28, 4, avail)       # two halves, as Linux writes them
        self.common_write(0x2C, 4, 0)
        self.common_write(0x30, 8, used)
        if enable:
            self.common_write(0x1C, 2, 1)
        q = DriverQueue(self.m.memory, index, size, desc, avail, used,
                        free=list(range(size)), data_next=data, data_end=self.next_ram)
        self.q[index] = q
        return q

    def driver_ok(self) -> None:
        self.common_write(0x14, 1, self.status | T.S_DRIVER_OK)

    def notify(self, index: int) -> None:
        self.m.mmio.write(self.bar + T.NOTIFY + T.NOTIFY_MULTIPLIER * index, 2, index)

    def isr(self) -> int:
        return self.m.mmio.read(self.bar + T.ISR, 1)

    def device_config(self, off: int, size: int) -> int:
        return self.m.mmio.read(self.bar + T.DEVICE_CFG + off, size)
