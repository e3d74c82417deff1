"""compat=0.10 (v2) images with internal snapshots, against qemu-img: what v2 cannot
express is refused with qemu-img's words, and snapshot table entries are written the
way QEMU writes them, in both versions."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from pyhv.cli import main
from pyhv.disk.qcow2 import Qcow2Image

pytestmark = pytest.mark.qemu

V2_RESIZE = "Can't resize a v2 image which has snapshots"


def img(*args: str) -> int:
    return main(["img", *args])


def entries(p: Path) -> list[tuple[tuple[int, ...], bytes, str]]:
    """(fixed fields, extra data, name) of each snapshot table entry."""
    data = p.read_bytes()
    n, off = struct.unpack(">IQ", data[60:72])
    out = []
    for _ in range(n):
        f = struct.unpack(">QIHHIIQII", data[off:off + 40])
        extra = data[off + 40:off + 40 + f[8]]
        name = data[off + 40 + f[8] + f[2]:off + 40 + f[8] + f[2] + f[3]].decode()
        out.append((f, extra, name))
        off += 40 + f[8] + f[2] + f[3]
        off += -off % 8
    return out


def _v2_with_snapshot(qemu: Any, tmp: Path, maker: str) -> Path:
    p = tmp / f"v2-{maker}.qcow2"
    if maker == "qemu":
        qemu.img("create", "-f", "qcow2", "-o", "compat=0.10", str(p), "1M")
        qemu.io(p, "write -P 0x11 0 64k")
        qemu.img("snapshot", "-c", "s1", str(p))
    else:
        assert img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(p), "1M") == 0
        with Qcow2Image(str(p)) as i:
            i.write(0, b"\x11" * 65536)
        assert img("snapshot", "-c", "s1", str(p)) == 0
    return p


@pytest.mark.parametrize("maker", ["qemu", "pyhv"])
@pytest.mark.parametrize("size", ["2M", "+64K", "--shrink 512K"])
def test_v2_resize_with_snapshots_refused_like_qemu(qemu: Any, tmp_path: Path, maker: str,
                                                    size: str, digest: Any,
                                                    capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    p = _v2_with_snapshot(qemu, tmp_path, maker)
    q = tmp_path / "q.qcow2"
    shutil.copy(p, q)
    *opts, new = size.split()
    r = qemu.img("resize", *opts, str(q), new, ok=False)
    assert r.returncode == 1 and V2_RESIZE in r.stderr
    before = digest(p)
    capsys.readouterr()
    assert img("resize", *opts, str(p), new) == 1
    assert V2_RESIZE in capsys.readouterr().err
    assert digest(p) == before
    qemu.img("snapshot", "-a", "s1", str(p))  # still revertible by QEMU
    qemu.check(p)


def test_v2_resize_once_snapshots_are_gone(qemu: Any, tmp_path: Path) -> None:
    p = _v2_with_snapshot(qemu, tmp_path, "pyhv")
    assert img("snapshot", "-d", "s1", str(p)) == 0
    assert img("resize", str(p), "2M") == 0
    qemu.check(p)
    assert qemu.raw(p)[:65536] == b"\x11" * 65536 and len(qemu.raw(p)) == 2 << 20


def test_v2_snapshot_of_another_size_not_applied(qemu: Any, tmp_path: Path, digest: Any,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A v2 snapshot recording a size other than the image's (what pyhv's old resize
    left behind): QEMU cannot revert to it ("Operation not supported"), nor does pyhv."""
    p = _v2_with_snapshot(qemu, tmp_path, "qemu")
    data = bytearray(p.read_bytes())
    off = struct.unpack(">Q", data[64:72])[0]
    assert struct.unpack(">I", data[off + 36:off + 40])[0] >= 16
    struct.pack_into(">Q", data, off + 48, 2 << 20)  # extra data: disk_size
    p.write_bytes(bytes(data))
    q = tmp_path / "q.qcow2"
    shutil.copy(p, q)
    r = qemu.img("snapshot", "-a", "s1", str(q), ok=False)
    assert r.returncode == 1 and V2_RESIZE in r.stderr and "Operation not supported" in \
        r.stderr
    before = digest(p)
    capsys.readouterr()
    assert img("snapshot", "-a", "s1", str(p)) == 1
    err = capsys.readouterr().err
    assert V2_RESIZE in err and "Could not apply snapshot 's1'" in err
    assert "Operation not supported" in err
    assert digest(p) == before


