"""virtio-blk on pyhv's block layer, driven through the PCI transport by the test driver:
every request type, several in flight, and every bad request a guest can make answered
with a status (or NEEDS_RESET for a chain with no status byte), never an exception; the
image is checked with qemu-img afterwards where QEMU is installed."""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from virtio_driver import Driver, TestMachine

from pyhv.devices.virtio import blk as B
from pyhv.devices.virtio import transport as T
from pyhv.disk.open import open_image
from pyhv.disk.qcow2.create import create
from pyhv.disk.raw import RawImage

SIZE = 1 << 20


def qemu_img_check(path: Path) -> None:
    if shutil.which("qemu-img") is None or path.suffix != ".qcow2":
        return
    r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


class Disk:
    def __init__(self, path: Path, read_only: bool = False, serial: str = "sn-1") -> None:
        self.m = TestMachine()
        self.path = path
        self.dev = B.VirtioBlk(open_image(str(path), read_only=read_only, guest=True),
                               serial=serial)
        self.slot, self.fn = self.m.add(self.dev)
        self.d = Driver(self.m, self.slot)
        assert self.d.init()
        self.q = self.d.setup_queue(0, 32, data_bytes=0x40000)
        self.d.driver_ok()

    def submit(self, kind: int, sector: int, out: bytes = b"", in_len: int = 0,
               status: bool = True) -> tuple[int, list[int]]:
        bufs: list[tuple[bytes | int, bool]] = [(struct.pack("<IIQ", kind, 0, sector), False)]
        if out:
            bufs.append((out, False))
        if in_len:
            bufs.append((in_len, True))
        if status:
            bufs.append((1, True))
        return self.q.add(bufs)

    def run(self) -> list[tuple[int, int]]:
        self.d.notify(0)
        self.dev._work.join()
        self.m.deferred.run_pending()
        return self.q.take_used()

    def request(self, kind: int, sector: int, out: bytes = b"", in_len: int = 0
                ) -> tuple[int, bytes]:
        head, addrs = self.submit(kind, sector, out, in_len)
        used = self.run()
        assert [h for h, _ in used] == [head]
        status = self.m.memory.read_u8(addrs[-1])
        data = self.m.memory.read(addrs[-2], in_len) if in_len else b""
        return status, data

    def close(self) -> None:
        self.fn.close()
        self.m.close()


@pytest.fixture(params=["raw", "qcow2"])
def disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Disk]:
    path = tmp_path / f"d.{request.param}"
    if request.param == "raw":
        RawImage.create(str(path), SIZE)
    else:
        create(str(path), SIZE)
    d = Disk(path)
    yield d
    d.close()
    qemu_img_check(path)


def test_config_space(disk: Disk) -> None:
    assert disk.d.device_config(0, 8) == SIZE // 512
    assert disk.d.device_config(20, 4) == 512
    feats = disk.d.device_features()
    assert feats & B.F_FLUSH and feats & B.F_DISCARD and not feats & B.F_RO


def test_write_read_flush_id(disk: Disk) -> None:
    data = bytes(range(256)) * 8
    assert disk.request(B.T_OUT, 3, out=data) == (B.S_OK, b"")
    assert disk.request(B.T_IN, 3, in_len=len(data)) == (B.S_OK, data)
    assert disk.request(B.T_FLUSH, 0)[0] == B.S_OK
    assert disk.request(B.T_GET_ID, 0, in_len=20) == (B.S_OK, b"sn-1".ljust(20, b"\0"))
    assert disk.dev.disk.read(3 * 512, len(data)) == data


def test_discard_and_write_zeroes(disk: Disk) -> None:
    disk.request(B.T_OUT, 0, out=b"\xAA" * 0x20000)
    seg = struct.pack("<QII", 64, 64, 1)
    assert disk.request(B.T_WRITE_ZEROES, 0, out=seg)[0] == B.S_OK
    assert disk.dev.disk.read(64 * 512, 64 * 512) == bytes(64 * 512)
    assert disk.dev.disk.read(0, 512) == b"\xAA" * 512
    assert disk.request(B.T_DISCARD, 0, out=struct.pack("<QII", 128, 128, 0))[0] == B.S_OK
    got = disk.dev.disk.read(128 * 512, 128 * 512)
    assert got in (b"\xAA" * len(got), bytes(len(got)))     # discard: old data or zeros
    assert disk.request(B.T_DISCARD, 0, out=struct.pack("<QII", 0, 8, 1))[0] == B.S_UNSUPP
    assert disk.request(B.T_WRITE_ZEROES, 0, out=struct.pack("<QII", 0, 8, 2))[0] == B.S_UNSUPP
    two = struct.pack("<QII", 0, 8, 0) * 2
    assert disk.request(B.T_DISCARD, 0, out=two)[0] == B.S_IOERR
    assert disk.request(B.T_DISCARD, 0, out=b"\0" * 15)[0] == B.S_IOERR


