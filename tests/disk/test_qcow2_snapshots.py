"""Internal snapshots: made by pyhv and read by qemu-img, and the reverse."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pyhv.cli import main
from pyhv.disk.qcow2 import Qcow2Image, check, create
from pyhv.errors import ImageError

pytestmark = pytest.mark.qemu


def _names(qemu: Any, p: Path) -> list[tuple[str, str]]:
    info = json.loads(qemu.img("info", "--output=json", str(p)).stdout)
    return [(s["id"], s["name"]) for s in info.get("snapshots", [])]


@pytest.mark.parametrize(("cs", "version"), [(65536, 3), (65536, 2), (512, 3), (4096, 3)])
def test_pyhv_snapshots_qemu_applies(qemu: Any, tmp_path: Path, cs: int,
                                     version: int) -> None:
    p = tmp_path / "a.qcow2"
    create(str(p), 2 << 20, cluster_size=cs, version=version)
    with Qcow2Image(str(p)) as img:
        img.write(0, b"A" * 100000)
        img.snapshot_create("one")
        img.write(50, b"B" * 1000)
        img.write(1 << 20, b"C" * 5000)
        img.snapshot_create("two")
        img.write(0, b"D" * 10)
        now = img.read(0, img.size)
    qemu.check(p)
    assert _names(qemu, p) == [("1", "one"), ("2", "two")]
    assert qemu.raw(p) == now
    qemu.img("snapshot", "-a", "one", str(p))
    qemu.check(p)
    assert qemu.raw(p) == b"A" * 100000 + bytes((2 << 20) - 100000)
    qemu.img("snapshot", "-a", "two", str(p))
    want = bytearray(b"A" * 100000 + bytes((2 << 20) - 100000))
    want[50:1050] = b"B" * 1000
    want[1 << 20:(1 << 20) + 5000] = b"C" * 5000
    assert qemu.raw(p) == want
    qemu.img("snapshot", "-d", "one", str(p))
    qemu.check(p)
    assert _names(qemu, p) == [("2", "two")]


def test_qemu_snapshots_pyhv_applies(qemu: Any, tmp_path: Path, view: Any) -> None:
    p = tmp_path / "q.qcow2"
    qemu.img("create", "-f", "qcow2", str(p), "4M")
    qemu.io(p, "write -P 0x11 0 1M")
    s1 = qemu.raw(p)
    qemu.img("snapshot", "-c", "s1", str(p))
    qemu.io(p, "write -P 0x22 512k 1M", "write -P 0x33 3M 4k")
    s2 = qemu.raw(p)
    qemu.img("snapshot", "-c", "s2", str(p))
    qemu.io(p, "write -P 0x44 0 4k")
    now = qemu.raw(p)
    with Qcow2Image(str(p)) as img:
        assert [(s.id_str, s.name) for s in img.snapshots] == [("1", "s1"), ("2", "s2")]
        assert img.read(0, img.size) == now
        # writes through tables shared with qemu's snapshots copy on write
        img.write(600 << 10, b"Z" * 70000)
        img.snapshot_apply("s1")
        assert img.read(0, img.size) == s1
    qemu.check(p)
    assert qemu.raw(p) == s1
    with Qcow2Image(str(p)) as img:
        img.snapshot_apply("2")  # by ID
        img.snapshot_delete("s1")
    qemu.check(p)
    assert qemu.raw(p) == s2
    assert _names(qemu, p) == [("2", "s2")]
    assert view(p) == s2


def test_snapshot_errors(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    create(str(p), 1 << 20)
    with Qcow2Image(str(p)) as img:
        img.snapshot_create("x")
        with pytest.raises(ImageError, match="already exists"):
            img.snapshot_create("x")
        with pytest.raises(ImageError, match="no snapshot"):
            img.snapshot_apply("nope")
    with Qcow2Image(str(p), read_only=True) as img, pytest.raises(ImageError, match="read-only"):
        img.snapshot_create("y")


def test_refcount_bits_1_cannot_share(tmp_path: Path, qemu: Any) -> None:
    p = tmp_path / "a.qcow2"
    create(str(p), 1 << 20, refcount_bits=1)
    before = p.read_bytes()
    with Qcow2Image(str(p)) as img:
        img.write(0, b"x" * 4096)
        with pytest.raises(ImageError, match="overflow"):
            img.snapshot_create("s")
    qemu.check(p)
    assert before != p.read_bytes()


def test_many_snapshots_then_delete_all(qemu: Any, tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    create(str(p), 1 << 20, cluster_size=4096)
    states = []
    with Qcow2Image(str(p)) as img:
        for i in range(6):
            img.write(i * 3000, bytes([i + 1]) * 5000)
            img.snapshot_create(f"s{i}")
            states.append(img.read(0, img.size))
        for i in (3, 0, 5):
            img.snapshot_apply(f"s{i}")
            assert img.read(0, img.size) == states[i]
        for i in range(6):
            img.snapshot_delete(f"s{i}")
        assert check(img).exit_status == 0
    qemu.check(p)
    assert qemu.raw(p) == states[5]


def test_cli_hands_on(qemu: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The seed's hands-on: create, snapshot -c twice, snapshot -l."""
    p = str(tmp_path / "disk.qcow2")
    assert main(["img", "create", "-f", "qcow2", p, "1G"]) == 0
    assert main(["img", "snapshot", "-c", "snap1", p]) == 0
    assert main(["img", "snapshot", "-c", "snap2", p]) == 0
    capsys.readouterr()
    assert main(["img", "snapshot", "-l", p]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "Snapshot list:"
    assert "snap1" in out and "snap2" in out
    theirs = qemu.img("snapshot", "-l", p).stdout
    assert [ln.split()[:2] for ln in theirs.splitlines()[2:]] == \
        [ln.split()[:2] for ln in out.splitlines()[2:]]
    assert main(["img", "snapshot", "-a", "snap1", p]) == 0
    assert main(["img", "snapshot", "-d", "snap2", p]) == 0
    qemu.check(p)
