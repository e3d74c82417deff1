"""`pyhv img` verbs must never lose data (issue 9, section 2), each checked against what
qemu-img does with the same files: convert onto its own input, commit into a smaller
base, images backed by themselves, backing loops, resize of an overlay, compressed
convert with narrow refcounts, and cleanup after a failure."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pyhv.cli import main
from pyhv.disk.qcow2 import Qcow2Image, create

pytestmark = pytest.mark.qemu

CS = 65536


def img(*args: str) -> int:
    return main(["img", *args])


def _qcow2_with_data(qemu: Any, path: Path, size: str = "1M", *cmds: str) -> None:
    qemu.img("create", "-f", "qcow2", str(path), size)
    qemu.io(path, *(cmds or ("write -P 0x11 0 64k", "write -P 0x22 512k 64k")))


# -- 2.1 convert onto its own input ----------------------------------------------------------


@pytest.mark.parametrize("spelling", ["same", "dot", "hardlink", "symlink", "backing"])
@pytest.mark.parametrize("out_fmt", ["qcow2", "raw"])
def test_convert_refuses_to_overwrite_its_input(qemu: Any, tmp_path: Path, digest: Any,
                                                spelling: str, out_fmt: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    base, top = tmp_path / "d.qcow2", tmp_path / "t.qcow2"
    _qcow2_with_data(qemu, base)
    qemu.img("create", "-f", "qcow2", "-b", "d.qcow2", "-F", "qcow2", str(top))
    want = qemu.raw(top)
    src, dst = "d.qcow2", "d.qcow2"
    if spelling == "dot":
        dst = "./d.qcow2"
    elif spelling == "hardlink":
        os.link(base, tmp_path / "h.qcow2")
        dst = "h.qcow2"
    elif spelling == "symlink":
        os.symlink("d.qcow2", tmp_path / "s.qcow2")
        dst = "s.qcow2"
    elif spelling == "backing":
        src = "t.qcow2"  # the output is a file of the input's backing chain
    before = digest(base), digest(top)
    assert img("convert", "-O", out_fmt, src, dst) == 1
    assert (digest(base), digest(top)) == before
    qemu.check(base)
    assert qemu.raw(top) == want
    if spelling == "same":  # qemu-img refuses as well (its image lock)
        assert qemu.img("convert", "-O", out_fmt, src, dst, ok=False).returncode == 1
        assert (digest(base), digest(top)) == before


# -- 2.2 commit into a smaller base ---------------------------------------------------------


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_commit_grows_the_base_as_qemu_img(qemu: Any, tmp_path: Path, base_fmt: str) -> None:
    """raw base 1M, qcow2 top 2M with data at 1.5M: qemu-img grows the base to the top's
    size (a raw file is extended, a qcow2 base resized); nothing past 1M may vanish."""
    results = {}
    for who in ("pyhv", "qemu"):
        d = tmp_path / who
        d.mkdir()
        base, top = d / f"base.{base_fmt}", d / "top.qcow2"
        qemu.img("create", "-f", base_fmt, str(base), "1M")
        qemu.io(base, "write -P 0x09 0 1M", fmt=base_fmt)
        qemu.img("create", "-f", "qcow2", "-b", base.name, "-F", base_fmt, str(top), "2M")
        qemu.io(top, "write -P 0x07 1536k 64k", "write -P 0x08 64k 4k")
        want = qemu.raw(top)
        if who == "pyhv":
            assert img("commit", str(top)) == 0
        else:
            qemu.img("commit", str(top))
        if base_fmt == "qcow2":
            qemu.check(base)
        qemu.check(top)
        assert qemu.raw(base) == want  # the data past the old 1M end is in the base
        assert qemu.raw(top) == want
        results[who] = (os.path.getsize(base) if base_fmt == "raw" else None,
                        json.loads(qemu.img("info", "--output=json", str(base)).stdout)[
                            "virtual-size"])
    assert results["pyhv"] == results["qemu"]
    assert qemu.img("compare", str(tmp_path / "pyhv" / f"base.{base_fmt}"),
                    str(tmp_path / "qemu" / f"base.{base_fmt}")).returncode == 0


def test_commit_refused_when_the_base_cannot_grow(qemu: Any, tmp_path: Path,
                                                  digest: Any) -> None:
    """A base the file system cannot grow (EFBIG): the commit stops before writing."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    try:
        os.truncate(probe, 1 << 45)
        pytest.skip("this file system holds a 32 TiB file: the base can grow")
    except OSError:
        pass
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    qemu.img("create", "-f", "raw", str(base), "1M")
    qemu.io(base, "write -P 0x09 0 1M", fmt="raw")
    qemu.img("create", "-f", "qcow2", "-b", base.name, "-F", "raw", str(top), "1M")
    qemu.io(top, "write -P 0x07 0 64k")
    assert img("resize", str(top), str(1 << 45)) == 0
    before = digest(base), digest(top)
    assert img("commit", str(top)) == 1
    assert (digest(base), digest(top)) == before


