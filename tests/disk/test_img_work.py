"""`pyhv img` does work that grows with the allocated data, not with the virtual size
(issue 9, 2.7): convert, map, commit, compare and rebase walk the allocation metadata
(block status) and read only data runs.

The tests count the bytes the verbs read and use virtual sizes (100 GiB, 1 PiB) that a
walk over every cluster or every byte could not finish within the test timeout; they
never measure time. Results are compared with qemu-img on the same files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyhv.cli import main
from pyhv.disk.qcow2.image import Qcow2Image
from pyhv.disk.raw import RawImage

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(120)]

PIB = 1 << 50


def img(*args: str) -> int:
    return main(["img", *args])


@pytest.fixture
def bytes_read(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Total bytes asked of Qcow2Image.read and RawImage.read (a chain read counts once
    per layer it reaches, so this is an upper bound of the data read)."""
    total = [0]
    for cls in (Qcow2Image, RawImage):
        orig = cls.read

        def counted(self: Any, offset: int, length: int, _orig: Any = orig) -> bytes:
            total[0] += length
            data: bytes = _orig(self, offset, length)
            return data

        monkeypatch.setattr(cls, "read", counted)
    yield total


def _sparse(qemu: Any, path: Path, size: int, *cmds: str, backing: str | None = None) -> None:
    args = ["create", "-f", "qcow2"]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    qemu.img(*args, str(path), str(size))
    if cmds:
        qemu.io(path, *cmds)


@pytest.mark.parametrize("out_fmt", ["qcow2", "raw"])
def test_convert_of_an_empty_100g_image_reads_nothing(qemu: Any, tmp_path: Path,
                                                      out_fmt: str,
                                                      bytes_read: list[int]) -> None:
    src, out = tmp_path / "e.qcow2", tmp_path / f"o.{out_fmt}"
    _sparse(qemu, src, 100 << 30)
    assert img("convert", "-O", out_fmt, str(src), str(out)) == 0
    assert bytes_read[0] == 0
    assert os.stat(out).st_blocks * 512 < 1 << 20  # nothing written either
    assert qemu.img("compare", str(src), str(out)).returncode == 0


# Each layout runs at 64 GiB, where qemu-img is the reference (its map and compare walk
# a 1 PiB chain in seconds each), and at 1 PiB, where pyhv alone is checked (by qemu-io
# reads and qemu-img check) and a walk over every cluster would take hours.
SIZES = [pytest.param(64 << 30, id="64G"), pytest.param(PIB, id="1P")]


@pytest.mark.parametrize("size", SIZES)
def test_convert_compare_map_of_a_sparse_chain(qemu: Any, tmp_path: Path, size: int,
                                               capsys: pytest.CaptureFixture[str],
                                               bytes_read: list[int]) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    far = size // 4 * 3
    _sparse(qemu, base, size, "write -P 1 0 64k", f"write -P 2 {far} 128k")
    _sparse(qemu, top, size + (1 << 20), "write -P 3 64k 64k", f"write -z {far} 64k",
            f"write -P 4 {size} 4k", backing="base.qcow2")
    out = tmp_path / "flat.qcow2"
    assert img("convert", "-O", "qcow2", str(top), str(out)) == 0
    assert bytes_read[0] <= 2 * (64 + 64 + 64 + 64 + 4 << 10)
    qemu.check(out)
    qemu.io(out, "read -P 1 0 64k", "read -P 3 64k 64k", "read -P 0 128k 64k",
            f"read -P 0 {far} 64k", f"read -P 2 {far + 65536} 64k", f"read -P 4 {size} 4k",
            f"read -P 0 {size + 4096} 60k")
    capsys.readouterr()
    bytes_read[0] = 0
    assert img("compare", str(top), str(out)) == 0
    assert capsys.readouterr().out == "Images are identical.\n"
    assert bytes_read[0] <= 4 * (1 << 20)
    assert img("map", "--output=json", str(top)) == 0
    ours = capsys.readouterr().out
    assert json.loads(ours)[-1]["start"] + json.loads(ours)[-1]["length"] == size + (1 << 20)
    qemu.io(out, f"write -P 5 {size + 512} 1")  # a difference at the very end
    assert img("compare", str(top), str(out)) == 1
    assert capsys.readouterr().out == f"Content mismatch at offset {size + 512}!\n"
    if size < PIB:
        assert ours == qemu.img("map", "--output=json", str(top)).stdout
        assert img("compare", str(top), str(out)) == 1
        assert capsys.readouterr().out == \
            qemu.img("compare", str(top), str(out), ok=False).stdout


