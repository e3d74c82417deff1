"""Smaller differences from qemu-img (issue 9, 2.12) and tracebacks (2.13): `compare`'s
text and statuses, raw files whose size is not a multiple of 512, shrinking a v3 image
that has snapshots, the compression-type bit with zlib, and `pyhv img` failing with one
line (never a traceback) on bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from pyhv.cli import main

pytestmark = pytest.mark.qemu


def img(*args: str) -> int:
    return main(["img", *args])


# -- compare -------------------------------------------------------------------------------


@pytest.fixture
def compare_files(qemu: Any, tmp_path: Path) -> Path:
    """A small zoo: qcow2 with data, zero and compressed clusters, an overlay, raw files
    with holes, data and a differing byte, images of another size."""
    d = tmp_path
    for name, fmt, size, cmds in [
        ("a.qcow2", "qcow2", "1M", ["write -P 7 0 64k"]),
        ("c.qcow2", "qcow2", "1M", ["write -c -P 7 0 64k"]),
        ("z.qcow2", "qcow2", "1M", ["write -z 0 1M"]),
        ("r.raw", "raw", "1M", ["write -P 7 0 64k"]),
        ("byte.raw", "raw", "1M", ["write -P 7 0 64k", "write -P 8 1005 1"]),
        ("hole.raw", "raw", "1M", []),
        ("full.raw", "raw", "1M", ["write -P 0 0 1M"]),
        ("big.raw", "raw", "2M", ["write -P 7 0 64k"]),
        ("bigdata.raw", "raw", "2M", ["write -P 7 0 64k", "write -P 1 1500k 1"]),
        ("big.qcow2", "qcow2", "2M", ["write -P 7 0 64k", "write -z 1M 64k"]),
    ]:
        qemu.img("create", "-f", fmt, str(d / name), size)
        if cmds:
            qemu.io(d / name, *cmds, fmt=fmt)
    qemu.img("create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", str(d / "ov.qcow2"))
    return d


PAIRS = [("a.qcow2", "r.raw"), ("a.qcow2", "byte.raw"), ("byte.raw", "a.qcow2"),
         ("a.qcow2", "c.qcow2"), ("z.qcow2", "hole.raw"), ("hole.raw", "full.raw"),
         ("a.qcow2", "ov.qcow2"), ("ov.qcow2", "r.raw"), ("a.qcow2", "big.raw"),
         ("big.raw", "a.qcow2"), ("a.qcow2", "bigdata.raw"), ("bigdata.raw", "r.raw"),
         ("big.qcow2", "a.qcow2"), ("z.qcow2", "full.raw"), ("a.qcow2", "missing.qcow2")]


@pytest.mark.parametrize("flags", [[], ["-s"], ["-q"]], ids=["plain", "strict", "quiet"])
def test_compare_text_and_status_as_qemu_img(qemu: Any, compare_files: Path,
                                             flags: list[str],
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Mismatches at the start of the differing sector, the size-mismatch warning,
    strict mode's size and block-status checks, exit statuses 0/1/2."""
    monkeypatch.chdir(compare_files)
    capsys.readouterr()
    for x, y in PAIRS:
        theirs = qemu.img("compare", *flags, x, y, ok=False)
        rc = img("compare", *flags, x, y)
        assert (rc, capsys.readouterr().out) == (theirs.returncode, theirs.stdout), (x, y)


# -- raw sizes that are not a multiple of 512 ------------------------------------------------


