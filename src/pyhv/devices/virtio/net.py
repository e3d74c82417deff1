"""virtio-net (virtio 1.1, 5.1 "Network Device"): the guest's NIC, on the shared virtio
PCI transport (transport.py, device.py), moving frames to and from a network back end.

Device: type 1, PCI class 0x020000 (Ethernet), queues 0 (receiveq) and 1 (transmitq),
256 entries each. Features offered: MAC (5: the config's address), STATUS (16: link
state in the config, a config interrupt when it changes), MRG_RXBUF (15: one frame may
span several receive buffers). No checksum or segmentation offloads (they are optional):
the guest sends complete frames with their checksums, up to its MTU (65535 at most: Linux
allows it without the MTU feature), and every frame the back end delivers, up to 65550
bytes, reaches the guest.

Config space (5.1.4), little-endian: mac[6] | status u16 (bit 0 LINK_UP) |
max_virtqueue_pairs u16 (1). Read-only: a driver write is ignored.

Every buffer starts with the 12-byte virtio_net_hdr of VERSION_1 (flags, gso_type,
hdr_len, gso_size, csum_start, csum_offset, num_buffers). Transmit: the header is read
and skipped (no offload was offered, so its fields carry nothing pyhv must do), the rest
of the chain is the frame. Receive: the header is all zero but num_buffers (the number
of buffers the frame spans; 1 without MRG_RXBUF).

The back end (`port`) is anything with the shape of pyhv.net.backend.NetBackend's
interface (`NetPort` below); the device does not import pyhv.net (devices stay free of
the layers above them), `pyhv run` wires the two.

Threads: the back end's I/O thread only calls `_from_io*`, which post work to the
run-loop thread (ctx.post, which also kicks the vCPU); everything else runs on the
run-loop thread. Transmit happens on the run-loop thread when the driver notifies queue
1: `port.send` never blocks; while `port.writable` is False the device leaves the chains
in the queue (flow control) and resumes when the back end calls `on_writable`. Receive
runs when the back end has frames (notify) or the driver adds buffers (queue 0 notify).

Hostile driver (every rule of the transport's queue walk holds: loops, addresses outside
RAM, ...; those put the device in NEEDS_RESET): a transmit chain with device-writable
buffers or a receive chain with device-readable ones puts the device in NEEDS_RESET
(ctx.fail); a transmit chain shorter than the header plus 14 bytes or longer than the
header plus the back end's max_frame is dropped, counted in `stats.tx_bad`, and returned;
without MRG_RXBUF a receive chain too small for a frame costs the frame (counted in
`stats.rx_too_small`), never the chain. Memory is bounded: one pending frame and at most
a queue's worth of popped receive chains (a driver that makes more available without
getting them back, re-using heads, is NEEDS_RESET).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Protocol

from pyhv.devices.state import Reader
from pyhv.devices.virtio.device import VirtioContext, VirtioDevice
from pyhv.devices.virtio.queue import Chain, read_buffers, write_buffers
from pyhv.errors import StateError
from pyhv.memory import GuestMemory

DEVICE_TYPE = 1
F_MAC = 1 << 5
F_MRG_RXBUF = 1 << 15
F_STATUS = 1 << 16
S_LINK_UP = 1
HDR = 12
MIN_FRAME = 14
RX, TX = 0, 1
QUEUE_SIZE = 256


class NetPort(Protocol):
    """What the device needs of a network back end (pyhv.net.backend.NetBackend)."""

    max_frame: int

    def start(self, notify: Callable[[], None] | None = None,
              on_link: Callable[[bool], None] | None = None,
              on_writable: Callable[[], None] | None = None) -> None: ...

    def send(self, frame: bytes | bytearray | memoryview) -> bool: ...

    def recv(self) -> bytes | None: ...

    @property
    def writable(self) -> bool: ...

    @property
    def link_up(self) -> bool: ...

    def close(self) -> None: ...


@dataclass
class NicStats:
    tx_frames: int = 0
    tx_bad: int = 0             # transmit chains of impossible length: dropped
    tx_refused: int = 0         # the back end dropped them (link down, out of room)
    rx_frames: int = 0
    rx_too_small: int = 0       # no MRG_RXBUF and a buffer too small: the frame dropped
    rx_reset_dropped: int = 0   # a frame pending when the driver reset the device

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class VirtioNet(VirtioDevice):
    device_type = DEVICE_TYPE
    pci_class = 0x020000
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    features = F_MAC | F_STATUS | F_MRG_RXBUF
    name = "virtio-net"

    def __init__(self, port: NetPort, mac: bytes) -> None:
        super().__init__()
        if len(mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        self.port = port
        self.mac = bytes(mac)
        self.stats = NicStats()
        self.config = bytearray(self.mac + struct.pack("<HH", 0, 1))
        self._ctx: VirtioContext | None = None
        self._mrg = False
        self._frame: bytes | None = None          # taken from the port, not delivered yet
        self._chains: list[Chain] = []            # popped receive chains, not used yet
        self._rx_posted = False
        self._tx_posted = False
        self._started = False

    def start(self) -> None:
        """Start the back end (its I/O thread); the machine calls this once."""
        if not self._started:
            self._started = True
            self.port.start(self._from_io_rx, self._from_io_link, self._from_io_tx)
        self._set_link_bytes(self.port.link_up)

    # ------------------------------------------------------------------ transport side

    def activate(self, ctx: VirtioContext) -> None:
        self._ctx = ctx
        self._mrg = bool(ctx.features & F_MRG_RXBUF)
        self._set_link_bytes(self.port.link_up)
        self._rx()

    def queue_notify(self, index: int) -> None:
        if index == RX:
            self._rx()
        elif index == TX:
            self._tx()

    def reset(self) -> None:
        self._ctx = None
        self._rx_posted = self._tx_posted = False   # posts of the old epoch are dropped
        self._chains.clear()
        if self._frame is not None:
            self._frame = None
            self.stats.rx_reset_dropped += 1

    def close(self) -> None:
        self.reset()
        self.port.close()

    # ------------------------------------------------------------------ state records

    def save_device(self) -> dict[str, Any]:
        """The MAC, a frame taken from the back end but not yet delivered, and the
        receive chains popped for it (as buffers: loading reads no guest memory)."""
        return {"mac": self.mac.hex(),
                "frame": self._frame.hex() if self._frame is not None else None,
                "chains": [{"head": c.head, "writable": [list(b) for b in c.writable]}
                           for c in self._chains]}

    def read_device(self, r: Reader, memory: GuestMemory) -> Callable[[], None]:
        mac = r.hex("mac", length=6)
        frame = r.opt_hex_max("frame", max_len=self.port.max_frame)
        raw = r.subs_list("chains", max_len=QUEUE_SIZE)
        r.done()
        if mac != self.mac:
            raise StateError(f"virtio-net: the snapshot's MAC {mac.hex(':')} is not this "
                             f"NIC's {self.mac.hex(':')}")
        chains: list[Chain] = []
        for i, c in enumerate(raw):
            cr = Reader(f"virtio-net.chains[{i}]", c)
            chain = Chain(cr.int("head", 0, QUEUE_SIZE - 1))
            for j, buf in enumerate(cr.subs_list("writable", max_len=QUEUE_SIZE)):
                if not (isinstance(buf, list) and len(buf) == 2
                        and all(type(x) is int and x >= 0 for x in buf)
                        and memory.contains(buf[0], buf[1])):
                    raise cr.fail("writable", f"[{j}] is not an [address, length] pair "
                                  "inside guest RAM")
                chain.writable.append((buf[0], buf[1]))
            cr.done()
            chains.append(chain)

        def take() -> None:
            self._frame = frame
            self._chains = chains
        return take

    def resume(self, ctx: VirtioContext) -> None:
        self._ctx = ctx
        self._mrg = bool(ctx.features & F_MRG_RXBUF)
        self._set_link_bytes(self.port.link_up)
        self._rx_posted = self._tx_posted = False

    # ------------------------------------------------------------------ I/O thread side

    def _from_io_rx(self) -> None:
        ctx = self._ctx
        if ctx is not None and not self._rx_posted:
            self._rx_posted = True
            ctx.post(self._rx)

    def _from_io_tx(self) -> None:
        ctx = self._ctx
        if ctx is not None and not self._tx_posted:
            self._tx_posted = True
            ctx.post(self._tx)

    def _from_io_link(self, up: bool) -> None:
        self._set_link_bytes(up)
        ctx = self._ctx
        if ctx is not None:
            ctx.post(self._link_changed)

    def _set_link_bytes(self, up: bool) -> None:
        self.config[6:8] = struct.pack("<H", S_LINK_UP if up else 0)

    def _link_changed(self) -> None:
        ctx = self._ctx
        if ctx is not None and ctx.features & F_STATUS:
            ctx.config_changed()

    # ------------------------------------------------------------------ transmit

    def _tx(self) -> None:
        self._tx_posted = False
        ctx = self._ctx
        if ctx is None:
            return
        port, st, mem = self.port, self.stats, ctx.memory
        limit = HDR + port.max_frame
        while port.writable:
            chain = ctx.pop(TX)
            if chain is None:
                return
            if chain.writable:
                ctx.fail("virtio-net: a transmit chain has device-writable buffers")
                return
            n = chain.readable_len
            if n < HDR + MIN_FRAME or n > limit:
                st.tx_bad += 1
            else:
                data = read_buffers(mem, chain.readable, n)
                if port.send(memoryview(data)[HDR:]):
                    st.tx_frames += 1
                else:
                    st.tx_refused += 1
            ctx.complete(TX, chain.head, 0)

    # ------------------------------------------------------------------ receive

    def _rx(self) -> None:
        self._rx_posted = False
        ctx = self._ctx
        if ctx is None:
            return
        while True:
            frame = self._frame
            if frame is None:
                frame = self.port.recv()
                if frame is None:
                    return
                self._frame = frame
            need = HDR + len(frame)
            have = sum(c.writable_len for c in self._chains)
            while have < need and (self._mrg or not self._chains):
                chain = ctx.pop(RX)
                if chain is None:
                    return                       # wait for buffers (queue 0 notify)
                if chain.readable or not chain.writable:
                    ctx.fail("virtio-net: a receive chain has device-readable buffers "
                             "or none the device can write")
                    return
                self._chains.append(chain)
                have += chain.writable_len
                if len(self._chains) > ctx.queue(RX).size:
                    # more buffers held than the ring has entries: the driver re-made
                    # available chains the device never returned
                    ctx.fail("virtio-net: more receive buffers in flight than the queue "
                             "holds")
                    self._chains.clear()
                    return
            if have < need:                      # no MRG_RXBUF: one buffer, too small
                self.stats.rx_too_small += 1     # lose the frame, keep the buffer
                self._frame = None
                continue
            self._deliver(ctx, frame)

    def _deliver(self, ctx: VirtioContext, frame: bytes) -> None:
        chains, self._chains = self._chains, []
        data = bytes(10) + struct.pack("<H", len(chains)) + frame
        off = 0
        for chain in chains:
            n = write_buffers(ctx.memory, chain.writable, data[off:off + chain.writable_len])
            off += n
            ctx.complete(RX, chain.head, n)
        self._frame = None
        self.stats.rx_frames += 1
