"""Image locking against QEMU, both directions: pyhv and qemu-io / qemu-img refuse each
other's conflicting opens, with the same lock bytes (read back from /proc/locks)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pyhv.cli import main
from pyhv.disk import lock as L
from pyhv.disk.open import open_image
from pyhv.disk.qcow2 import Qcow2Image, create
from pyhv.disk.raw import RawImage
from pyhv.errors import ImageError

pytestmark = pytest.mark.qemu

SRC = str(Path(__file__).resolve().parents[2] / "src")
WRITE_LOCK = 'Failed to get "write" lock'
SHARED_WRITE_LOCK = 'Failed to get shared "write" lock'


def img(*args: str) -> int:
    return main(["img", *args])


def lock_bytes(path: Path) -> list[int]:
    """Bytes locked (by anyone) on `path`'s inode, from /proc/locks."""
    ino = os.stat(path).st_ino
    out = []
    for line in Path("/proc/locks").read_text().splitlines():
        parts = line.split()
        if len(parts) < 8 or parts[1] == "->" or parts[1] != "OFDLCK":
            continue
        if int(parts[5].split(":")[2]) == ino:
            out.extend(range(int(parts[6]), int(parts[7]) + 1))
    return sorted(out)


@contextmanager
def qemu_io(path: Path, *, fmt: str = "qcow2", read_only: bool = False) -> Iterator[None]:
    """qemu-io holding `path` open (read-write unless read_only) while the block runs."""
    args = ["qemu-io", "-f", fmt] + (["-r"] if read_only else []) + [str(path)]
    p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    assert p.stdin is not None and p.stdout is not None
    try:
        p.stdin.write("read 0 512\n")
        p.stdin.flush()
        line = p.stdout.readline()  # answered only once the image is open (and locked)
        assert "read 512/512" in line, line
        yield
    finally:
        p.stdin.close()
        p.wait(timeout=30)


_HOLDER = r"""
import sys
from pyhv.disk.open import open_image
dev = open_image(sys.argv[1], read_only=sys.argv[2] == "ro")
print("ready", flush=True)
sys.stdin.read()
dev.close()
"""


@contextmanager
def pyhv_holds(path: Path, mode: str = "rw") -> Iterator[None]:
    """Another process holding `path` through pyhv's API (a long-running pyhv)."""
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), mode],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         env=dict(os.environ, PYTHONPATH=SRC))
    assert p.stdin is not None and p.stdout is not None
    try:
        assert p.stdout.readline().strip() == b"ready"
        yield
    finally:
        p.stdin.close()
        p.wait(timeout=30)


def _image(tmp: Path, name: str = "a.qcow2", **kw: Any) -> Path:
    p = tmp / name
    create(str(p), 1 << 20, cluster_size=4096, **kw)
    with Qcow2Image(str(p)) as i:
        i.write(0, b"\x11" * 8192)
    return p


@pytest.mark.parametrize(("fmt", "read_only"), [("qcow2", True), ("qcow2", False),
                                                ("raw", True), ("raw", False)])
def test_same_lock_bytes_as_qemu_io(tmp_path: Path, fmt: str, read_only: bool) -> None:
    p = tmp_path / f"a.{fmt}"
    if fmt == "qcow2":
        create(str(p), 1 << 20)
    else:
        RawImage.create(str(p), 1 << 20)
    with qemu_io(p, fmt=fmt, read_only=read_only):
        theirs = lock_bytes(p)
    dev = open_image(str(p), fmt, read_only=read_only)
    try:
        mine = lock_bytes(p)
    finally:
        dev.close()
    assert mine == theirs
    assert lock_bytes(p) == []  # released on close


@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
def test_backing_file_lock_bytes_as_qemu_io(tmp_path: Path, base_fmt: str) -> None:
    base = tmp_path / f"base.{base_fmt}"
    if base_fmt == "qcow2":
        create(str(base), 1 << 20)
    else:
        RawImage.create(str(base), 1 << 20)
    top = tmp_path / "top.qcow2"
    create(str(top), 1 << 20, backing_file=base.name, backing_format=base_fmt)
    with qemu_io(top):
        theirs = lock_bytes(base), lock_bytes(top)
    dev = open_image(str(top), read_only=False)
    try:
        assert (lock_bytes(base), lock_bytes(top)) == theirs
    finally:
        dev.close()
    assert lock_bytes(base) == [] and lock_bytes(top) == []


