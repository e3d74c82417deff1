"""The device side of virtio: what a virtio device (blk, rng, net) implements, and what
the transport offers it. This is the whole interface between a device and pyhv's
virtio PCI transport (transport.py); a new device needs nothing else.

A device subclasses `VirtioDevice` and sets, as class or instance attributes:

    device_type   the virtio device ID (1 net, 2 block, 4 entropy); the PCI device ID is
                  0x1040 + device_type (a modern, non-transitional device)
    pci_class     PCI class code (e.g. 0x010000 storage, 0x020000 network)
    queue_sizes   the maximum size of each virtqueue (powers of two), by queue index
    features      the device-specific feature bits it offers (bits 0-23); the transport
                  adds VERSION_1, INDIRECT_DESC and EVENT_IDX and handles them itself
    config        a bytearray: the device configuration space, read by the driver at
                  any width and offset (bytes outside it read as zero)

and overrides what it needs of:

    config_write(offset, data)  a driver write into `config` (default: ignored, read-only)
    activate(ctx)               the driver set DRIVER_OK; `ctx` (a `VirtioContext`) is the
                                device's handle until `reset()`
    queue_notify(index)         the driver made buffers available on queue `index`
                                (only after activate, only for enabled, healthy queues)
    reset()                     the driver reset the device (or the machine ends it): stop,
                                and make sure no completion of the old requests arrives
                                after this returns
    close()                     the machine is closing: finish or abandon in-flight work
                                (a block device completes its writes and flushes)

`VirtioContext` (given to `activate`) is all a device uses, on the run-loop thread:

    ctx.memory                  GuestMemory (bounds-checked, any thread may use it)
    ctx.features                the negotiated feature bits
    ctx.queue(index)            the `Virtqueue`: pop() chains, push(head, written)
    ctx.pop(index) -> Chain|None   pop with error handling: a broken queue puts the
                                device in DEVICE_NEEDS_RESET and returns None from then on
    ctx.complete(index, head, written)  push a used element and interrupt the driver if
                                it asked for it (event index / NO_INTERRUPT honoured)
    ctx.fail(reason)            DEVICE_NEEDS_RESET (the driver must reset the device)
    ctx.config_changed()        the config space changed: bump the generation, interrupt
    ctx.post(fn)                any thread: run fn() on the run-loop thread soon (how an
                                I/O thread hands a finished request back); fn is dropped
                                when the device was reset since `activate`

Threading rules: everything above except `ctx.post` and `ctx.memory` is run-loop thread
only; a device doing I/O elsewhere copies what it needs out of the `Chain` (plain data)
and comes back with `ctx.post`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyhv.devices.state import Reader

if TYPE_CHECKING:
    from pyhv.devices.virtio.queue import Chain, Virtqueue
    from pyhv.memory import GuestMemory


class VirtioContext:
    """What the transport offers an activated device (see the module docstring)."""

    memory: GuestMemory
    features: int

    def queue(self, index: int) -> Virtqueue:
        raise NotImplementedError

    def pop(self, index: int) -> Chain | None:
        raise NotImplementedError

    def complete(self, index: int, head: int, written: int) -> None:
        raise NotImplementedError

    def fail(self, reason: str) -> None:
        raise NotImplementedError

    def config_changed(self) -> None:
        raise NotImplementedError

    def post(self, fn: Callable[[], None]) -> None:
        raise NotImplementedError


class VirtioDevice:
    """Base class of virtio devices (see the module docstring)."""

    device_type = 0
    pci_class = 0xFF0000
    queue_sizes: tuple[int, ...] = ()
    features = 0
    name = "virtio"

    def __init__(self) -> None:
        self.config = bytearray()

    def config_write(self, offset: int, data: bytes) -> None:
        """A driver write into the device config space (default: read-only)."""

    def activate(self, ctx: VirtioContext) -> None:
        """DRIVER_OK: start serving the queues through `ctx`."""

    def queue_notify(self, index: int) -> None:
        """Buffers are available on queue `index`."""

    def reset(self) -> None:
        """Stop; no completion of earlier requests may arrive after this returns."""

    def close(self) -> None:
        """The machine is closing."""
        self.reset()

    # ---------------------------------------------------------------- state records
    # (the transport's record carries the device's: pyhv.devices.state)

    state_version: int = 1

    def quiesce(self) -> None:
        """Finish in-flight work (its completions are posted to the run loop), so a
        record taken next holds no half-done request."""

    def save_device(self) -> dict[str, Any]:
        """The device's own state beyond the transport's (default: none)."""
        return {}

    def read_device(self, r: Reader, memory: GuestMemory) -> Callable[[], None]:
        """Check the device's record (`r.done()` included; guest buffers it names must
        lie in `memory`) and return what takes it."""
        r.done()
        return lambda: None

    def resume(self, ctx: VirtioContext) -> None:
        """An active device's context after its record was loaded (default: as at
        DRIVER_OK; a device whose activate does I/O overrides it)."""
        self.activate(ctx)
