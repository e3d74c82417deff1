"""Block-layer dirty tracking (pyhv.disk.dirty) and the --copy-storage DISK record
(pyhv.migration.storage), on real qcow2 images created by qemu-img.

- `Tracked` marks exactly the 64 KiB chunks a write or discard touches (a write across a
  chunk boundary marks both), `take()` hands them over once, and the data reaches the
  image (qemu-io reads it back).
- `write_record` writes a data chunk, turns a zero marker into zeros only where the
  target is not zero already, and refuses malformed records (unknown disk, flags, a
  length that disagrees with the data, an offset past the end or not chunk-aligned)
  without writing anything.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pyhv.disk.dirty import CHUNK, Tracked
from pyhv.disk.open import open_image
from pyhv.migration.storage import F_ZERO, HEAD, write_record
from pyhv.migration.stream import MigrationError

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


class Dev:
    """The one attribute write_record uses of a VirtioBlk: its disk."""

    def __init__(self, disk: Tracked) -> None:
        self.disk = disk


def image(tmp_path: Path, name: str = "d.qcow2") -> Path:
    path = tmp_path / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"],
                   check=True, timeout=30)
    return path


def test_writes_and_discards_mark_the_chunks_they_touch(tmp_path: Path) -> None:
    path = image(tmp_path)
    t = Tracked(open_image(str(path), read_only=False))
    try:
        assert t.take() == []
        t.write(CHUNK - 512, b"\x55" * 1024)          # across chunks 0 and 1
        t.write(5 * CHUNK, b"\x66" * 512)
        t.discard(8 * CHUNK, 2 * CHUNK)               # chunks 8 and 9
        assert t.take() == [0, 1, 5, 8, 9]
        assert t.take() == []
        t.flush()
    finally:
        t.close()
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"read -P 0x55 {CHUNK - 512} 1024",
                        "-c", f"read -P 0x66 {5 * CHUNK} 512", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert "Pattern verification failed" not in r.stdout and r.returncode == 0, r.stdout


def test_disk_records_are_written_and_malformed_ones_refused(tmp_path: Path) -> None:
    path = image(tmp_path)
    disk = Tracked(open_image(str(path), read_only=False))
    devs = [Dev(disk)]
    try:
        data = bytes(range(256)) * (CHUNK // 256)
        write_record(devs, HEAD.pack(0, 0, CHUNK, 2 * CHUNK) + data)   # type: ignore[arg-type]
        assert disk.read(2 * CHUNK, CHUNK) == data
        disk.take()
        write_record(devs, HEAD.pack(0, F_ZERO, CHUNK, 3 * CHUNK))  # type: ignore[arg-type]
        assert disk.take() == []                       # already zero: not written
        write_record(devs, HEAD.pack(0, F_ZERO, CHUNK, 2 * CHUNK))  # type: ignore[arg-type]
        assert disk.read(2 * CHUNK, CHUNK) == bytes(CHUNK) and disk.take() == [2]
        bad = [HEAD.pack(1, 0, CHUNK, 0) + data,              # no disk 1
               HEAD.pack(0, 2, CHUNK, 0) + data,              # unknown flag
               HEAD.pack(0, 0, CHUNK, 0) + data[:-1],         # shorter than it says
               HEAD.pack(0, 0, CHUNK, 16 * CHUNK) + data,     # past the end (1 MiB)
               HEAD.pack(0, 0, CHUNK, 512) + data,            # not chunk-aligned
               HEAD.pack(0, F_ZERO, CHUNK, 0) + b"x",         # a zero marker with data
               b"\0" * (HEAD.size - 1)]
        for payload in bad:
            with pytest.raises(MigrationError):
                write_record(devs, payload)  # type: ignore[arg-type]
        assert disk.take() == []                      # nothing was written
    finally:
        disk.close()
    r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stdout
