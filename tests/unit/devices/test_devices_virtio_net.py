"""virtio-net through the PCI transport, driven by the test driver, on a real back end:
a StreamBackend on one end of a socketpair, a second one on the other end playing the
network. Every frame size up to MAX_FRAME both ways, with and without MRG_RXBUF; link
state; flow control; every bad chain a guest can make ends in a dropped frame or
NEEDS_RESET, never an exception."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from virtio_driver import Driver, TestMachine

from pyhv.devices.virtio import net as N
from pyhv.devices.virtio import transport as T
from pyhv.net.framing import MAX_FRAME
from pyhv.net.stream import StreamBackend

MAC = bytes.fromhex("525400123456")
SIZES = (14, 60, 1514, 9014, 65536, MAX_FRAME)


def frame(n: int, tag: int) -> bytes:
    return b"\xff" * 6 + MAC + b"\x88\xb5" + bytes((tag * 7 + i) & 0xFF for i in range(n - 14))


class Nic:
    def __init__(self, features: int | None = None, rx_size: int = 256,
                 rx_bytes: int = 0x200000, tx_size: int = 64, tx_bytes: int = 0x100000
                 ) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.peer = StreamBackend.adopt(b, "test network")
        self.peer.start()
        self.m = TestMachine(ram=32 << 20)
        self.dev = N.VirtioNet(StreamBackend.adopt(a, "nic"), MAC)
        self.dev.start()
        self.slot, self.fn = self.m.add(self.dev)
        self.d = Driver(self.m, self.slot)
        assert self.d.init(features)
        self.rxq = self.d.setup_queue(0, rx_size, data_bytes=rx_bytes)
        self.txq = self.d.setup_queue(1, tx_size, data_bytes=tx_bytes)
        self.d.driver_ok()

    def pump(self, until: Callable[[], bool], timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while True:
            self.m.deferred.run_pending()
            if until():
                return
            assert time.monotonic() < end, "timed out"
            time.sleep(0.001)

    def close(self) -> None:
        self.fn.close()
        self.peer.close()
        self.m.close()

    @property
    def needs_reset(self) -> bool:
        return bool(self.d.status & T.S_NEEDS_RESET)


@pytest.fixture
def nic() -> Iterator[Nic]:
    n = Nic()
    yield n
    n.close()


def _hdr(num_buffers: int = 0) -> bytes:
    return bytes(10) + struct.pack("<H", num_buffers)


def _peer_frame(n: Nic) -> bytes:
    got: list[bytes] = []

    def have() -> bool:
        f = n.peer.recv()
        if f is not None:
            got.append(f)
        return bool(got)
    n.pump(have)
    return got[0]


def test_config_and_features(nic: Nic) -> None:
    assert bytes(nic.d.device_config(i, 1) for i in range(6)) == MAC
    assert nic.d.device_config(6, 2) == N.S_LINK_UP
    assert nic.d.device_config(8, 2) == 1
    f = nic.d.device_features()
    assert f & N.F_MAC and f & N.F_STATUS and f & N.F_MRG_RXBUF
    assert nic.m.cfg_read(nic.slot, 0x08) >> 8 == 0x020000        # network controller


def test_transmit_every_size(nic: Nic) -> None:
    for n in SIZES:
        f = frame(n, n)
        # header and frame in separate buffers, the frame itself cut in two (Linux does)
        nic.txq.add([(_hdr(), False), (f[:n // 2], False), (f[n // 2:], False)])
        nic.d.notify(1)
        assert _peer_frame(nic) == f
        assert nic.txq.take_used()
    f = frame(1514, 1)
    nic.txq.add([(_hdr() + f, False)], indirect=True)
    nic.d.notify(1)
    assert _peer_frame(nic) == f
    assert nic.dev.stats.tx_frames == len(SIZES) + 1 and not nic.needs_reset


def _receive(n: Nic, count: int) -> list[bytes]:
    """Frames the guest got: reassembled from used buffers by num_buffers."""
    out: list[bytes] = []
    used: list[tuple[int, int]] = []
    addr_of: dict[int, int] = n._addrs  # type: ignore[attr-defined]

    def done() -> bool:
        used.extend(n.rxq.take_used())
        while used:
            head, length = used[0]
            first = n.m.memory.read(addr_of[head], length)
            k = struct.unpack_from("<H", first, 10)[0]
            if len(used) < k:
                return False
            data = bytearray(first[12:])
            for h, ln in used[1:k]:
                data += n.m.memory.read(addr_of[h], ln)
            del used[:k]
            out.append(bytes(data))
        return len(out) >= count
    n.pump(done)
    return out


def _post_rx(n: Nic, count: int, size: int) -> None:
    addrs = getattr(n, "_addrs", {})
    for _ in range(count):
        head, (a,) = n.rxq.add([(size, True)])
        addrs[head] = a
    n._addrs = addrs  # type: ignore[attr-defined]
    n.d.notify(0)


def test_receive_every_size_merged_buffers(nic: Nic) -> None:
    _post_rx(nic, 200, 1526)                       # what Linux posts with MRG_RXBUF
    for n in SIZES:
        f = frame(n, n)
        assert nic.peer.send(f)
        assert _receive(nic, 1) == [f]
        _post_rx(nic, (12 + n + 1525) // 1526, 1526)      # refill, as the driver does
    assert nic.dev.stats.rx_frames == len(SIZES) and not nic.needs_reset


def test_receive_waits_for_buffers_and_loses_nothing(nic: Nic) -> None:
    frames = [frame(1000 + i, i) for i in range(20)]
    for f in frames:
        assert nic.peer.send(f)
    time.sleep(0.2)
    nic.m.deferred.run_pending()
    got: list[bytes] = []
    for _ in range(20):                            # one buffer at a time
        _post_rx(nic, 1, 1100)
        got += _receive(nic, 1)
    assert got == frames


def test_receive_without_merged_buffers() -> None:
    """One buffer per frame: a buffer too small for a frame costs the frame, not the
    buffer (it takes the next frame that fits)."""
    n = Nic(features=(1 << 32) | N.F_MAC | N.F_STATUS)
    try:
        _post_rx(n, 1, 100)
        _post_rx(n, 1, 12 + MAX_FRAME)
        big, small = frame(MAX_FRAME, 1), frame(60, 2)
        n.peer.send(big)
        n.peer.send(small)
        assert _receive(n, 1) == [small]               # into the 100-byte buffer
        assert n.dev.stats.rx_too_small == 1
        n.peer.send(big)
        assert _receive(n, 1) == [big]                 # into the big one
        assert not n.needs_reset
    finally:
        n.close()


def test_link_down_is_a_config_change(nic: Nic) -> None:
    nic.d.isr()                                      # read-to-clear
    nic.peer.close()                                 # the network goes away
    nic.pump(lambda: nic.d.device_config(6, 2) == 0)
    nic.pump(lambda: bool(nic.d.isr() & 2))          # ISR bit 1: configuration change
    assert not nic.needs_reset


def test_peer_not_reading_holds_transmits_in_the_queue() -> None:
    """Flow control: while the back end has no room, chains stay available (not dropped,
    not completed); when the network reads again, they all go, in order."""
    nic = Nic(tx_size=256, tx_bytes=12 << 20)
    try:
        _not_reading(nic)
    finally:
        nic.close()


def _not_reading(nic: Nic) -> None:
    peer_sock = nic.peer._sock
    assert peer_sock is not None
    nic.peer._closing = True                         # stop the peer's reader...
    nic.peer._wake()
    assert nic.peer._thread is not None
    nic.peer._thread.join(5)
    f = frame(MAX_FRAME, 3)
    sent = 0
    for _ in range(170):                             # 11 MB: more than the socket buffer
        if not nic.txq.free:                         # and the back end's queue take
            break
        nic.txq.add([(_hdr() + f, False)])
        sent += 1
        nic.d.notify(1)
        nic.m.deferred.run_pending()
    assert nic.dev.stats.tx_refused == 0             # nothing dropped: held back instead
    assert not nic.dev.port.writable
    held = sent - nic.dev.stats.tx_frames
    assert held > 0
    from pyhv.net.framing import Deframer
    d = Deframer()
    got = 0
    peer_sock.setblocking(True)
    peer_sock.settimeout(0.05)
    end = time.monotonic() + 30
    while got < sent and time.monotonic() < end:     # the network reads again
        with contextlib.suppress(TimeoutError):
            got += len(d.feed(peer_sock.recv(1 << 20)))
        nic.m.deferred.run_pending()
    assert got == sent and nic.dev.stats.tx_frames == sent


@given(st.lists(st.tuples(st.integers(0, 70000), st.booleans()), min_size=1, max_size=5),
       st.integers(0, 1))
def test_hostile_chains_never_raise(bufs: list[tuple[int, bool]], queue: int) -> None:
    """Any mix of readable/writable buffers of any length on either queue: the frame is
    sent, dropped and counted, or the device needs a reset; never an exception."""
    n = Nic(rx_bytes=0x80000)
    try:
        q = n.rxq if queue == 0 else n.txq
        total = sum(ln for ln, _ in bufs)
        if total > 0x70000:
            return
        chain: list[tuple[bytes | int, bool]] = [
            ((ln if w else bytes(ln)), w) for ln, w in bufs]
        q.add(chain)
        n.d.notify(queue)
        if queue == 0:
            n.peer.send(frame(60, 1))
        time.sleep(0.01)
        n.m.deferred.run_pending()
        readable = [ln for ln, w in bufs if not w]
        writable = [ln for ln, w in bufs if w]
        if queue == 1:
            bad_mix = any(ln for ln in writable)
            if bad_mix:
                assert n.needs_reset
            elif not 26 <= sum(readable) <= 12 + MAX_FRAME:
                assert n.dev.stats.tx_bad == 1 and q.take_used()
        else:
            if any(readable) or not any(writable):
                n.pump(lambda: n.needs_reset)
    finally:
        n.close()


def test_reset_then_reuse(nic: Nic) -> None:
    nic.txq.add([(_hdr(), False), (4, True)])        # writable buffer on transmit
    nic.d.notify(1)
    assert nic.needs_reset
    assert nic.d.init()                               # the driver resets and starts over
    nic.rxq = nic.d.setup_queue(0, 64)
    nic.txq = nic.d.setup_queue(1, 64)
    nic.d.driver_ok()
    f = frame(60, 9)
    nic.txq.add([(_hdr() + f, False)])
    nic.d.notify(1)
    assert _peer_frame(nic) == f


def test_receive_buffers_republished_without_return_is_needs_reset() -> None:
    """A driver that keeps re-publishing a 1-byte receive buffer the device still holds
    cannot make the device hold more chains than the ring has entries."""
    n = Nic(rx_size=8)
    try:
        head, _ = n.rxq.add([(1, True)])
        for _ in range(7):
            n.rxq.publish(head)
        n.d.notify(0)
        n.peer.send(frame(60, 1))
        n.pump(lambda: n.dev._frame is not None and len(n.dev._chains) == 8)
        assert not n.needs_reset
        for _ in range(8):
            n.rxq.publish(head)
        n.d.notify(0)
        assert n.needs_reset and not n.dev._chains
    finally:
        n.close()