# -- 2.5 / 2.6 images backed by themselves, backing loops -----------------------------------


def test_create_refuses_an_image_backed_by_itself(qemu: Any, tmp_path: Path, digest: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # same name, file absent: qemu-img refuses too, and no file is left behind
    assert img("create", "-f", "qcow2", "-b", "e.qcow2", "e.qcow2") == 1
    assert qemu.img("create", "-f", "qcow2", "-b", "e.qcow2", "-F", "qcow2", "e.qcow2",
                    ok=False).returncode == 1
    assert not (tmp_path / "e.qcow2").exists()
    _qcow2_with_data(qemu, tmp_path / "e.qcow2")
    before = digest(tmp_path / "e.qcow2")
    for extra in ([], ["-u"]):  # another spelling of the same file, with and without -u
        assert img("create", "-f", "qcow2", *extra, "-b", "./e.qcow2", "-F", "qcow2",
                   "e.qcow2", "1M") == 1
    # a longer cycle: f is backed by e, so e must not become backed by f
    qemu.img("create", "-f", "qcow2", "-b", "e.qcow2", "-F", "qcow2", "f.qcow2")
    for extra in ([], ["-u"]):
        assert img("create", "-f", "qcow2", *extra, "-b", "f.qcow2", "-F", "qcow2",
                   "e.qcow2", "1M") == 1
    assert digest(tmp_path / "e.qcow2") == before
    qemu.check(tmp_path / "e.qcow2")


def _loop(qemu: Any, tmp_path: Path) -> tuple[Path, Path]:
    """a.qcow2 -> b.qcow2 -> a.qcow2, made with qemu-img create -u."""
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    _qcow2_with_data(qemu, a)
    qemu.img("create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", str(b))
    qemu.img("create", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", str(a), "1M")
    return a, b


@pytest.mark.timeout(60)
def test_info_backing_chain_reports_a_loop(qemu: Any, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _loop(qemu, tmp_path)
    theirs = qemu.img("info", "--backing-chain", "a.qcow2", ok=False)
    assert theirs.returncode == 1 and theirs.stdout == ""
    capsys.readouterr()
    for extra in ([], ["--output=json"]):
        assert img("info", "--backing-chain", *extra, "a.qcow2") == 1
        out = capsys.readouterr()
        assert out.out == ""
        assert out.err.strip() == "pyhv: " + theirs.stderr.strip().removeprefix("qemu-img: ")
    # every other verb that follows the chain refuses it too (and none loops)
    for verb in (["map"], ["convert", "-O", "raw"], ["compare", "a.qcow2"], ["commit"],
                 ["rebase", "-b", "", "-F", "qcow2"], ["resize"]):
        args = [*verb, "a.qcow2"]
        if verb[0] == "convert":
            args.append("out.raw")
        if verb[0] == "resize":
            args.append("2M")
        assert img(*args) == (2 if verb[0] == "compare" else 1), verb  # qemu-img's
    assert not (tmp_path / "out.raw").exists()


def test_rebase_unsafe_repairs_a_loop_and_a_missing_backing_file(
        qemu: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    a, b = _loop(qemu, tmp_path)
    assert img("rebase", "-u", "-b", "", "a.qcow2") == 0  # the chain is never opened
    qemu.check(a)
    info = json.loads(qemu.img("info", "--output=json", "--backing-chain", "b.qcow2").stdout)
    assert [i["filename"] for i in info] == ["b.qcow2", "a.qcow2"]
    # a missing backing file: -u points the image elsewhere without opening either
    qemu.img("create", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "c.qcow2",
             "1M")
    assert img("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", "c.qcow2") == 0
    assert json.loads(qemu.img("info", "--output=json", "c.qcow2").stdout)[
        "backing-filename"] == "a.qcow2"
    # but rebase never links an image into its own chain (b is backed by a)
    assert img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2") == 1
    assert img("rebase", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2") == 1
    assert "backing-filename" not in json.loads(
        qemu.img("info", "--output=json", "a.qcow2").stdout)


# -- 2.8 resize of an overlay ---------------------------------------------------------------


def _overlay(qemu: Any, d: Path, compat: str, size: str) -> Path:
    d.mkdir()
    base, top = d / "base.qcow2", d / "top.qcow2"
    qemu.img("create", "-f", "qcow2", str(base), "4M")
    qemu.io(base, "write -P 0x09 0 4M")
    qemu.img("create", "-f", "qcow2", "-o", f"compat={compat}", "-b", "base.qcow2", "-F",
             "qcow2", str(top), size)
    return top


@pytest.mark.parametrize("old", ["1M", "1000k"])
def test_resize_overlay_grown_area_reads_zeros_as_qemu_img(qemu: Any, tmp_path: Path,
                                                           old: str) -> None:
    """qemu-img writes zero clusters over the grown area when the backing file is longer
    than the old size (the unaligned head as explicit zeros): same map, same data."""
    ours, theirs = (_overlay(qemu, tmp_path / w, "1.1", old) for w in ("pyhv", "qemu"))
    assert img("resize", str(ours), "2M") == 0
    qemu.img("resize", str(theirs), "2M")
    qemu.check(ours)
    data = qemu.raw(ours)
    n = 1000 << 10 if old == "1000k" else 1 << 20
    assert data == b"\x09" * n + bytes((2 << 20) - n)
    assert data == qemu.raw(theirs)
    assert qemu.img("map", "--output=json", str(ours)).stdout == \
        qemu.img("map", "--output=json", str(theirs)).stdout


def test_resize_v2_overlay_over_longer_backing_refused_as_qemu_img(qemu: Any, tmp_path: Path,
                                                                   digest: Any) -> None:
    ours, theirs = (_overlay(qemu, tmp_path / w, "0.10", "1M") for w in ("pyhv", "qemu"))
    before = digest(ours)
    assert img("resize", str(ours), "2M") == 1  # v2 has no zero clusters
    assert qemu.img("resize", str(theirs), "2M", ok=False).returncode == 1
    assert digest(ours) == before


def test_shrink_then_grow_never_brings_data_back(qemu: Any, tmp_path: Path) -> None:
    ours, theirs = (_overlay(qemu, tmp_path / w, "1.1", "4M") for w in ("pyhv", "qemu"))
    for p in (ours, theirs):
        qemu.io(p, "write -P 0x05 0 4M")
    assert img("resize", "--shrink", str(ours), "100k") == 0
    assert img("resize", str(ours), "4M") == 0
    qemu.img("resize", "--shrink", str(theirs), "100k")
    qemu.img("resize", str(theirs), "4M")
    qemu.check(ours)
    want = b"\x05" * (100 << 10) + bytes((4 << 20) - (100 << 10))
    assert qemu.raw(ours) == want == qemu.raw(theirs)
    # without a backing file qemu-img brings back the cut-off part of the last cluster
    # (docs/qcow2.md); pyhv zeroes it when it shrinks
    alone = tmp_path / "alone.qcow2"
    create(str(alone), 4 << 20)
    qemu.io(alone, "write -P 0x05 0 4M")
    assert img("resize", "--shrink", str(alone), "100k") == 0
    assert img("resize", str(alone), "4M") == 0
    qemu.check(alone)
    assert qemu.raw(alone) == want


# -- 2.10 compressed convert with narrow refcounts, cleanup after failures -------------------


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_convert_compressed_with_narrow_refcounts(qemu: Any, tmp_path: Path,
                                                  bits: int) -> None:
    """Repetitive data packs many compressed clusters into one host cluster: a count
    that would overflow starts a new cluster (qemu-img succeeds at every width)."""
    src = tmp_path / "src.qcow2"
    qemu.img("create", "-f", "qcow2", str(src), "8M")
    qemu.io(src, "write -P 0x41 0 8M")
    opts = f"refcount_bits={bits},cluster_size=16k"  # ~40-byte streams: 400 a cluster
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    assert img("convert", "-c", "-O", "qcow2", "-o", opts, str(src), str(ours)) == 0
    qemu.img("convert", "-c", "-O", "qcow2", "-o", opts, str(src), str(theirs))
    qemu.check(ours)
    assert qemu.img("compare", str(src), str(ours)).returncode == 0
    info = json.loads(qemu.img("check", "--output=json", str(ours)).stdout)
    assert info["compressed-clusters"] == 512


def _corrupt_late(qemu: Any, path: Path) -> None:
    """A qcow2 image whose second L2 table points past the end of the file: opening
    it succeeds, reading reaches the bad table only after the first 512 MiB."""
    qemu.img("create", "-f", "qcow2", str(path), "1G")
    qemu.io(path, "write -P 1 0 64k", "write -P 2 600M 64k")
    with Qcow2Image(str(path), read_only=True) as q:
        l2 = q.l1[1] & 0x00FFFFFFFFFFFE00
        at = l2 + 8 * ((600 << 20) % (512 << 20) // CS)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write((1 << 63 | 1 << 40).to_bytes(8, "big"))


@pytest.mark.parametrize("out_fmt", ["qcow2", "raw"])
def test_failed_convert_removes_the_output_it_created(qemu: Any, tmp_path: Path,
                                                      out_fmt: str) -> None:
    src = tmp_path / "bad.qcow2"
    _corrupt_late(qemu, src)
    out = tmp_path / f"out.{out_fmt}"
    assert img("convert", "-O", out_fmt, str(src), str(out)) == 1
    assert not out.exists()
    # an output that existed before is the user's: never removed (it was overwritten)
    out.write_bytes(b"precious")
    assert img("convert", "-O", out_fmt, str(src), str(out)) == 1
    assert out.exists()


def test_failed_create_leaves_no_file(tmp_path: Path) -> None:
    p = tmp_path / "x"
    assert img("create", "-f", "raw", str(p), "8E") == 1  # past qemu-img's int64 limit
    assert not p.exists()
    assert img("create", "-f", "qcow2", str(p), "8E") == 1
    assert not p.exists()
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    try:
        os.truncate(probe, 4 << 60)
        pytest.skip("this file system holds a 4 EiB file")
    except OSError:
        pass
    keep = tmp_path / "keep"  # the file system refuses 4 EiB: nothing is lost or left
    keep.write_bytes(b"old")
    assert img("create", "-f", "raw", str(keep), "4E") == 1
    assert keep.read_bytes() == b"old"
    assert img("create", "-f", "raw", str(p), "4E") == 1
    assert not p.exists()


def _limited_file_size() -> None:  # in the child: files may not grow past 256 KiB
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))


@pytest.mark.parametrize(("fmt", "size"), [("raw", "1M"), ("qcow2", "1P")])
def test_create_that_cannot_fit_leaves_an_existing_file(tmp_path: Path, digest: Any,
                                                        fmt: str, size: str) -> None:
    """A file size limit (RLIMIT_FSIZE: EFBIG, as a full or small file system would
    refuse): `create` over an existing image must find out before it drops the old
    content. raw: the size is tried first; qcow2 (1P: a 16 MiB L1 table to write): the
    new image's bytes are reserved first. The file is locked before either."""
    keep = tmp_path / "keep.img"
    keep.write_bytes(b"precious" * 1000)
    before = digest(keep)
    r = subprocess.run([sys.executable, "-m", "pyhv", "img", "create", "-f", fmt,
                        str(keep), size], preexec_fn=_limited_file_size,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("pyhv: cannot create") and "File too large" in r.stderr
    assert digest(keep) == before
    new = tmp_path / "new.img"  # a file the command created is removed again
    r = subprocess.run([sys.executable, "-m", "pyhv", "img", "create", "-f", fmt,
                        str(new), size], preexec_fn=_limited_file_size,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and not new.exists(), r.stderr


def test_failed_snapshot_leaves_the_file_unchanged(qemu: Any, tmp_path: Path,
                                                   digest: Any) -> None:
    """refcount_bits=1: a snapshot would need count 2 on shared clusters. qemu-img fails
    and leaks a cluster; pyhv fails and leaves no unreferenced byte behind."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for p in (ours, theirs):
        qemu.img("create", "-f", "qcow2", "-o", "refcount_bits=1", str(p), "1M")
        qemu.io(p, "write -P 1 0 256k")
    size, before = os.path.getsize(ours), digest(ours)
    assert img("snapshot", "-c", "s1", str(ours)) == 1
    assert os.path.getsize(ours) == size and digest(ours) == before
    qemu.check(ours)
    assert qemu.img("snapshot", "-c", "s1", str(theirs), ok=False).returncode == 1


def test_commit_and_rebase_leave_check_clean(qemu: Any, tmp_path: Path) -> None:
    """Sanity over a three-image chain: both verbs keep the data and the metadata."""
    a, b, c = (tmp_path / n for n in ("a.qcow2", "b.qcow2", "c.qcow2"))
    _qcow2_with_data(qemu, a, "2M")
    qemu.img("create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", str(b))
    qemu.io(b, "write -P 0x33 100k 200k", "write -z 1M 64k")
    qemu.img("create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", str(c))
    qemu.io(c, "write -P 0x44 1500k 10k")
    want = qemu.raw(c)
    assert img("rebase", "-b", "a.qcow2", "-F", "qcow2", str(c)) == 0
    qemu.check(c)
    assert qemu.raw(c) == want
    assert img("commit", str(c)) == 0
    for p in (a, c):
        qemu.check(p)
    assert qemu.raw(a) == want
