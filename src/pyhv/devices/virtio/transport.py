"""The virtio 1.x PCI transport ("modern" device, virtio 1.1 section 4.1), shared by
every virtio device pyhv has (blk, rng, and net on the same interface: device.py).

PCI identity: vendor 0x1af4, device 0x1040 + virtio device type, revision 1 (modern
only, no legacy I/O BAR), subsystem 0x1af4 / 0x1100, interrupt pin INTA.

One 32-bit memory BAR (BAR 0, 16 KiB) holds the four structures, each announced by a
vendor-specific capability (cap ID 0x09: cap_len, cfg_type, bar, id, offset, length;
the notify one adds notify_off_multiplier):

    0x0000  common configuration (cfg_type 1)  the registers below
    0x1000  ISR status (cfg_type 3)            bit 0 queue interrupt, bit 1 config change;
                                               a read returns and clears it (and INTx)
    0x2000  device configuration (cfg_type 4)  the device's `config` bytes
    0x3000  notifications (cfg_type 2)         queue q at 0x3000 + 4 * q (multiplier 4)

    common configuration:
    0x00 device_feature_select u32   0x04 device_feature u32 (ro)
    0x08 driver_feature_select u32   0x0c driver_feature u32
    0x10 config_msix_vector u16      0x12 num_queues u16 (ro)
    0x14 device_status u8            0x15 config_generation u8 (ro)
    0x16 queue_select u16            0x18 queue_size u16
    0x1a queue_msix_vector u16       0x1c queue_enable u16
    0x1e queue_notify_off u16 (ro)   0x20 queue_desc u64
    0x28 queue_driver u64            0x30 queue_device u64
    0x38 queue_notify_data u16 (ro)  0x3a queue_reset u16 (not offered: reads 0)

A fifth capability (cfg_type 5, "PCI configuration access") is a window onto BAR 0 for
drivers that cannot map it: the driver writes bar (0), offset and length (1, 2 or 4,
offset aligned to it) in the capability, and a read of its pci_cfg_data performs that BAR
read, a write performs that BAR write. A window naming anything else does nothing.

Every register is reached at any width and alignment: a read assembles the bytes of
the fields it covers, a write merges its bytes into each field it touches and applies
that field's rule, so an odd-width or straddling access means what its bytes mean.

Feature negotiation (3.1.1): the transport offers VERSION_1, RING_INDIRECT_DESC and
RING_EVENT_IDX on top of the device's bits; driver features are taken only before
FEATURES_OK, and FEATURES_OK sticks only if they are a subset of the offer and include
VERSION_1 (else the driver reads it back clear, as the spec says). DRIVER_OK activates
the device (`VirtioDevice.activate`). Writing 0 to device_status resets everything:
the device (`reset()`, which waits for in-flight I/O), every queue, features, ISR, INTx,
and bumps an epoch so completions posted by old requests are dropped.

A broken queue (queue.QueueError: loops, addresses outside RAM, a size that is not a
power of two...) or a driver that activates without FEATURES_OK sets
DEVICE_NEEDS_RESET (0x40) and raises a configuration interrupt; from then on no queue
is served until the driver resets the device. Notifications for queues that do not
exist, or are not enabled, are counted and ignored.

Interrupts go through `self.interrupt(isr_bit, msix_vector)`. With MSI-X disabled (the
reset state) that sets the ISR bit and raises the function's INTx line. MSI-X
(devices/pci/msix.py): one vector per queue plus one for configuration changes, the
table at offset 0 and the PBA at 0x800 of BAR 1 (4 KiB), as QEMU's virtio-pci lays them
out; once the driver enables it, an interrupt is the message of the vector the driver
chose (config_msix_vector, queue_msix_vector), and NO_VECTOR (0xffff) means no
interrupt, neither ISR nor INTx (virtio 1.1, 4.1.4.3 / 4.1.5.1.2). A vector number the
function does not have reads back as NO_VECTOR (the spec's "could not be allocated",
as QEMU does). The messages go to the machine's APIC bus (`attach_msi`).

Threading: run-loop thread only, except `VirtioContext.post`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pyhv.devices.deferred import DeferredCalls
from pyhv.devices.pci import config as C
from pyhv.devices.pci.function import PciFunction
from pyhv.devices.pci.msix import MsiSink, Msix
from pyhv.devices.state import Reader, check_version
from pyhv.devices.virtio.device import VirtioContext, VirtioDevice
from pyhv.devices.virtio.queue import Chain, QueueError, Virtqueue
from pyhv.memory import GuestMemory

VIRTIO_VENDOR = 0x1AF4
VIRTIO_DEVICE_BASE = 0x1040

S_ACKNOWLEDGE = 1
S_DRIVER = 2
S_DRIVER_OK = 4
S_FEATURES_OK = 8
S_NEEDS_RESET = 0x40
S_FAILED = 0x80

F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32
TRANSPORT_FEATURES = F_INDIRECT_DESC | F_EVENT_IDX | F_VERSION_1

ISR_QUEUE = 1
ISR_CONFIG = 2
NO_VECTOR = 0xFFFF

BAR_SIZE = 0x4000
MSIX_BAR, MSIX_BAR_SIZE = 1, 0x1000
COMMON, ISR, DEVICE_CFG, NOTIFY = 0x0000, 0x1000, 0x2000, 0x3000
REGION = 0x1000
NOTIFY_MULTIPLIER = 4
CFG_COMMON, CFG_NOTIFY, CFG_ISR, CFG_DEVICE, CFG_PCI = 1, 2, 3, 4, 5

# (offset, size, name) of the common configuration's fields
FIELDS = ((0x00, 4, "dfselect"), (0x04, 4, "dfeature"), (0x08, 4, "gfselect"),
          (0x0C, 4, "gfeature"), (0x10, 2, "msix_config"), (0x12, 2, "num_queues"),
          (0x14, 1, "status"), (0x15, 1, "generation"), (0x16, 2, "qselect"),
          (0x18, 2, "qsize"), (0x1A, 2, "qmsix"), (0x1C, 2, "qenable"),
          (0x1E, 2, "qnotify_off"), (0x20, 8, "qdesc"), (0x28, 8, "qdriver"),
          (0x30, 8, "qdevice"), (0x38, 2, "qnotify_data"), (0x3A, 2, "qreset"))
COMMON_SIZE = 0x3C


class _Context(VirtioContext):
    def __init__(self, t: VirtioPciFunction, epoch: int) -> None:
        self._t = t
        self._epoch = epoch
        self.memory = t.memory
        self.features = t.driver_features

    def queue(self, index: int) -> Virtqueue:
        return self._t.queues[index]

    def pop(self, index: int) -> Chain | None:
        t = self._t
        if t.status & S_NEEDS_RESET or self._epoch != t.epoch:
            return None
        q = t.queues[index]
        try:
            return q.pop()
        except QueueError as e:
            t.fail(str(e))
            return None

    def complete(self, index: int, head: int, written: int) -> None:
        t = self._t
        if self._epoch != t.epoch:
            return
        q = t.queues[index]
        try:
            q.push(head, written)
            if q.should_notify():
                t.interrupt(ISR_QUEUE, q.msix_vector)
        except QueueError as e:
            t.fail(str(e))

    def fail(self, reason: str) -> None:
        if self._epoch == self._t.epoch:
            self._t.fail(reason)

    def config_changed(self) -> None:
        if self._epoch == self._t.epoch:
            self._t.config_changed()

    def post(self, fn: Callable[[], None]) -> None:
        t, epoch = self._t, self._epoch

        def run() -> None:
            if t.epoch == epoch:
                fn()
        t.deferred.post(run)


class _Bar:
    """BAR 0's bus device: dispatches by offset to the four structures."""

    def __init__(self, t: VirtioPciFunction) -> None:
        self._t = t

    def read(self, offset: int, size: int) -> int:
        t = self._t
        region, off = offset & ~(REGION - 1), offset & (REGION - 1)
        if region == COMMON:
            return t.common_read(off, size)
        if region == ISR:
            return t.isr_read() if off == 0 else 0
        if region == DEVICE_CFG:
            data = bytes(t.device.config[off:off + size])
            return int.from_bytes(data.ljust(size, b"\0"), "little")
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        t = self._t
        region, off = offset & ~(REGION - 1), offset & (REGION - 1)
        if region == COMMON:
            t.common_write(off, size, value)
        elif region == DEVICE_CFG:
            if off < len(t.device.config):
                t.device.config_write(off, value.to_bytes(size, "little"))
        elif region == NOTIFY:
            t.notify(off // NOTIFY_MULTIPLIER if off % NOTIFY_MULTIPLIER == 0 else -1)


class VirtioPciFunction(PciFunction):
    """A virtio device on PCI (see the module docstring)."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory,
                 deferred: DeferredCalls) -> None:
        super().__init__(vendor=VIRTIO_VENDOR, device=VIRTIO_DEVICE_BASE + device.device_type,
                         class_code=device.pci_class, revision=1,
                         subsys_vendor=VIRTIO_VENDOR, subsys_id=0x1100, interrupt_pin=1,
                         name=device.name)
        self.device = device
        self.memory = memory
        self.deferred = deferred
        self.queues = [Virtqueue(i, n, memory) for i, n in enumerate(device.queue_sizes)]
        self.device_features = device.features | TRANSPORT_FEATURES
        self.interrupt: Callable[[int, int], None] = self._interrupt
        self.epoch = 0
        self.ignored_notifies = 0
        self.failures: list[str] = []          # reasons for NEEDS_RESET (last few)
        self.add_bar(0, BAR_SIZE, _Bar(self), name=f"{device.name} virtio")
        for cfg_type, offset, length, extra in (
                (CFG_COMMON, COMMON, COMMON_SIZE, b""),
                (CFG_NOTIFY, NOTIFY, NOTIFY_MULTIPLIER * max(1, len(self.queues)),
                 NOTIFY_MULTIPLIER.to_bytes(4, "little")),
                (CFG_ISR, ISR, 1, b""),
                (CFG_DEVICE, DEVICE_CFG, max(1, len(device.config)), b"")):
            body = bytes([16 + len(extra), cfg_type, 0, 0, 0, 0]) \
                + offset.to_bytes(4, "little") + length.to_bytes(4, "little") + extra
            self.config.add_capability(C.CAP_ID_VENDOR, body)
        # the PCI configuration access window (cfg_type 5): bar, offset, length and
        # pci_cfg_data are the driver's to write
        self._bar = self.bars[0].handler
        self._window = self.config.add_capability(
            C.CAP_ID_VENDOR, bytes([20, CFG_PCI, 0, 0, 0, 0]) + bytes(12),
            wmask=bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 12)
        self.msix = Msix(self.config, len(self.queues) + 1, MSIX_BAR)
        self.add_bar(MSIX_BAR, MSIX_BAR_SIZE, self.msix, name=f"{device.name} MSI-X")
        self._reset_state()

    def attach_msi(self, sink: MsiSink) -> None:
        """Where MSI-X messages go (the machine's APIC bus)."""
        self.msix.sink = sink

    def _reset_state(self) -> None:
        self.status = 0
        self.dfselect = 0
        self.gfselect = 0
        self.driver_features = 0
        self.msix_config = NO_VECTOR
        self.generation = 0
        self.qselect = 0
        self.isr = 0
        self.active = False
        for q in self.queues:
            q.reset()
        self.set_intx(False)

    # ------------------------------------------------------------------ common config

    def _q(self) -> Virtqueue | None:
        return self.queues[self.qselect] if self.qselect < len(self.queues) else None

    def _field(self, name: str) -> int:
        q = self._q()
        if name == "dfeature":
            return (self.device_features >> (32 * self.dfselect)) & 0xFFFFFFFF \
                if self.dfselect < 2 else 0
        if name == "gfeature":
            return (self.driver_features >> (32 * self.gfselect)) & 0xFFFFFFFF \
                if self.gfselect < 2 else 0
        if name == "num_queues":
            return len(self.queues)
        if name in ("dfselect", "gfselect", "msix_config", "status", "generation",
                    "qselect"):
            return int(getattr(self, name))
        if name == "qreset":
            return 0
        if q is None:
            return 0
        return {"qsize": q.size, "qmsix": q.msix_vector, "qenable": int(q.enabled),
                "qnotify_off": q.index, "qdesc": q.desc, "qdriver": q.avail,
                "qdevice": q.used, "qnotify_data": q.index}.get(name, 0)

    def common_read(self, off: int, size: int) -> int:
        value = 0
        for f_off, f_size, name in FIELDS:
            lo, hi = max(off, f_off), min(off + size, f_off + f_size)
            if lo >= hi:
                continue
            part = (self._field(name) >> (8 * (lo - f_off))) & ((1 << (8 * (hi - lo))) - 1)
            value |= part << (8 * (lo - off))
        return value

    def common_write(self, off: int, size: int, value: int) -> None:
        for f_off, f_size, name in FIELDS:
            lo, hi = max(off, f_off), min(off + size, f_off + f_size)
            if lo >= hi:
                continue
            mask = ((1 << (8 * (hi - lo))) - 1) << (8 * (lo - f_off))
            part = ((value >> (8 * (lo - off))) << (8 * (lo - f_off))) & mask
            self._set_field(name, (self._field(name) & ~mask) | part)

    def _set_field(self, name: str, v: int) -> None:
        if name == "dfselect":
            self.dfselect = v
        elif name == "gfselect":
            self.gfselect = v
        elif name == "gfeature":
            if self.gfselect < 2 and not self.status & S_FEATURES_OK:
                shift = 32 * self.gfselect
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) \
                    | (v << shift)
        elif name == "msix_config":
            self.msix_config = self._vector(v)
        elif name == "status":
            self._set_status(v)
        elif name == "qselect":
            self.qselect = v
        else:
            q = self._q()
            if q is None:
                return
            if name == "qmsix":
                q.msix_vector = self._vector(v)
            elif q.enabled:
                return                       # a live queue's layout is fixed
            elif name == "qsize":
                q.size = v
            elif name == "qdesc":
                q.desc = v
            elif name == "qdriver":
                q.avail = v
            elif name == "qdevice":
                q.used = v
            elif name == "qenable" and v == 1:
                try:
                    q.check()
                except QueueError as e:
                    self.fail(str(e))
                    return
                q.enabled = True

    def _set_status(self, v: int) -> None:
        if v == 0:
            self.reset()
            return
        old = self.status
        new = (v & ~S_NEEDS_RESET) | (old & S_NEEDS_RESET)
        if new & S_FEATURES_OK and not old & S_FEATURES_OK:
            f = self.driver_features
            if f & ~self.device_features or not f & F_VERSION_1:
                new &= ~S_FEATURES_OK
        self.status = new
        if new & S_DRIVER_OK and not old & S_DRIVER_OK:
            if not new & S_FEATURES_OK:
                self.fail("DRIVER_OK without FEATURES_OK")
                return
            self._activate()

    def _activate(self) -> None:
        event_idx = bool(self.driver_features & F_EVENT_IDX)
        for q in self.queues:
            q.event_idx = event_idx
        self.active = True
        self.device.activate(_Context(self, self.epoch))

    # ------------------------------------------------------------------ events

    def reset(self) -> None:
        """Device reset (status 0 from the driver, or the machine's end)."""
        self.epoch += 1
        self.device.reset()
        self._reset_state()

    def notify(self, index: int) -> None:
        if not (0 <= index < len(self.queues)) or not self.active \
                or self.status & S_NEEDS_RESET or not self.queues[index].enabled:
            self.ignored_notifies += 1
            return
        self.device.queue_notify(index)

    def fail(self, reason: str) -> None:
        """DEVICE_NEEDS_RESET: stop serving queues until the driver resets the device."""
        self.failures = (self.failures + [reason])[-8:]
        if self.status & S_NEEDS_RESET:
            return
        self.status |= S_NEEDS_RESET
        if self.status & S_DRIVER_OK:
            self.interrupt(ISR_CONFIG, self.msix_config)

    def config_changed(self) -> None:
        self.generation = (self.generation + 1) & 0xFF
        if self.status & S_DRIVER_OK:
            self.interrupt(ISR_CONFIG, self.msix_config)

    # ------------------------------------------------------------------ interrupts

    def _vector(self, v: int) -> int:
        return v if v < self.msix.n else NO_VECTOR

    def _interrupt(self, isr_bit: int, vector: int) -> None:
        if not self.msix.enabled:
            self._intx_interrupt(isr_bit, vector)
        elif vector != NO_VECTOR:
            self.msix.signal(vector)

    def _intx_interrupt(self, isr_bit: int, _vector: int) -> None:
        self.isr |= isr_bit
        self.set_intx(True)

    def isr_read(self) -> int:
        value, self.isr = self.isr, 0
        self.set_intx(False)
        return value

    # ------------------------------------------------------------------ the window

    def _window_access(self) -> tuple[int, int] | None:
        """(offset, length) of the BAR access the window names, None if it names none."""
        w = self._window
        bar = self.config.get(w + 4, 1)
        off = self.config.get(w + 8, 4)
        length = self.config.get(w + 12, 4)
        if bar != 0 or length not in (1, 2, 4) or off % length or off + length > BAR_SIZE:
            return None
        return off, length

    def _touches_data(self, offset: int, size: int) -> bool:
        data = self._window + 16
        return offset < data + 4 and offset + size > data

    def config_read(self, offset: int, size: int) -> int:
        if self._touches_data(offset, size) and (acc := self._window_access()) is not None:
            value = self._bar.read(*acc)
            self.config.set(self._window + 16, acc[1], value)
        return super().config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        super().config_write(offset, size, value)
        cap = self.msix.cap
        if offset < cap + 4 and offset + size > cap + 2:
            self.msix.control_written()
            if self.msix.enabled:
                self.set_intx(False)
        if self._touches_data(offset, size) and (acc := self._window_access()) is not None:
            off, length = acc
            self._bar.write(off, length, self.config.get(self._window + 16, length))

    def close(self) -> None:
        self.epoch += 1
        self.device.close()

    # ------------------------------------------------------------------ state records

    state_version = 1
    _TRANSPORT = (("status", 0xFF), ("dfselect", 0xFFFFFFFF), ("gfselect", 0xFFFFFFFF),
                  ("msix_config", 0xFFFF), ("generation", 0xFF), ("qselect", 0xFFFF),
                  ("isr", ISR_QUEUE | ISR_CONFIG))

    def quiesce(self) -> None:
        self.device.quiesce()

    def save_state(self) -> dict[str, Any]:
        """PCI configuration, the transport's registers, every queue, the device's own
        record (its type and version inside). Taken after `quiesce()` and the run
        loop's deferred calls, so no request is half done."""
        d = super().save_state()
        d["virtio"] = {**{k: getattr(self, k) for k, _ in self._TRANSPORT},
                       "device_type": self.device.device_type,
                       "driver_features": self.driver_features, "active": self.active,
                       "queues": [q.save_state() for q in self.queues],
                       "device_version": self.device.state_version,
                       "device": self.device.save_device(),
                       "msix": self.msix.save_state()}
        return d

    def load_state(self, record: Mapping[str, Any], version: int) -> None:
        """Check everything, then reset the device (in-flight work of a running VM
        ends, its completions dropped) and take the record; an active device gets a
        new context."""
        r = Reader(f"pci {self.name}", record)
        v = r.sub("virtio")
        fields = {k: v.int(k, 0, hi) for k, hi in self._TRANSPORT}
        dtype = v.int("device_type", 0, 0xFFFF)
        if dtype != self.device.device_type:
            raise v.fail("device_type", f"= {dtype}: this slot holds a {self.device.name}")
        features = v.int("driver_features")
        if features & ~self.device_features:
            raise v.fail("driver_features", f"{features:#x} has bits this device does "
                         "not offer")
        active = v.bool("active")
        queues = [q.read_state(qr) for q, qr in
                  zip(self.queues, v.subs("queues", length=len(self.queues)), strict=True)]
        check_version(f"{self.name} device", v.int("device_version", 1, 1 << 31),
                      self.device.state_version)
        take_device = self.device.read_device(v.sub("device"), self.memory)
        msix = self.msix.read_state(v.sub("msix"))
        v.done()
        pci = self.read_pci_fields(r)
        r.done()
        self.epoch += 1                 # posts of requests before the load are dropped
        self.device.reset()
        self.take_pci_fields(pci)
        for k, val in fields.items():
            setattr(self, k, val)
        self.driver_features, self.active = features, active
        for q, qf in zip(self.queues, queues, strict=True):
            q.take_state(qf)
        self.msix.take_state(msix)
        take_device()
        if active:
            self.device.resume(_Context(self, self.epoch))
