"""The network back ends with real peers: two pyhv streams and datagrams, real QEMU
(`-netdev stream`, `socket`, `dgram` joined by a hub), real passt, a real tap.

Every size from the smallest frame to MAX_FRAME crosses unchanged; a peer that stops
reading costs drops and flow control, never a blocked sender or unbounded memory.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

import pytest
from netkit import QemuHub, frame, wait_for, wait_frame

from pyhv.errors import HostError
from pyhv.net.backend import TX_MAX_BYTES
from pyhv.net.dgram import UDP4_MAX, DgramBackend
from pyhv.net.framing import MAX_FRAME, Deframer, encode
from pyhv.net.stream import StreamBackend

SIZES = (14, 15, 60, 1514, 1518, 9014, 32768, 65507, 65536, MAX_FRAME)


def _pair(addr: str | tuple[str, int]) -> tuple[StreamBackend, StreamBackend]:
    a = StreamBackend("listen", addr)
    a.start()
    b = StreamBackend("connect", addr)
    b.start()
    wait_for(lambda: a.link_up)
    return a, b


@pytest.mark.parametrize("unix", [True, False], ids=["unix", "tcp"])
def test_stream_pair_every_size_both_ways(tmp_path: Path, unix: bool) -> None:
    from netkit import free_port
    addr: str | tuple[str, int] = (str(tmp_path / "s.sock") if unix
                                   else ("127.0.0.1", free_port()))
    a, b = _pair(addr)
    try:
        for n in SIZES:
            f = frame(n, n)
            assert a.send(f)
            assert wait_frame(b) == f
            assert b.send(f[::-1][:n - 14] + f[:14] if n > 14 else f)
            assert len(wait_frame(a)) == n
        assert not a.send(frame(MAX_FRAME + 1, 0)) and a.stats.tx_invalid == 1
        assert not a.send(b"\0" * 13) and a.stats.tx_invalid == 2
    finally:
        a.close()
        b.close()
    if unix:
        assert not os.path.exists(addr)          # the listener's socket file is removed


def test_stream_peer_oversize_and_runt_frames_are_dropped(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    a = StreamBackend("listen", path)
    a.start()
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(path)
    try:
        good = frame(100, 1)
        raw.sendall(struct.pack("!I", MAX_FRAME + 1) + b"\xaa" * (MAX_FRAME + 1)
                    + encode(b"short") + encode(good))
        assert wait_frame(a) == good
        assert a.stats.rx_oversize == 1 and a.stats.rx_runts == 1
    finally:
        raw.close()
        a.close()


def test_stream_listener_takes_the_next_peer(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    a = StreamBackend("listen", path)
    a.start()
    try:
        for i in range(2):
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.connect(path)
            raw.sendall(encode(frame(60, i))[:30])         # a partial frame, then gone
            raw.sendall(encode(frame(60, i))[30:] + encode(frame(61, i))[:7])
            assert wait_frame(a) == frame(60, i)
            raw.close()
            wait_for(lambda: not a.link_up)
        assert a.stats.link_changes == 4
    finally:
        a.close()


def test_stream_peer_not_reading_never_blocks_and_stays_bounded(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    b = StreamBackend("connect", path)
    woke: list[int] = []
    b.start(on_writable=lambda: woke.append(1))
    peer, _ = srv.accept()
    try:
        f = frame(MAX_FRAME, 7)
        t0 = time.monotonic()
        sent = 0
        for _ in range(400):                     # ~26 MB against a peer that never reads
            sent += b.send(f)
        assert time.monotonic() - t0 < 30        # a guard against a hang, not a timing
        assert b.stats.tx_dropped > 0 and not b.writable
        assert b._txq_bytes <= TX_MAX_BYTES
        peer.setblocking(False)
        d = Deframer()
        got = 0
        end = time.monotonic() + 20
        while got < sent and time.monotonic() < end:  # now read: every accepted frame
            try:
                chunk = peer.recv(1 << 20)
            except BlockingIOError:
                time.sleep(0.001)
                continue
            for g in d.feed(chunk):
                assert g == f
                got += 1
        assert got == sent                       # accepted frames all arrive, whole
        wait_for(lambda: b.writable and woke)
    finally:
        peer.close()
        srv.close()
        b.close()


def test_receive_queue_full_pauses_reading(tmp_path: Path) -> None:
    """The guest not taking frames: the stream stops being read (flow control) and
    nothing is lost; memory stays at the queue's bound."""
    a, b = _pair(str(tmp_path / "s.sock"))
    try:
        n = 2000
        for i in range(n):
            while not b.send(frame(1500, i)):
                time.sleep(0.001)
        wait_for(lambda: a._rx_paused)
        assert a.rx.bytes <= a.rx.max_bytes and len(a.rx) <= a.rx.max_frames
        for i in range(n):
            assert wait_frame(a) == frame(1500, i)
        assert a.recv() is None and a.stats.rx_frames == n
    finally:
        a.close()
        b.close()