@pytest.mark.parametrize("size", SIZES)
def test_commit_after_a_huge_resize(qemu: Any, tmp_path: Path, size: int,
                                    bytes_read: list[int]) -> None:
    whos = ("pyhv", "qemu") if size < PIB else ("pyhv",)
    maps = {}
    for who in whos:
        d = tmp_path / who
        d.mkdir()
        base, top = d / "base.qcow2", d / "top.qcow2"
        _sparse(qemu, base, 1 << 20, "write -P 9 0 1M")
        _sparse(qemu, top, 1 << 20, backing="base.qcow2")
        if who == "pyhv":
            assert img("resize", str(top), f"+{size}") == 0
        else:
            qemu.img("resize", str(top), f"+{size}")
        far = size // 8 * 7
        qemu.io(top, f"write -P 3 {far} 64k", "write -P 4 512k 4k")
        bytes_read[0] = 0
        if who == "pyhv":
            assert img("commit", str(top)) == 0
            assert bytes_read[0] <= 2 * (64 + 64 << 10)
        else:
            qemu.img("commit", str(top))
        qemu.check(base)
        qemu.check(top)
        info = json.loads(qemu.img("info", "--output=json", str(base)).stdout)
        assert info["virtual-size"] == size + (1 << 20)
        for p in (base, top):  # the top reads through to the base that now holds it all
            qemu.io(p, "read -P 9 0 512k", "read -P 4 512k 4k", f"read -P 3 {far} 64k",
                    f"read -P 0 {far + 65536} 64k")
        if size < PIB:
            maps[who] = [json.loads(qemu.img("map", "--output=json", str(p)).stdout)
                         for p in (base, top)]
    if size < PIB:
        keys = ("start", "length", "depth", "zero", "data")
        assert [[{k: r[k] for k in keys} for r in m] for m in maps["pyhv"]] == \
            [[{k: r[k] for k in keys} for r in m] for m in maps["qemu"]]


@pytest.mark.parametrize("size", SIZES)
def test_rebase_reads_only_data(qemu: Any, tmp_path: Path, size: int,
                                bytes_read: list[int]) -> None:
    a, b, top = tmp_path / "a.qcow2", tmp_path / "b.qcow2", tmp_path / "top.qcow2"
    far = size // 4 * 3
    _sparse(qemu, a, size, "write -P 1 0 64k", f"write -P 2 {far} 64k")
    _sparse(qemu, b, size, "write -P 1 0 64k")
    _sparse(qemu, top, size, "write -P 3 128k 64k", backing="a.qcow2")
    if size < PIB:
        want = tmp_path / "want.qcow2"
        qemu.img("convert", "-O", "qcow2", str(top), str(want))
    bytes_read[0] = 0
    assert img("rebase", "-b", "b.qcow2", "-F", "qcow2", str(top)) == 0
    assert bytes_read[0] <= 8 * (64 << 10)
    qemu.check(top)
    qemu.io(top, "read -P 1 0 64k", "read -P 0 64k 64k", "read -P 3 128k 64k",
            f"read -P 2 {far} 64k", f"read -P 0 {far + 65536} 64k")
    if size < PIB:
        assert qemu.img("compare", str(top), str(want)).returncode == 0
        assert json.loads(qemu.img("map", "--output=json", str(top)).stdout)[0]["depth"] == 1