def test_guest_disk_lock_bytes_as_qemu_system(qemu: Any, tmp_path: Path) -> None:
    """A guest's raw disk does not share writes (QEMU's virtio-blk without share-rw)."""
    p = tmp_path / "g.raw"
    RawImage.create(str(p), 1 << 20)
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-S", "-display", "none", "-nodefaults", "-machine",
         "pc,accel=tcg", "-drive", f"file={p},format=raw,if=virtio", "-qmp", "stdio"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        # QEMU takes its locks in steps (the drive's open, then the virtio-blk device's
        # permissions at realize): the answer to a QMP command comes from the main loop,
        # which runs only once the machine is built, so the locks read after it are final.
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b'{"execute": "qmp_capabilities"}\n'
                         b'{"execute": "query-status", "id": "built"}\n')
        proc.stdin.flush()
        while b'"built"' not in (line := proc.stdout.readline()):
            assert line, "qemu-system-x86_64 ended before its monitor answered"
        theirs = lock_bytes(p)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert theirs, "qemu-system-x86_64 did not open the disk"
    dev = open_image(str(p), "raw", read_only=False, guest=True)
    try:
        assert lock_bytes(p) == theirs
        r = qemu.run("qemu-io", "-f", "raw", "-c", "write 0 512", str(p), ok=False)
        assert WRITE_LOCK in r.stderr + r.stdout
    finally:
        dev.close()


VERBS_THAT_WRITE = [
    ("snapshot -c", lambda p: img("snapshot", "-c", "s2", str(p))),
    ("snapshot -a", lambda p: img("snapshot", "-a", "s1", str(p))),
    ("snapshot -d", lambda p: img("snapshot", "-d", "s1", str(p))),
    ("resize", lambda p: img("resize", str(p), "+64K")),
    ("check -r all", lambda p: img("check", "-r", "all", str(p))),
    ("rebase", lambda p: img("rebase", "-b", "", str(p))),
    ("commit into it", lambda p: img("commit", str(p.parent / "top.qcow2"))),
    ("convert onto it", lambda p: img("convert", "-O", "qcow2", str(p.parent / "o.raw"),
                                      str(p))),
    ("create over it", lambda p: img("create", "-f", "qcow2", str(p), "1M")),
]


@pytest.mark.parametrize(("name", "verb"), VERBS_THAT_WRITE,
                         ids=[v[0] for v in VERBS_THAT_WRITE])