def test_raw_size_rounded_up_to_sectors_as_qemu_img(qemu: Any, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "odd.raw"
    raw.write_bytes(bytes(range(256)) * 3 + b"\x01" * 232)  # 1000 bytes
    capsys.readouterr()
    assert img("info", "--output=json", str(raw)) == 0
    ours = json.loads(capsys.readouterr().out)
    theirs = json.loads(qemu.img("info", "--output=json", str(raw)).stdout)
    assert ours["virtual-size"] == theirs["virtual-size"] == 1024
    assert img("map", "--output=json", str(raw)) == 0
    assert capsys.readouterr().out == qemu.img("map", "--output=json", str(raw)).stdout
    for fmt in ("qcow2", "raw"):
        out, ref = tmp_path / f"o.{fmt}", tmp_path / f"ref.{fmt}"
        assert img("convert", "-O", fmt, str(raw), str(out)) == 0
        qemu.img("convert", "-O", fmt, str(raw), str(ref))
        assert qemu.img("compare", str(out), str(ref)).returncode == 0
        assert json.loads(qemu.img("info", "--output=json", str(out)).stdout)[
            "virtual-size"] == 1024
        if fmt == "raw":
            assert os.path.getsize(out) == os.path.getsize(ref) == 1024
    assert img("compare", str(raw), str(tmp_path / "o.qcow2")) == 0
    # a qcow2 image's new size must be whole sectors (qemu-img refuses the same)
    q = tmp_path / "o.qcow2"
    assert img("resize", str(q), "1500") == 1
    assert qemu.img("resize", str(q), "1500", ok=False).returncode == 1


# -- resize --shrink with internal snapshots (v3) --------------------------------------------


def test_shrink_v3_image_with_snapshots_as_qemu_img(qemu: Any, tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for p in (ours, theirs):
        qemu.img("create", "-f", "qcow2", str(p), "4M")
        qemu.io(p, "write -P 1 0 4M")
        qemu.img("snapshot", "-c", "full", str(p))
        qemu.io(p, "write -P 2 0 64k")
    assert img("resize", "--shrink", str(ours), "1000k") == 0
    qemu.img("resize", "--shrink", str(theirs), "1000k")
    qemu.check(ours)
    assert qemu.raw(ours) == qemu.raw(theirs)[:1000 << 10] == \
        b"\x02" * (64 << 10) + b"\x01" * (936 << 10)
    for p in (ours, theirs):  # the snapshot still holds the whole 4 MiB
        qemu.img("snapshot", "-a", "full", str(p))
        qemu.check(p)
        assert qemu.raw(p) == b"\x01" * (4 << 20)
    # v2 images with snapshots cannot change size in qemu-img: refused the same way
    v2 = tmp_path / "v2.qcow2"
    qemu.img("create", "-f", "qcow2", "-o", "compat=0.10", str(v2), "4M")
    qemu.img("snapshot", "-c", "s", str(v2))
    assert img("resize", "--shrink", str(v2), "1M") == 1
    assert qemu.img("resize", "--shrink", str(v2), "1M", ok=False).returncode == 1


# -- the compression-type feature bit -------------------------------------------------------


def test_compression_type_bit_with_zlib_refused_as_qemu(qemu: Any, tmp_path: Path,
                                                        digest: Any) -> None:
    p = tmp_path / "bit.qcow2"
    qemu.img("create", "-f", "qcow2", str(p), "1M")
    with open(p, "r+b") as f:
        f.seek(72)
        incompat = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", incompat | 1 << 3))  # compression type bit, type 0 (zlib)
        f.seek(104)
        assert f.read(1) == b"\0"
    before = digest(p)
    assert qemu.img("info", str(p), ok=False).returncode == 1
    assert img("info", str(p)) == 1
    assert img("check", str(p)) == 1
    assert img("resize", str(p), "2M") == 1
    assert digest(p) == before


# -- no tracebacks ---------------------------------------------------------------------------


def _run(args: list[str]) -> tuple[int, str]:
    """Run `pyhv img ARGS`; any exception escaping main() fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(["img", *args])
        except SystemExit as e:  # argparse usage errors
            rc = int(e.code or 0)
    return rc, err.getvalue()


@pytest.mark.parametrize(("args", "status", "qemu_status"), [
    (["create", "-f", "qcow2", "-o", "refcount_bits=abc", "x", "1M"], 1, 1),
    (["create", "-f", "qcow2", "-o", "refcount_bits=0", "x", "1M"], 1, 1),
    (["create", "-f", "qcow2", "-o", "cluster_size=0", "x", "1M"], 1, 1),
    (["create", "-f", "raw", "x", "8E"], 1, 1),
    (["check", "missing.qcow2"], 1, 1),
    (["check", "r.raw"], 63, 63),
    (["check", "dir"], 1, 1),
    (["check", "-f", "qcow2", "dir"], 1, 1),
    (["info", "-f", "qcow2", "dir"], 1, 1),
    (["info", "r.raw", "--output=json"], 0, 0),
    (["snapshot", "-c", "x" * 70000, "q.qcow2"], 1, 0),
    (["convert", "-O", "raw", "q.qcow2", "dir"], 1, 1),
    (["resize", "q.qcow2", "-2M"], 1, 1),
    (["resize", "q.qcow2", "+8E"], 1, 1),
    (["commit", "r.raw"], 1, 1),
    (["map", "empty"], 0, 0),
])
def test_bad_input_gets_one_line_not_a_traceback(qemu: Any, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 args: list[str], status: int,
                                                 qemu_status: int) -> None:
    monkeypatch.chdir(tmp_path)
    qemu.img("create", "-f", "qcow2", "q.qcow2", "1M")
    Path("r.raw").write_bytes(b"r" * 1000)
    Path("empty").write_bytes(b"")
    Path("dir").mkdir()
    rc, err = _run(args)
    assert rc == status
    assert "Traceback" not in err
    if rc:
        assert err.startswith("pyhv: ") and err.count("\n") == 1
    assert not Path("x").exists()  # a failed create leaves nothing behind
    if args[0] != "snapshot":  # qemu-img cuts long snapshot names (docs/qcow2.md)
        assert qemu.img(*args, ok=False).returncode == qemu_status


def test_no_traceback_over_a_sweep_of_bad_input(qemu: Any, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Verbs x odd files (missing, empty, a directory, a truncated header, /dev/null, a
    dangling link) and odd sizes and options: every failure is one `pyhv:` line."""
    monkeypatch.chdir(tmp_path)
    qemu.img("create", "-f", "qcow2", "q.qcow2", "1M")
    Path("empty").write_bytes(b"")
    Path("short.qcow2").write_bytes(b"QFI\xfb\0\0\0\3")
    Path("dir").mkdir()
    os.symlink("nowhere", "dangling")
    files = ["missing", "empty", "short.qcow2", "dir", "/dev/null", "dangling"]
    cmds: list[list[str]] = []
    for f in files:
        cmds += [["info", f], ["info", "--backing-chain", f], ["check", "-r", "all", f],
                 ["map", f], ["snapshot", "-l", f], ["snapshot", "-c", "s", f], ["commit", f],
                 ["rebase", "-u", "-b", "", f], ["compare", f, "q.qcow2"],
                 ["convert", "-O", "qcow2", f, "out.qcow2"], ["resize", f, "+1M"],
                 ["create", "-f", "qcow2", "-b", f, "-F", "qcow2", "n.qcow2"]]
    for size in ["-1", "1.5", "abc", "", "99999999999999999999E", "+8E"]:
        cmds += [["create", "-f", "qcow2", "n.qcow2", size], ["resize", "q.qcow2", size]]
    for opt in ["cluster_size=", "compat=", "=", "lazy_refcounts=maybe", "refcount_bits=3",
                "refcount_bits=128", "cluster_size=1T", "compat=0.10,lazy_refcounts=on",
                "preallocation=full", "foo"]:
        cmds += [["create", "-f", "qcow2", "-o", opt, "n.qcow2", "1M"],
                 ["convert", "-O", "qcow2", "-o", opt, "q.qcow2", "n.qcow2"]]
    for args in cmds:
        rc, err = _run(args)
        assert "Traceback" not in err, args
        if rc:
            assert err.startswith(("pyhv: ", "usage: ")), (args, err)
        assert not Path("out.qcow2").exists() and not Path("n.qcow2").exists() or rc == 0
        for leftover in ("out.qcow2", "n.qcow2"):
            if os.path.exists(leftover):
                os.unlink(leftover)


# -- exit statuses ---------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["create", "-Z", "x", "1M"],  # an unknown option
    ["create"],  # missing arguments
    ["check", "-r", "bogus", "q.qcow2"],  # a bad option value
    ["compare", "q.qcow2"],  # compare's usage error is 1 too, not its open error 2
    ["frobnicate", "q.qcow2"],  # no such verb
    ["info", "missing.qcow2"],  # an error
    ["resize", "q.qcow2", "100k"],  # a refused change (shrinking needs --shrink)
    ["compare", "missing.qcow2", "q.qcow2"],  # compare: cannot open, 2
    ["compare", "q.qcow2", "q.qcow2"],  # identical, 0
])
def test_exit_statuses_are_qemu_imgs(qemu: Any, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch,
                                     args: list[str]) -> None:
    """`pyhv img` exits as qemu-img does: 1 for any error, bad command lines included
    (argparse's usual 2 is not used here); compare's 2 for an image it cannot open."""
    monkeypatch.chdir(tmp_path)
    qemu.img("create", "-f", "qcow2", "q.qcow2", "1M")
    rc, err = _run(args)
    assert "Traceback" not in err
    assert rc == qemu.img(*args, ok=False).returncode


def test_compare_status_3_when_block_status_fails(qemu: Any, tmp_path: Path) -> None:
    """An L2 entry past the end of the file: pyhv refuses it when it walks block status
    (qemu-img's status 3, "error while reading block status"); qemu-img itself reads
    such a cluster as zeros (docs/qcow2.md)."""
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    for p in (a, b):
        qemu.img("create", "-f", "qcow2", str(p), "1M")
        qemu.io(p, "write -P 1 0 64k")
    l1 = int.from_bytes(a.read_bytes()[40:48], "big")
    l2 = int.from_bytes(a.read_bytes()[l1:l1 + 8], "big") & 0x00FFFFFFFFFFFE00
    with open(a, "r+b") as f:
        f.seek(l2)
        f.write((1 << 63 | 1 << 40).to_bytes(8, "big"))
    rc, err = _run(["compare", str(a), str(b)])
    assert rc == 3 and err.startswith("pyhv: ") and "past the end of the file" in err
