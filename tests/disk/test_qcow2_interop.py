"""pyhv's qcow2 against QEMU's tools: both directions, many layouts."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from pyhv.disk.open import open_image
from pyhv.disk.qcow2 import Qcow2Image, create

pytestmark = pytest.mark.qemu

LAYOUTS = [
    # (cluster_size, version, refcount_bits)
    (512, 3, 16), (4096, 3, 1), (4096, 3, 2), (4096, 3, 4), (65536, 3, 8),
    (65536, 3, 16), (65536, 2, 16), (65536, 3, 32), (65536, 3, 64), (2 << 20, 3, 16),
    (1024, 2, 16),
]


def _scribble(img: Qcow2Image, model: bytearray, seed: int, n: int = 40) -> None:
    rng = random.Random(seed)
    cs = img.cs
    for _ in range(n):
        length = rng.choice([1, 511, 512, 4096, cs - 1, cs, cs + 1, 3 * cs + 7])
        length = min(length, img.size)
        off = rng.randrange(0, img.size - length + 1)
        if rng.random() < 0.3:
            off -= off % cs
        data = rng.randbytes(length)
        img.write(off, data)
        model[off:off + length] = data


@pytest.mark.parametrize(("cs", "version", "bits"), LAYOUTS)
def test_pyhv_writes_qemu_reads(qemu: Any, tmp_path: Path, cs: int, version: int,
                                bits: int) -> None:
    p = tmp_path / "a.qcow2"
    size = max(8 * cs, 3 << 20) + 4096
    create(str(p), size, cluster_size=cs, version=version, refcount_bits=bits)
    qemu.check(p)
    model = bytearray(size)
    with Qcow2Image(str(p)) as img:
        _scribble(img, model, seed=cs + version + bits)
        assert img.read(0, size) == model
    qemu.check(p)
    assert qemu.raw(p) == model
    info = qemu.img("info", "--output=json", str(p)).stdout
    assert f'"cluster-size": {cs}' in info
    assert f'"refcount-bits": {bits}' in info


@pytest.mark.parametrize(("cs", "version", "bits"), LAYOUTS)
def test_qemu_writes_pyhv_reads(qemu: Any, tmp_path: Path, cs: int, version: int,
                                bits: int) -> None:
    p = tmp_path / "q.qcow2"
    compat = "1.1" if version == 3 else "0.10"
    qemu.img("create", "-f", "qcow2", "-o",
             f"cluster_size={cs},compat={compat},refcount_bits={bits}", str(p), "4M")
    qemu.io(p, "write -P 0xab 0 64k", "write -P 0x11 100k 5000", "write -z 1M 128k",
            "write -P 0xcd 3M 1M", "write -P 0x22 2047k 3k")
    want = qemu.raw(p)
    assert want[:65536] == b"\xab" * 65536
    with open_image(str(p)) as img:
        assert img.read(0, img.size) == want
        # unaligned reads agree too
        for off, n in [(1, 1), (65535, 3), (102399, 5002), ((4 << 20) - 7, 7)]:
            assert img.read(off, n) == want[off:off + n]


def test_pyhv_writes_over_qemu_data(qemu: Any, tmp_path: Path) -> None:
    p = tmp_path / "q.qcow2"
    qemu.img("create", "-f", "qcow2", str(p), "8M")
    qemu.io(p, "write -P 0xab 0 1M", "write -z 2M 1M")
    model = bytearray(qemu.raw(p))
    with Qcow2Image(str(p)) as img:
        for off, n in [(1000, 70000), (2 << 20, 10), ((2 << 20) + 65530, 20), (7 << 20, 4096)]:
            img.write(off, b"\x5a" * n)
            model[off:off + n] = b"\x5a" * n
        img.discard(0, 128 << 10)
        model[0:128 << 10] = bytes(128 << 10)
    qemu.check(p)
    assert qemu.raw(p) == model


def test_compressed_clusters_from_qemu(qemu: Any, tmp_path: Path, view: Any) -> None:
    src = tmp_path / "s.qcow2"
    qemu.img("create", "-f", "qcow2", str(src), "2M")
    qemu.io(src, "write -P 0xab 0 300k", "write -P 0x01 1M 64k")
    c = tmp_path / "c.qcow2"
    qemu.img("convert", "-c", "-O", "qcow2", str(src), str(c))
    assert '"compressed-clusters": 0' not in qemu.img("check", "--output=json", str(c)).stdout
    want = qemu.raw(src)
    assert view(c) == want
    # overwrite part of a compressed cluster: copy-on-write decompresses it
    with Qcow2Image(str(c)) as img:
        img.write(100, b"xyz")
        img.write(70000, b"q" * 70000)
    model = bytearray(want)
    model[100:103] = b"xyz"
    model[70000:140000] = b"q" * 70000
    qemu.check(c)
    assert qemu.raw(c) == model


@pytest.mark.parametrize("cs", [512, 65536])
def test_pyhv_compressed_convert(qemu: Any, tmp_path: Path, cs: int) -> None:
    from pyhv.cli import main

    src = tmp_path / "s.qcow2"
    qemu.img("create", "-f", "qcow2", str(src), "3M")
    qemu.io(src, "write -P 0xab 0 300k", "write -P 0x01 1M 64k")
    with Qcow2Image(str(src)) as img:
        img.write(2 << 20, random.Random(1).randbytes(100000))  # incompressible
    out = tmp_path / "o.qcow2"
    assert main(["img", "convert", "-c", "-O", "qcow2", "-o", f"cluster_size={cs}",
                 str(src), str(out)]) == 0
    qemu.check(out)
    assert qemu.raw(out) == qemu.raw(src)
    r = qemu.img("check", "--output=json", str(out)).stdout
    assert '"compressed-clusters": 0' not in r


def test_backing_chain_from_qemu(qemu: Any, tmp_path: Path, view: Any) -> None:
    base = tmp_path / "base.raw"
    qemu.img("create", "-f", "raw", str(base), "2M")
    qemu.io(base, "write -P 0x01 0 2M", fmt="raw")
    mid = tmp_path / "mid.qcow2"
    qemu.img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(mid))
    qemu.io(mid, "write -P 0x02 64k 64k", "write -z 512k 64k")
    top = tmp_path / "top.qcow2"
    qemu.img("create", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top), "3M")
    qemu.io(top, "write -P 0x03 100k 10k")
    assert view(top) == qemu.raw(top)
    # pyhv writes through the chain's top: partial clusters copy from the backing
    model = bytearray(qemu.raw(top))
    with open_image(str(top), read_only=False) as img:
        img.write(70000, b"\xee" * 10)
        img.write((2 << 20) + 5, b"\xee" * 10)
        img.discard(0, 64 << 10)  # v3 + backing: becomes zero clusters
    model[70000:70010] = b"\xee" * 10
    model[(2 << 20) + 5:(2 << 20) + 15] = b"\xee" * 10
    model[0:64 << 10] = bytes(64 << 10)
    qemu.check(top)
    assert qemu.raw(top) == model


def test_info_and_snapshot_list_match_qemu(qemu: Any, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from pyhv.cli import main

    p = tmp_path / "a.qcow2"
    qemu.img("create", "-f", "qcow2", str(p), "16M")
    qemu.img("snapshot", "-c", "first", str(p))
    qemu.img("snapshot", "-c", "second", str(p))
    theirs = json.loads(qemu.img("info", "--output=json", str(p)).stdout)
    capsys.readouterr()
    assert main(["img", "info", "--output=json", str(p)]) == 0
    ours = json.loads(capsys.readouterr().out)
    for key in ("virtual-size", "cluster-size", "format", "dirty-flag"):
        assert ours[key] == theirs[key]
    assert ours["format-specific"]["data"]["refcount-bits"] == 16
    strip = ("vm-clock-nsec", "vm-clock-sec", "icount")
    assert [{k: v for k, v in s.items() if k not in strip} for s in ours["snapshots"]] == \
        [{k: v for k, v in s.items() if k not in strip} for s in theirs["snapshots"]]


def test_qemu_operates_on_pyhv_images(qemu: Any, tmp_path: Path) -> None:
    """QEMU writes, commits, resizes and snapshots images pyhv made and wrote."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    create(str(base), 2 << 20, cluster_size=4096)
    with Qcow2Image(str(base)) as img:
        img.write(0, b"\x01" * (2 << 20))
        img.snapshot_create("pyhv-snap")
    create(str(top), 2 << 20, backing_file="base.qcow2", backing_format="qcow2")
    with open_image(str(top), read_only=False) as img:
        img.write(5000, b"\x02" * 10000)
    qemu.io(base, "write -P 0x03 1M 4k")  # QEMU copies pyhv's shared clusters on write
    qemu.check(base)
    want = bytearray(b"\x01" * (2 << 20))
    want[1 << 20:(1 << 20) + 4096] = b"\x03" * 4096
    want[5000:15000] = b"\x02" * 10000
    assert qemu.raw(top) == want
    qemu.img("commit", str(top))
    qemu.check(base)
    assert qemu.raw(base) == want
    qemu.img("resize", str(base), "+1M")
    qemu.img("snapshot", "-c", "qemu-snap", str(base))
    qemu.io(base, "write -P 0x04 0 4k")
    qemu.check(base)
    with Qcow2Image(str(base)) as img:
        assert [s.name for s in img.snapshots] == ["pyhv-snap", "qemu-snap"]
        img.snapshot_apply("pyhv-snap")
        assert img.size == 2 << 20
        assert img.read(0, img.size) == b"\x01" * (2 << 20)
        img.snapshot_apply("qemu-snap")
        assert img.size == 3 << 20
    qemu.check(base)
    assert qemu.raw(base) == bytes(want) + bytes(1 << 20)