def test_bad_requests_get_a_status(disk: Disk) -> None:
    end = SIZE // 512
    assert disk.request(B.T_IN, end, in_len=512)[0] == B.S_IOERR          # past the end
    assert disk.request(B.T_IN, end - 1, in_len=1024)[0] == B.S_IOERR     # straddles it
    assert disk.request(B.T_OUT, 2**64 - 1, out=bytes(512))[0] == B.S_IOERR
    assert disk.request(B.T_OUT, 0, out=bytes(100))[0] == B.S_IOERR       # not sectors
    assert disk.request(B.T_WRITE_ZEROES, 0,
                        out=struct.pack("<QII", end - 1, 2, 0))[0] == B.S_IOERR
    assert disk.request(99, 0, in_len=16)[0] == B.S_UNSUPP
    assert disk.dev.disk.read(0, 512) == bytes(512)


def test_chain_without_status_byte_needs_reset(disk: Disk) -> None:
    disk.submit(B.T_FLUSH, 0, status=False)
    disk.run()
    assert disk.d.status & T.S_NEEDS_RESET


def test_several_requests_in_flight(disk: Disk) -> None:
    heads = [disk.submit(B.T_OUT, 8 * i, out=bytes([i]) * 4096)[0] for i in range(6)]
    used = disk.run()
    assert sorted(h for h, _ in used) == sorted(heads)
    for i in range(6):
        assert disk.dev.disk.read(8 * i * 512, 4096) == bytes([i]) * 4096


def test_read_only_disk(tmp_path: Path) -> None:
    path = tmp_path / "ro.raw"
    RawImage.create(str(path), SIZE)
    d = Disk(path, read_only=True)
    try:
        assert d.d.device_features() & B.F_RO
        assert d.request(B.T_OUT, 0, out=b"\1" * 512)[0] == B.S_IOERR
        assert d.request(B.T_DISCARD, 0, out=struct.pack("<QII", 0, 8, 0))[0] == B.S_IOERR
        assert d.request(B.T_WRITE_ZEROES, 0, out=struct.pack("<QII", 0, 8, 0))[0] == B.S_IOERR
        assert d.request(B.T_IN, 0, in_len=512) == (B.S_OK, bytes(512))
    finally:
        d.close()
    assert path.read_bytes() == bytes(SIZE)


@given(st.lists(st.tuples(st.sampled_from([0, 1, 4, 8, 11, 13, 7, 0xFFFFFFFF]),
                          st.integers(0, 2**64 - 1) | st.integers(0, 2100),
                          st.integers(0, 3000), st.integers(0, 3000)),
                min_size=1, max_size=6))
def test_arbitrary_requests_get_a_status(tmp_path_factory: pytest.TempPathFactory,
                                         reqs: list[tuple[int, int, int, int]]) -> None:
    path = tmp_path_factory.mktemp("blk") / "d.raw"
    RawImage.create(str(path), SIZE)
    d = Disk(path)
    try:
        addrs = [d.submit(kind, sector, out=bytes(n_out), in_len=n_in)[1]
                 for kind, sector, n_out, n_in in reqs]
        used = d.run()
        assert len(used) == len(reqs)
        for a in addrs:
            assert d.m.memory.read_u8(a[-1]) in (B.S_OK, B.S_IOERR, B.S_UNSUPP)
    finally:
        d.close()


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_backing_chain_compressed_clusters_and_snapshots(tmp_path: Path) -> None:
    """The guest reads through a compressed base under a qcow2 overlay; its writes land
    in the overlay only, and a snapshot taken before them still holds the old data."""
    raw = tmp_path / "src.raw"
    raw.write_bytes(bytes(range(256)) * (SIZE // 256))
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    for argv in (["convert", "-c", "-O", "qcow2", str(raw), str(base)],
                 ["create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)],
                 ["snapshot", "-c", "before", str(top)]):
        r = subprocess.run(["qemu-img", *argv], capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
    d = Disk(top)
    try:
        assert d.request(B.T_IN, 1, in_len=1024) == (B.S_OK, (bytes(range(256)) * 4))
        assert d.request(B.T_OUT, 1, out=b"\xEE" * 512)[0] == B.S_OK
        assert d.request(B.T_IN, 1, in_len=512) == (B.S_OK, b"\xEE" * 512)
    finally:
        d.close()
    qemu_img_check(top)
    qemu_img_check(base)
    r = subprocess.run(["qemu-io", "-r", "-c", "read -P 0xee 512 512", str(top)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r
    r = subprocess.run(["qemu-img", "snapshot", "-l", str(top)], capture_output=True,
                       text=True, timeout=60)
    assert "before" in r.stdout
    r = subprocess.run(["qemu-img", "snapshot", "-a", "before", str(top)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["qemu-io", "-r", "-c", "read -P 0x00 512 1", str(top)],
                       capture_output=True, text=True, timeout=60)
    assert "Pattern verification failed" not in r.stdout, r.stdout
    ro = open_image(str(base), read_only=True)
    try:
        assert ro.read(512, 512) == bytes(range(256)) * 2
    finally:
        ro.close()