def test_verbs_refused_while_qemu_writes(tmp_path: Path, name: str, verb: Any,
                                         digest: Any, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    p = _image(tmp_path)
    with Qcow2Image(str(p)) as i:
        i.snapshot_create("s1")
    create(str(tmp_path / "top.qcow2"), 1 << 20, backing_file="a.qcow2",
           backing_format="qcow2")
    (tmp_path / "o.raw").write_bytes(b"\x22" * 4096)
    before = digest(p)
    with qemu_io(p):
        capsys.readouterr()
        assert verb(p) == 1
        err = capsys.readouterr().err
        assert f"pyhv: Could not open '{p}': {WRITE_LOCK}" in err
        assert f"Is another process using the image [{p}]?" in err
        assert digest(p) == before
    assert lock_bytes(p) == []


@pytest.mark.parametrize("verb", [["info"], ["info", "--backing-chain"], ["check"], ["map"],
                                  ["snapshot", "-l"]])
def test_readers_need_force_share_while_qemu_writes(tmp_path: Path, verb: list[str],
                                                    capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    """As qemu-img: a reader refuses an image whose metadata may change under it, unless
    -U (and -U is for read-only opens only)."""
    p = _image(tmp_path)
    with qemu_io(p):
        capsys.readouterr()
        assert img(*verb, str(p)) == 1
        assert SHARED_WRITE_LOCK in capsys.readouterr().err
        assert img(*verb, "-U", str(p)) == 0
        assert img("check", "-U", "-r", "all", str(p)) == 1
        assert "force-share=on can only be used with read-only images" in \
            capsys.readouterr().err
        assert img("compare", "-U", str(p), str(p)) == 0
        assert img("convert", "-U", "-O", "raw", str(p), str(tmp_path / "o.raw")) == 0
    assert (tmp_path / "o.raw").read_bytes()[:8192] == b"\x11" * 8192


def test_create_and_rebase_u_over_a_backing_file_in_use(tmp_path: Path) -> None:
    """As qemu-img: `create -b` opens the backing file with force-share (it only reads
    its size), and `-u` reads the chain's headers without locks; a safe rebase opens the
    new backing file for consistent reads, which a writer refuses."""
    p = _image(tmp_path)
    with qemu_io(p):
        assert img("create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2",
                   str(tmp_path / "t.qcow2")) == 0
        assert img("create", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2",
                   str(tmp_path / "u.qcow2"), "1M") == 0
        create(str(tmp_path / "v.qcow2"), 1 << 20)
        assert img("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2",
                   str(tmp_path / "v.qcow2")) == 0
        create(str(tmp_path / "w.qcow2"), 1 << 20)
        assert img("rebase", "-b", "a.qcow2", "-F", "qcow2", str(tmp_path / "w.qcow2")) == 1
    for name in ("t", "u", "v"):
        with Qcow2Image(str(tmp_path / f"{name}.qcow2"), read_only=True) as q:
            assert q.h.backing_file == "a.qcow2"


def test_readers_share_with_qemu_readers(tmp_path: Path) -> None:
    p = _image(tmp_path)
    with qemu_io(p, read_only=True):
        assert img("check", str(p)) == 0
        assert img("info", str(p)) == 0
        with pytest.raises(ImageError, match=WRITE_LOCK):
            open_image(str(p), read_only=False)


def test_qemu_refused_while_pyhv_writes(qemu: Any, tmp_path: Path, digest: Any) -> None:
    p = _image(tmp_path)
    with pyhv_holds(p, "rw"):
        before = digest(p)
        for args in (["qemu-io", "-f", "qcow2", "-c", "write 0 512", str(p)],
                     ["qemu-img", "snapshot", "-c", "s", str(p)],
                     ["qemu-img", "resize", str(p), "2M"],
                     ["qemu-img", "create", "-f", "qcow2", str(p), "1M"]):
            r = qemu.run(*args, ok=False)
            assert r.returncode != 0, args
            assert WRITE_LOCK in r.stderr + r.stdout, (args, r.stderr)
            assert f"Is another process using the image [{p}]?" in r.stderr + r.stdout
        r = qemu.img("info", str(p), ok=False)
        assert r.returncode == 1 and SHARED_WRITE_LOCK in r.stderr
        qemu.img("info", "-U", str(p))
        assert digest(p) == before
    qemu.img("snapshot", "-c", "s", str(p))  # released when the holder closed
    qemu.check(p)


def test_qemu_writers_refused_while_pyhv_reads(qemu: Any, tmp_path: Path) -> None:
    p = _image(tmp_path)
    with pyhv_holds(p, "ro"):
        r = qemu.run("qemu-io", "-f", "qcow2", "-c", "write 0 512", str(p), ok=False)
        assert WRITE_LOCK in r.stderr + r.stdout
        qemu.img("info", str(p))  # a reader: allowed
        qemu.run("qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", str(p))


def test_backing_files_locked_read_only(qemu: Any, tmp_path: Path) -> None:
    base = _image(tmp_path, "base.qcow2")
    top = tmp_path / "top.qcow2"
    create(str(top), 1 << 20, backing_file="base.qcow2", backing_format="qcow2")
    with pyhv_holds(top, "rw"):  # the chain: top rw, base ro
        r = qemu.img("snapshot", "-c", "s", str(base), ok=False)
        assert WRITE_LOCK in r.stderr
        qemu.run("qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", str(base))
    with qemu_io(top):  # QEMU's chain: pyhv may read the base, not write it
        assert img("commit", str(top)) == 1  # the base needs a write lock
        assert img("compare", str(base), str(base)) == 0


def test_force_share_is_read_only(tmp_path: Path) -> None:
    p = _image(tmp_path)
    with pytest.raises(ImageError, match="force-share=on can only be used with read-only"):
        open_image(str(p), read_only=False, force_share=True)
    assert lock_bytes(p) == []


def test_two_opens_in_one_process_conflict(tmp_path: Path) -> None:
    """OFD locks belong to the open, not the process (as in QEMU)."""
    p = _image(tmp_path)
    a = open_image(str(p), read_only=False)
    try:
        with pytest.raises(ImageError, match=WRITE_LOCK):
            open_image(str(p), read_only=False)
        with pytest.raises(ImageError, match=SHARED_WRITE_LOCK):
            open_image(str(p))
        open_image(str(p), force_share=True).close()
    finally:
        a.close()
    open_image(str(p), read_only=False).close()


def test_locks_released_on_failed_opens(tmp_path: Path) -> None:
    base = _image(tmp_path, "base.qcow2")
    top = tmp_path / "top.qcow2"
    create(str(top), 1 << 20, backing_file="base.qcow2", backing_format="qcow2")
    held = open_image(str(base), read_only=False)  # the chain cannot lock its base
    try:
        with pytest.raises(ImageError, match=SHARED_WRITE_LOCK):
            open_image(str(top))
        assert lock_bytes(top) == []
    finally:
        held.close()
    with open(top, "r+b") as f:  # the top's L1 entry 0 past the end of the file: found
        f.seek(int.from_bytes(f.read(48)[40:48], "big"))  # after the base was opened
        f.write(((1 << 40) | 1 << 63).to_bytes(8, "big"))
    with pytest.raises(ImageError, match="L1 entry 0"):
        open_image(str(top), read_only=False)
    assert lock_bytes(base) == [] and lock_bytes(top) == []


def test_lock_failure_that_is_not_a_conflict(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that refuses locks: a clear error naming the byte (QEMU's words)."""
    p = _image(tmp_path)

    def refuse(fd: int, cmd: int, ltype: int, byte: int) -> int:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(L, "_fcntl", refuse)
    with pytest.raises(ImageError, match="Failed to lock byte 100: No locks available"):
        open_image(str(p))
