"""Hostile and broken images: a clear ImageError naming the problem, no write, no
read outside the file."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyhv.cli import main
from pyhv.disk.open import open_image
from pyhv.disk.qcow2 import Qcow2Image, create
from pyhv.errors import ImageError

CS = 65536


def _image(tmp: Path) -> Path:
    p = tmp / "a.qcow2"
    create(str(p), 4 << 20, cluster_size=CS)
    with Qcow2Image(str(p)) as img:
        img.write(0, b"x" * 100)
        img.write(2 << 20, b"y" * 100)
    return p


def _put(p: Path, off: int, fmt: str, *vals: int) -> None:
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, *vals))


def _get(p: Path, off: int, fmt: str) -> int:
    with open(p, "rb") as f:
        f.seek(off)
        return int(struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0])


def _l1(p: Path) -> int:
    return _get(p, 40, ">Q")


def _l2(p: Path) -> int:
    return _get(p, _l1(p), ">Q") & 0x00FFFFFFFFFFFE00


CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("magic", lambda p: _put(p, 0, ">I", 0x12345678), "bad magic"),
    ("version", lambda p: _put(p, 4, ">I", 4), "unsupported qcow2 version 4"),
    ("cluster_bits", lambda p: _put(p, 20, ">I", 40), "cluster_bits 40 out of range"),
    ("size overflow", lambda p: _put(p, 24, ">Q", 1 << 63), "virtual size"),
    ("size beyond L1", lambda p: _put(p, 24, ">Q", 1 << 40), "too small for the virtual"),
    ("crypt", lambda p: _put(p, 32, ">I", 1), "encrypted"),
    ("l1 huge", lambda p: _put(p, 36, ">I", 0xFFFFFFFF), "L1 table too large"),
    ("l1 past eof", lambda p: _put(p, 40, ">Q", 1 << 40), "L1 table at"),
    ("l1 unaligned", lambda p: _put(p, 40, ">Q", CS + 8), "not cluster-aligned"),
    ("reftable huge", lambda p: _put(p, 56, ">I", 0x7FFFFFFF), "refcount table too large"),
    ("reftable zero", lambda p: _put(p, 56, ">I", 0), "refcount table has no clusters"),
    ("reftable past eof", lambda p: _put(p, 48, ">Q", 1 << 40), "refcount table at"),
    ("snapshots huge", lambda p: _put(p, 60, ">I", 0xFFFFFF), "too many snapshots"),
    ("snapshot table past eof", lambda p: (_put(p, 60, ">I", 3), _put(p, 64, ">Q", 1 << 40)),
     "snapshot table at"),
    ("unknown incompatible", lambda p: _put(p, 72, ">Q", 1 << 20),
     "unsupported qcow2 feature: bit 20"),
    ("extended L2", lambda p: _put(p, 72, ">Q", 1 << 4),
     "unsupported qcow2 feature: extended L2 entries"),
    ("external data file", lambda p: _put(p, 72, ">Q", 1 << 2),
     "unsupported qcow2 feature: external data file"),
    ("refcount_order", lambda p: _put(p, 96, ">I", 7), "refcount_order 7"),
    ("header_length", lambda p: _put(p, 100, ">I", 3), "header_length"),
    ("backing name length", lambda p: (_put(p, 8, ">Q", 200), _put(p, 16, ">I", 5000)),
     "backing file name length"),
    ("extension length", lambda p: _put(p, 112 + 4, ">I", 0x7FFFFFF0), "header extension"),
    ("L1 entry past eof", lambda p: _put(p, _l1(p), ">Q", (1 << 40) | 1 << 63),
     "L1 entry 0: L2 table at 0x10000000000 lies past the end"),
    ("L1 entry reserved bits", lambda p: _put(p, _l1(p), ">Q", _l2(p) | 1),
     "L1 entry 0 has reserved bits"),
    ("L1 entry into refcount table", lambda p: _put(p, _l1(p), ">Q", CS | 1 << 63),
     "overlaps metadata"),
    ("refcount block past eof", lambda p: _put(p, CS, ">Q", 1 << 40), "refcount block 0"),
]


@pytest.mark.parametrize(("name", "corrupt", "message"), CASES, ids=[c[0] for c in CASES])
def test_header_and_table_corruption(tmp_path: Path, name: str,
                                     corrupt: Callable[[Path], None], message: str,
                                     digest: Any, capsys: pytest.CaptureFixture[str]) -> None:
    p = _image(tmp_path)
    corrupt(p)
    before = digest(p)
    with pytest.raises(ImageError, match=message.replace("(", r"\(")):
        Qcow2Image(str(p))  # read-write open: refused before any write
    assert digest(p) == before
    assert main(["img", "info", "-f", "qcow2", str(p)]) == 1
    # not checked at all: 1, as qemu-img check (2 would mean "corruptions found")
    assert main(["img", "check", "-f", "qcow2", "-r", "all", str(p)]) == 1
    assert capsys.readouterr().err.startswith("pyhv: ")
    assert digest(p) == before


L2_CASES: list[tuple[str, Callable[[Path], int], str]] = [
    ("data past eof", lambda p: (1 << 40) | 1 << 63, "lies past the end of the file"),
    ("data unaligned", lambda p: (_l2(p) + CS + 512) | 1 << 63, "not cluster-aligned"),
    ("data into L1 table", lambda p: _l1(p) | 1 << 63, "overlaps metadata"),
    ("data into its L2 table", lambda p: _l2(p) | 1 << 63, "overlaps metadata"),
    ("data into header", lambda p: 1 << 63 | 1 << 9, "not cluster-aligned"),
    ("reserved bits", lambda p: (_get(p, _l2(p), ">Q")) | 0x2, "reserved bits"),
    ("compressed past eof", lambda p: 1 << 62 | (1 << 40), "compressed data"),
]


@pytest.mark.parametrize(("name", "entry", "message"), L2_CASES, ids=[c[0] for c in L2_CASES])
def test_l2_entry_corruption(tmp_path: Path, name: str, entry: Callable[[Path], int],
                             message: str, digest: Any) -> None:
    p = _image(tmp_path)
    _put(p, _l2(p), ">Q", entry(p))
    before = digest(p)
    with Qcow2Image(str(p)) as img:
        with pytest.raises(ImageError, match=message):
            img.read(0, 100)
        with pytest.raises(ImageError, match=message):
            img.write(0, b"new")
    assert digest(p) == before


def test_corrupt_compressed_stream(tmp_path: Path) -> None:
    p = tmp_path / "c.qcow2"
    create(str(p), 1 << 20, cluster_size=4096)
    with Qcow2Image(str(p)) as img:
        assert img.write_compressed(0, b"a" * 4096)
        off = img.entry(0) & ((1 << 58) - 1)
    _put(p, off, ">Q", 0xFFFFFFFFFFFFFFFF)
    with Qcow2Image(str(p), read_only=True) as img, pytest.raises(ImageError,
                                                                 match="compressed"):
        img.read(0, 10)


def test_backing_cycle_and_missing(tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create(str(a), 1 << 20, backing_file="b.qcow2", backing_format="qcow2")
    create(str(b), 1 << 20, backing_file="a.qcow2", backing_format="qcow2")
    with pytest.raises(ImageError, match="cycle"):
        open_image(str(a))
    c = tmp_path / "c.qcow2"
    create(str(c), 1 << 20, backing_file="nothere.qcow2")
    with pytest.raises(ImageError, match="backing file .*nothere.qcow2 of .* does not exist"):
        open_image(str(c))
    create(str(c), 1 << 20, backing_file="c.qcow2")
    with pytest.raises(ImageError, match="cycle"):
        open_image(str(c))


def test_backing_cycle_through_a_hard_link(tmp_path: Path) -> None:
    """a -> b -> h, h a hard link of a: the same file by device and inode, so a cycle,
    found at once (by real path it was three different files, and then the depth cap;
    qemu-img 7.2 follows it until it runs out of file descriptors)."""
    a, b, h = tmp_path / "a.qcow2", tmp_path / "b.qcow2", tmp_path / "h.qcow2"
    create(str(a), 1 << 20, backing_file="b.qcow2", backing_format="qcow2")
    create(str(b), 1 << 20, backing_file="h.qcow2", backing_format="qcow2")
    os.link(a, h)
    with pytest.raises(ImageError, match=r"cycle: .*a\.qcow2 -> .*b\.qcow2 -> .*h\.qcow2$"):
        open_image(str(a))
    assert main(["img", "map", str(a)]) == 1


def test_deep_chain_capped(tmp_path: Path) -> None:
    from pyhv.disk.open import MAX_CHAIN_DEPTH

    create(str(tmp_path / "0.qcow2"), 1 << 20)
    for i in range(1, MAX_CHAIN_DEPTH + 2):
        create(str(tmp_path / f"{i}.qcow2"), 1 << 20, backing_file=f"{i - 1}.qcow2")
    with pytest.raises(ImageError, match="deeper than"):
        open_image(str(tmp_path / f"{MAX_CHAIN_DEPTH + 1}.qcow2"))
    open_image(str(tmp_path / f"{MAX_CHAIN_DEPTH - 1}.qcow2")).close()


def test_out_of_range_access(tmp_path: Path) -> None:
    p = _image(tmp_path)
    with Qcow2Image(str(p)) as img:
        for off, n in [(-1, 1), (img.size, 1), (img.size - 1, 2)]:
            with pytest.raises(ImageError, match="outside"):
                img.read(off, n)
            with pytest.raises(ImageError, match="outside"):
                img.write(off, bytes(n))


def test_corrupt_bit_refuses_writes(tmp_path: Path) -> None:
    p = _image(tmp_path)
    _put(p, 72, ">Q", 2)
    with pytest.raises(ImageError, match="marked corrupt"):
        Qcow2Image(str(p))
    with Qcow2Image(str(p), read_only=True) as img:
        assert img.read(0, 3) == b"xxx"


@pytest.mark.qemu
def test_check_reports_leaks_and_corruption(tmp_path: Path, qemu: Any,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    p = _image(tmp_path)
    # a leak: raise the refcount of cluster 0's neighbour block
    with Qcow2Image(str(p)) as img:
        img.f.pwrite(img.refs.alloc(1), bytes(CS))  # allocated, never referenced
    assert qemu.img("check", str(p), ok=False).returncode == 3
    assert main(["img", "check", str(p)]) == 3
    assert "1 leaked clusters" in capsys.readouterr().out
    assert main(["img", "check", "-r", "leaks", str(p)]) == 0
    qemu.check(p)
    # a corruption: the data cluster's refcount set to 0
    with Qcow2Image(str(p)) as img:
        data = img.entry(0) & 0x00FFFFFFFFFFFE00
        img.refs.update(data // CS, 1, -1)
    assert qemu.img("check", str(p), ok=False).returncode == 2
    assert main(["img", "check", str(p)]) == 2
    assert main(["img", "check", "-r", "leaks", str(p)]) == 2
    assert main(["img", "check", "-r", "all", str(p)]) == 0
    qemu.check(p)
    assert qemu.raw(p)[:100] == b"x" * 100


def test_impossible_sizes_refused(tmp_path: Path) -> None:
    p = _image(tmp_path)
    with Qcow2Image(str(p)) as img:
        with pytest.raises(ImageError, match="too large"):
            img.resize(1 << 62)
        img.snapshot_create("s")
        img.snapshots[0].disk_size = 1 << 62  # as a hostile snapshot table would say
        with pytest.raises(ImageError, match="impossible disk size"):
            img.snapshot_apply("s")


@pytest.mark.qemu
@pytest.mark.parametrize(("opt", "message"), [
    ("extended_l2=on", "unsupported qcow2 feature: extended L2 entries"),
    ("data_file=ext.data", "unsupported qcow2 feature: external data file"),
    ("compression_type=zstd", "unsupported compression type 1"),
])
def test_unsupported_features_from_qemu(qemu: Any, tmp_path: Path, opt: str, message: str,
                                        digest: Any) -> None:
    p = tmp_path / "u.qcow2"
    # qemu-img resolves a relative data_file against its working directory, not the image's
    opt = opt.replace("ext.data", str(tmp_path / "ext.data"))
    r = qemu.img("create", "-f", "qcow2", "-o", opt, str(p), "1M", ok=False)
    if r.returncode != 0:
        pytest.skip(f"this qemu-img cannot create {opt}: {r.stderr.strip()}")
    before = digest(p)
    with pytest.raises(ImageError, match=message):
        open_image(str(p), read_only=False)
    assert digest(p) == before