def test_v3_resize_with_snapshots_then_revert(qemu: Any, tmp_path: Path) -> None:
    """v3 records each snapshot's size: resizing is allowed and reverting restores the
    old size, in pyhv as in QEMU."""
    p = tmp_path / "v3.qcow2"
    assert img("create", "-q", "-f", "qcow2", str(p), "1M") == 0
    with Qcow2Image(str(p)) as i:
        i.write(0, b"\x22" * 4096)
    assert img("snapshot", "-c", "s1", str(p)) == 0
    assert img("resize", str(p), "3M") == 0
    q = tmp_path / "q.qcow2"
    shutil.copy(p, q)
    qemu.img("snapshot", "-a", "s1", str(q))
    assert img("snapshot", "-a", "s1", str(p)) == 0
    qemu.check(p)
    assert qemu.raw(p) == qemu.raw(q)
    assert len(qemu.raw(p)) == 1 << 20


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_snapshot_entries_written_as_qemu_writes_them(qemu: Any, tmp_path: Path,
                                                      compat: str) -> None:
    """Both versions: 24 bytes of extra data (vm state size, disk size, icount), an old
    entry without them completed (icount unknown: all ones) when the table is
    rewritten, byte for byte as qemu-img does."""
    p = tmp_path / "a.qcow2"
    qemu.img("create", "-f", "qcow2", "-o", f"compat={compat}", str(p), "1M")
    qemu.img("snapshot", "-c", "old", str(p))
    data = bytearray(p.read_bytes())  # make the entry an old-style one (no extra data)
    off = struct.unpack(">Q", data[64:72])[0]
    f = list(struct.unpack(">QIHHIIQII", data[off:off + 40]))
    ids = data[off + 40 + f[8]:off + 40 + f[8] + f[2] + f[3]]
    f[8] = 0
    entry = struct.pack(">QIHHIIQII", *f) + ids
    data[off:off + len(entry) + 24] = entry.ljust(len(entry) + 24, b"\0")
    p.write_bytes(bytes(data))
    mine, theirs = tmp_path / "mine.qcow2", tmp_path / "theirs.qcow2"
    shutil.copy(p, mine)
    shutil.copy(p, theirs)
    qemu.img("snapshot", "-c", "new", str(theirs))
    assert img("snapshot", "-c", "new", str(mine)) == 0
    got, want = entries(mine), entries(theirs)
    assert [(e[0][1], e[0][2], e[0][3], e[0][8], e[1], e[2]) for e in got] == \
           [(e[0][1], e[0][2], e[0][3], e[0][8], e[1], e[2]) for e in want]
    assert got[0][1][16:] == b"\xff" * 8 and got[1][1][16:] == bytes(8)
    qemu.check(mine)


def test_v3_incomplete_entry_reported_and_completed(qemu: Any, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    """A v3 entry without the disk size: qemu-img check calls it a corruption
    ("snapshot table entry 0 is incomplete"), so does pyhv; -r all completes it."""
    p = tmp_path / "a.qcow2"
    qemu.img("create", "-f", "qcow2", str(p), "1M")
    qemu.img("snapshot", "-c", "s1", str(p))
    data = bytearray(p.read_bytes())
    off = struct.unpack(">Q", data[64:72])[0]
    struct.pack_into(">I", data, off + 36, 8)  # only vm_state_size_large is left
    f = struct.unpack(">QIHHIIQII", bytes(data[off:off + 40]))
    ids = bytes(data[off + 40 + 24:off + 40 + 24 + f[2] + f[3]])
    data[off + 48:off + 48 + len(ids)] = ids
    p.write_bytes(bytes(data))
    r = qemu.img("check", str(p), ok=False)
    assert r.returncode == 2 and "snapshot table entry 0 is incomplete" in r.stderr
    capsys.readouterr()
    assert img("check", str(p)) == 2
    assert "snapshot table entry 0 is incomplete" in capsys.readouterr().err
    assert img("check", "-r", "all", str(p)) == 0
    qemu.check(p)
    assert entries(p)[0][0][8] == 24
