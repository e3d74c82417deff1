"""The newc cpio writer: round trips through its own reader and through busybox cpio."""

from __future__ import annotations

import gzip
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from pyhv.loader.initramfs import CpioError, Initramfs, read_newc, write_newc


def sample() -> Initramfs:
    fs = Initramfs()
    fs.add_file("/init", b"#!/bin/sh\necho hi\n", 0o755)
    fs.add_file("bin/busybox", bytes(range(256)) * 3 + b"x", 0o755)   # odd length: padding
    fs.add_symlink("bin/sh", "busybox")
    fs.add_device("dev/console", "c", 5, 1)
    fs.add_device("dev/vda", "b", 254, 0, 0o660)
    fs.add_dir("tmp", 0o1777)
    fs.add_file("a/b/c/deep.txt", b"deep")
    return fs


def test_round_trip() -> None:
    fs = sample()
    for compress in ("none", "gzip"):
        back = read_newc(fs.to_bytes(compress))
        assert back == fs.entries
    paths = [e.path for e in fs.entries]
    assert paths.index("a") < paths.index("a/b") < paths.index("a/b/c/deep.txt")
    by = {e.path: e for e in fs.entries}
    assert by["bin/sh"].kind == "symlink" and by["bin/sh"].data == b"busybox"
    assert by["dev/console"].kind == "char" and by["dev/console"].rdev == (5, 1)
    assert by["dev/vda"].kind == "block" and stat.S_IMODE(by["dev/vda"].mode) == 0o660
    assert by["tmp"].kind == "dir" and stat.S_IMODE(by["tmp"].mode) == 0o1777
    assert by["init"].mode == stat.S_IFREG | 0o755


def test_layout_is_newc() -> None:
    raw = Initramfs().to_bytes("none")           # just the trailer
    assert raw.startswith(b"070701") and b"TRAILER!!!\0" in raw and len(raw) % 4 == 0
    fs = Initramfs()
    fs.add_file("f", b"abc")
    raw = fs.to_bytes("none")
    # header (110) + "f\0" (2) = 112, already aligned; data "abc" + 1 pad byte
    assert raw[112:116] == b"abc\0" and raw[116:122] == b"070701"
    assert int(raw[6 + 8 * 6:6 + 8 * 7], 16) == 3              # filesize
    assert int(raw[6 + 8 * 11:6 + 8 * 12], 16) == 2            # namesize with NUL


def test_deterministic() -> None:
    assert sample().to_bytes() == sample().to_bytes()
    assert gzip.decompress(sample().to_bytes()) == sample().to_bytes("none")


@pytest.mark.parametrize("bad", ["", "/", "..", "a/../b"])
def test_bad_paths(bad: str) -> None:
    with pytest.raises(ValueError):
        Initramfs().add_file(bad, b"")


def test_duplicates_and_bad_parents() -> None:
    fs = Initramfs()
    fs.add_file("x", b"")
    with pytest.raises(ValueError, match="already"):
        fs.add_file("/x", b"")
    with pytest.raises(ValueError, match="not a directory"):
        fs.add_file("x/y", b"")
    with pytest.raises(ValueError):
        fs.add_device("d", "x", 1, 1)
    with pytest.raises(ValueError):
        fs.to_bytes("bzip9")


@pytest.mark.parametrize("damage", ["truncate", "magic", "hex"])
def test_reader_rejects_damage(damage: str) -> None:
    raw = bytearray(sample().to_bytes("none"))
    if damage == "truncate":
        raw = raw[:200]
    elif damage == "magic":
        raw[0:6] = b"070707"
    else:
        raw[10] = ord("G")
    with pytest.raises(CpioError):
        read_newc(bytes(raw))


def test_busybox_cpio_reads_it(tmp_path: Path) -> None:
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("no busybox on this host (the Debian image test covers it)")
    raw = write_newc(sample().entries)
    out = subprocess.run([busybox, "cpio", "-tv"], input=raw, capture_output=True, timeout=30,
                         check=True).stdout.decode()
    assert "bin/sh -> busybox" in out and "a/b/c/deep.txt" in out
    subprocess.run([busybox, "cpio", "-id"], input=raw, cwd=tmp_path, capture_output=True,
                   timeout=30, check=True)
    assert (tmp_path / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "bin/sh").is_symlink()
    assert (tmp_path / "bin/busybox").stat().st_size == 769
