"""`pyhv img` verbs, each checked against qemu-img on the same files."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from pyhv.cli import main
from pyhv.disk.blockdev import BlockDevice
from pyhv.disk.open import open_image
from pyhv.disk.qcow2 import Qcow2Image, create
from pyhv.disk.raw import RawImage

pytestmark = pytest.mark.qemu


def img(*args: str) -> int:
    return main(["img", *args])


def test_create_options(qemu: Any, tmp_path: Path) -> None:
    p = str(tmp_path / "a.qcow2")
    assert img("create", "-f", "qcow2", "-o", "cluster_size=4k,compat=0.10", p, "10M") == 0
    info = json.loads(qemu.img("info", "--output=json", p).stdout)
    assert info["virtual-size"] == 10 << 20
    assert info["cluster-size"] == 4096
    assert info["format-specific"]["data"]["compat"] == "0.10"
    assert img("create", "-f", "qcow2", "-o", "refcount_bits=64,lazy_refcounts=on", p,
               "1.5G") == 0
    info = json.loads(qemu.img("info", "--output=json", p).stdout)
    assert info["virtual-size"] == 3 << 29
    assert info["format-specific"]["data"]["refcount-bits"] == 64
    assert info["format-specific"]["data"]["lazy-refcounts"] is True
    qemu.check(p)
    assert img("create", "-f", "qcow2", "-o", "cluster_size=3000", p, "1M") == 1
    assert img("create", "-f", "qcow2", "-o", "bogus=1", p, "1M") == 1
    assert img("create", "-f", "qcow2", p, "12Q") == 1


def test_create_backing_and_info_chain(qemu: Any, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    assert img("create", "-f", "qcow2", base, "3M") == 0
    qemu.io(base, "write -P 0x61 0 3M")
    assert img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top) == 0
    info = json.loads(qemu.img("info", "--output=json", top).stdout)
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert info["virtual-size"] == 3 << 20
    qemu.check(top)
    assert qemu.raw(top) == b"a" * (3 << 20)
    capsys.readouterr()
    assert img("info", "--backing-chain", "--output=json", top) == 0
    chain = json.loads(capsys.readouterr().out)
    assert [c["filename"] for c in chain] == [top, str(tmp_path / "base.qcow2")]
    assert img("info", top) == 0
    assert "backing file: base.qcow2" in capsys.readouterr().out


def test_convert_raw_qcow2_both_ways(qemu: Any, tmp_path: Path) -> None:
    raw = tmp_path / "a.raw"
    data = bytearray(5 << 20)
    data[4096:8192] = b"\x07" * 4096
    data[(3 << 20) + 1:(3 << 20) + 100] = b"\x09" * 99
    raw.write_bytes(bytes(data))
    q = str(tmp_path / "a.qcow2")
    assert img("convert", "-f", "raw", "-O", "qcow2", "-p", str(raw), q) == 0
    qemu.check(q)
    assert qemu.raw(q) == data
    assert json.loads(qemu.img("info", "--output=json", q).stdout)["actual-size"] < 1 << 20
    back = tmp_path / "b.raw"
    assert img("convert", "-O", "raw", q, str(back)) == 0
    assert back.read_bytes() == data
    assert qemu.img("compare", str(raw), q).returncode == 0


def test_commit(qemu: Any, tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu.img("create", "-f", "qcow2", str(base), "2M")
    qemu.io(base, "write -P 0x01 0 2M")
    qemu.img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    qemu.io(top, "write -P 0x02 100k 200k", "write -z 1M 64k")
    want = qemu.raw(top)
    assert img("commit", str(top)) == 0
    qemu.check(base)
    qemu.check(top)
    assert qemu.raw(base) == want
    assert qemu.raw(top) == want  # the emptied top now reads through
    m = json.loads(qemu.img("map", "--output=json", str(top)).stdout)
    assert all(r["depth"] == 1 for r in m)


def test_rebase_safe_and_unsafe(qemu: Any, tmp_path: Path) -> None:
    a, b, top = (tmp_path / n for n in ("a.qcow2", "b.qcow2", "top.qcow2"))
    qemu.img("create", "-f", "qcow2", str(a), "1M")
    qemu.io(a, "write -P 0x0a 0 1M")
    qemu.img("create", "-f", "qcow2", str(b), "1M")
    qemu.io(b, "write -P 0x0b 0 512k")
    qemu.img("create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", str(top))
    qemu.io(top, "write -P 0x0c 64k 64k")
    want = qemu.raw(top)
    assert img("rebase", "-b", "b.qcow2", "-F", "qcow2", str(top)) == 0
    qemu.check(top)
    assert qemu.raw(top) == want
    info = json.loads(qemu.img("info", "--output=json", str(top)).stdout)
    assert info["backing-filename"] == "b.qcow2"
    assert img("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", str(top)) == 0
    qemu.check(top)
    assert json.loads(qemu.img("info", "--output=json", str(top)).stdout)[
        "backing-filename"] == "a.qcow2"
    assert img("rebase", "-b", "", str(top)) == 0  # flatten: no backing file
    qemu.check(top)
    assert "backing-filename" not in json.loads(
        qemu.img("info", "--output=json", str(top)).stdout)


def test_resize(qemu: Any, tmp_path: Path) -> None:
    p = str(tmp_path / "a.qcow2")
    create(p, 1 << 20, cluster_size=512)
    qemu.io(p, "write -P 0x05 0 1M")
    assert img("resize", p, "+63M") == 0  # the L1 table must grow (512-byte clusters)
    qemu.check(p)
    data = qemu.raw(p)
    assert len(data) == 64 << 20 and data[:1 << 20] == b"\x05" * (1 << 20)
    assert not any(data[1 << 20:])
    qemu.io(p, "write -P 0x06 60M 64k")
    assert img("resize", p, "100k") == 1  # shrinking needs --shrink
    assert img("resize", "--shrink", p, "100k") == 0
    qemu.check(p)
    assert qemu.raw(p) == b"\x05" * (100 << 10)
    assert img("resize", p, "200k") == 0
    assert qemu.raw(p) == b"\x05" * (100 << 10) + bytes(100 << 10)


def test_map_matches_qemu(qemu: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu.img("create", "-f", "qcow2", str(base), "4M")
    qemu.io(base, "write -P 1 0 1M")
    qemu.img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    qemu.io(top, "write -P 2 512k 64k", "write -z 2M 64k", "write -P 3 3M 128k")
    theirs = json.loads(qemu.img("map", "--output=json", str(top)).stdout)
    capsys.readouterr()
    assert img("map", "--output=json", str(top)) == 0
    ours = json.loads(capsys.readouterr().out)
    keys = ("start", "length", "depth", "zero", "data", "offset")
    assert [{k: r.get(k) for k in keys} for r in ours] == \
        [{k: r.get(k) for k in keys} for r in theirs]


def test_compare(qemu: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.raw"
    qemu.img("create", "-f", "qcow2", str(a), "1M")
    qemu.img("create", "-f", "raw", str(b), "1M")
    qemu.io(a, "write -P 7 1000 10")
    qemu.io(b, "write -P 7 1000 10", fmt="raw")
    capsys.readouterr()
    assert img("compare", str(a), str(b)) == 0
    assert "Images are identical." in capsys.readouterr().out
    qemu.io(b, "write -P 8 1005 1", fmt="raw")
    assert img("compare", str(a), str(b)) == 1
    out = capsys.readouterr().out
    assert out == "Content mismatch at offset 512!\n"  # the sector start, as qemu-img
    assert qemu.img("compare", str(a), str(b), ok=False).stdout == out


def test_check_json(qemu: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "a.qcow2"
    qemu.img("create", "-f", "qcow2", str(p), "1M")
    qemu.io(p, "write -P 7 0 200k")
    theirs = json.loads(qemu.img("check", "--output=json", str(p)).stdout)
    capsys.readouterr()
    assert img("check", "--output=json", str(p)) == 0
    ours = json.loads(capsys.readouterr().out)
    for k in ("image-end-offset", "total-clusters", "allocated-clusters",
              "fragmented-clusters", "compressed-clusters", "corruptions", "leaks"):
        assert ours.get(k, 0) == theirs.get(k, 0), k


def test_dirty_image_from_lazy_refcounts(qemu: Any, tmp_path: Path) -> None:
    p = tmp_path / "d.qcow2"
    qemu.img("create", "-f", "qcow2", "-o", "lazy_refcounts=on", str(p), "2M")
    qemu.run("qemu-io", "-c", "write -P 0x3c 0 300k", "-c", "abort", str(p), ok=False)
    info = json.loads(qemu.img("info", "--output=json", str(p)).stdout)
    assert info["dirty-flag"] is True
    want = b"\x3c" * (300 << 10) + bytes((2 << 20) - (300 << 10))
    with Qcow2Image(str(p), read_only=True) as ro:
        assert ro.read(0, ro.size) == want
    with Qcow2Image(str(p)) as rw:  # refcounts rebuilt, dirty bit cleared
        rw.write(1 << 20, b"x")
    info = json.loads(qemu.img("info", "--output=json", str(p)).stdout)
    assert info["dirty-flag"] is False
    qemu.check(p)
    assert qemu.raw(p)[:300 << 10] == want[:300 << 10]


def test_block_device_api_threads(qemu: Any, tmp_path: Path) -> None:
    p = str(tmp_path / "t.qcow2")
    create(p, 8 << 20, cluster_size=4096)
    dev = open_image(p, read_only=False)
    assert isinstance(dev, BlockDevice)

    def worker(k: int) -> None:
        for i in range(50):
            off = (k * 50 + i) * 10000
            dev.write(off, bytes([k + 1]) * 10000)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dev.flush()
    dev.close()
    qemu.check(p)
    data = qemu.raw(p)
    for k in range(4):
        for i in range(50):
            off = (k * 50 + i) * 10000
            assert data[off:off + 10000] == bytes([k + 1]) * 10000
    r = tmp_path / "r.raw"
    RawImage.create(str(r), 1 << 20)
    with RawImage(str(r)) as rd:
        assert isinstance(rd, BlockDevice)
        rd.write(5, b"abc")
        assert rd.read(4, 5) == b"\0abc\0"


def test_public_surface() -> None:
    import pyhv.disk.qcow2 as q

    assert sorted(q.__all__) == ["CheckResult", "Qcow2Image", "check", "create"]


def test_convert_odd_tail(qemu: Any, tmp_path: Path) -> None:
    raw = tmp_path / "odd.raw"
    data = bytes(3 * 65536) + b"\x11" * 1000 + bytes(512 - 1000 % 512)
    raw.write_bytes(data)
    q = str(tmp_path / "odd.qcow2")
    assert img("convert", "-f", "raw", "-O", "qcow2", str(raw), q) == 0
    qemu.check(q)
    assert qemu.raw(q) == data


def test_small_cluster_backing_header(qemu: Any, tmp_path: Path) -> None:
    base = tmp_path / "b.qcow2"
    qemu.img("create", "-f", "qcow2", str(base), "1M")
    qemu.io(base, "write -P 0x42 0 1M")
    top = str(tmp_path / ("t" * 60 + ".qcow2"))
    assert img("create", "-f", "qcow2", "-o", "cluster_size=512", "-b", str(base), "-F",
               "qcow2", top) == 0
    qemu.check(top)
    assert qemu.raw(top) == b"\x42" * (1 << 20)


@pytest.mark.parametrize("opts", ["compat=1.1", "compat=0.10,cluster_size=4k",
                                  "refcount_bits=8,lazy_refcounts=on"])
def test_info_text_identical_to_qemu(qemu: Any, tmp_path: Path, opts: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base.qcow2"
    qemu.img("create", "-f", "qcow2", str(base), "3M")
    p = tmp_path / "a.qcow2"
    qemu.img("create", "-f", "qcow2", "-o", opts, "-b", "base.qcow2", "-F", "qcow2", str(p))
    qemu.io(p, "write -P 1 0 100k")
    qemu.img("snapshot", "-c", "first", str(p))
    assert img("snapshot", "-c", "second", str(p)) == 0
    capsys.readouterr()
    for verb in (["info"], ["snapshot", "-l"]):
        assert img(*verb, str(p)) == 0
        ours = capsys.readouterr().out
        theirs = qemu.img(*verb, str(p)).stdout
        assert ours.split() == theirs.split(), verb


def test_check_and_map_text_identical_to_qemu(qemu: Any, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base.qcow2"
    qemu.img("create", "-f", "qcow2", str(base), "8M")
    qemu.io(base, "write -P 1 0 1M", "write -P 2 4M 64k", "write -c -P 3 6M 64k")
    top = tmp_path / "top.qcow2"
    qemu.img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    qemu.io(top, "write -P 4 512k 128k", "write -z 7M 64k")
    capsys.readouterr()
    for p in (base, top):
        for verb in (["check"], ["map", "--output=json"], ["map"]):
            img(*verb, str(p))
            ours = capsys.readouterr().out
            theirs = qemu.img(*verb, str(p), ok=False).stdout
            assert ours == theirs, (verb, p.name)


def test_progress_bar(qemu: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "s.qcow2"
    create(str(src), 9 << 20)
    with Qcow2Image(str(src)) as q:
        q.write(0, b"p" * (9 << 20))
    capsys.readouterr()
    assert img("convert", "-p", "-O", "raw", str(src), str(tmp_path / "o.raw")) == 0
    err = capsys.readouterr().err
    assert "(100.00/100%)" in err and "(0.00/100%)" not in err.split("\r")[-1]
    assert img("compare", "-p", str(src), str(tmp_path / "o.raw")) == 0
    assert "(100.00/100%)" in capsys.readouterr().err