def test_connect_refused_is_a_clear_error(tmp_path: Path) -> None:
    b = StreamBackend("connect", str(tmp_path / "nobody.sock"))
    with pytest.raises(HostError, match="cannot connect"):
        b.start()
    b.close()


def test_dgram_pair(tmp_path: Path) -> None:
    from netkit import free_port
    pa, pb = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    a = DgramBackend(("127.0.0.1", pa), ("127.0.0.1", pb))
    b = DgramBackend(("127.0.0.1", pb), ("127.0.0.1", pa))
    a.start()
    b.start()
    try:
        for n in (14, 60, 1514, 9014, UDP4_MAX):
            assert a.send(frame(n, n))
            assert wait_frame(b) == frame(n, n)
        assert not a.send(frame(UDP4_MAX + 1, 0)) and a.stats.tx_invalid == 1
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.sendto(frame(60, 1), ("127.0.0.1", pb))
            wait_for(lambda: b.rx_foreign == 1)
        assert b.recv() is None
    finally:
        a.close()
        b.close()


def test_unix_dgram_carries_max_frame(tmp_path: Path) -> None:
    pa, pb = str(tmp_path / "a"), str(tmp_path / "b")
    a = DgramBackend(pa, pb)
    b = DgramBackend(pb, pa)
    a.start()
    b.start()
    try:
        f = frame(MAX_FRAME, 3)
        assert a.send(f)
        assert wait_frame(b) == f
    finally:
        a.close()
        b.close()


@pytest.mark.qemu
def test_qemu_stream_socket_dgram_interop(qemu_hub: QemuHub) -> None:
    """pyhv <-> QEMU in both directions over each of QEMU's three netdev wire formats."""
    a = StreamBackend("connect", qemu_hub.stream_path)                  # -netdev stream
    b = StreamBackend("connect", ("127.0.0.1", qemu_hub.socket_port))   # -netdev socket
    c = DgramBackend(("127.0.0.1", qemu_hub.dgram_pyhv),
                     ("127.0.0.1", qemu_hub.dgram_qemu))                 # -netdev dgram
    try:
        for x in (a, b, c):
            x.start()
        time.sleep(0.3)          # QEMU accepts the socket connection in its main loop
        for n in SIZES:
            f = frame(n, n)
            assert a.send(f)
            assert wait_frame(b) == f
            if n <= UDP4_MAX:
                assert wait_frame(c) == f
        for sender, others, n in ((b, (a, c), 1514), (c, (a, b), 9014), (c, (a, b), UDP4_MAX),
                                  (b, (a,), MAX_FRAME)):
            f = frame(n, 99)
            assert sender.send(f)
            for o in others:
                assert wait_frame(o) == f
        assert c.recv() is None and a.recv() is None and b.recv() is None
    finally:
        for x in (a, b, c):
            x.close()


def test_writable_false_is_always_called_back(tmp_path: Path) -> None:
    """A device that stops when `writable` says False (without a refused send) is told
    when it may go on."""
    path = str(tmp_path / "s.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    b = StreamBackend("connect", path)
    woke: list[int] = []
    b.start(on_writable=lambda: woke.append(1))
    peer, _ = srv.accept()
    try:
        f = frame(MAX_FRAME, 1)
        sent = 0
        while b.writable:
            assert b.send(f)
            sent += 1
        assert b.stats.tx_dropped == 0 and not woke
        d = Deframer()
        got = 0
        peer.settimeout(10)
        while got < sent:
            got += len(d.feed(peer.recv(1 << 20)))
        wait_for(lambda: bool(woke))
    finally:
        peer.close()
        srv.close()
        b.close()
