"""virtio-rng (virtio 1.1, 5.4 "Entropy Device"): random bytes from the host's getrandom.

One request queue; no configuration space, no device features. The driver makes
device-writable buffers available; the device fills them from `os.getrandom` (the host
kernel's CSPRNG, never blocking once the host has booted) and returns each with the
number of bytes written.

Design: served on the run-loop thread at the notify (getrandom is fast and bounded: at
most MAX_REQUEST bytes per buffer chain, at most the queue size chains per notify), so
the guest's crng is seeded as soon as its driver asks. Device-readable buffers in a
chain are ignored (the spec has none); a chain with no writable buffer is returned
with 0 bytes.
"""

from __future__ import annotations

import os

from pyhv.devices.virtio.device import VirtioContext, VirtioDevice
from pyhv.devices.virtio.queue import write_buffers

QUEUE_SIZE = 64
MAX_REQUEST = 64 << 10


class VirtioRng(VirtioDevice):
    device_type = 4
    pci_class = 0xFF0000           # "other" (as QEMU's virtio-rng-pci)
    queue_sizes = (QUEUE_SIZE,)
    name = "virtio-rng"

    def __init__(self) -> None:
        super().__init__()
        self.ctx: VirtioContext | None = None
        self.bytes_given = 0

    def activate(self, ctx: VirtioContext) -> None:
        self.ctx = ctx

    def queue_notify(self, index: int) -> None:
        ctx = self.ctx
        if ctx is None:
            return
        while (chain := ctx.pop(index)) is not None:
            n = min(chain.writable_len, MAX_REQUEST)
            written = write_buffers(ctx.memory, chain.writable, os.getrandom(n)) if n else 0
            self.bytes_given += written
            ctx.complete(index, chain.head, written)

    def reset(self) -> None:
        self.ctx = None
