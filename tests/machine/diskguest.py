"""Helpers of the migration tests whose Linux guest writes an ext2 file system on its
qcow2 disk (test_migration_disk.py, shared storage; test_migration_copy.py,
--copy-storage).

`disk_linux_image()`: Debian's kernel and pyhv's initramfs, or a skip naming what is
missing (apt-get/dpkg-deb to fetch the kernel, qemu-img and debugfs to read the image).
`counts(console)`: the guest's `count N` lines. `the_log(disk, tmp)`: the guest's /log
read back from the image (qemu-img convert to raw beside it in `tmp`, then e2fsprogs'
debugfs: works on an image whose guest was killed with the file system mounted, its
data synced). Every subprocess has a timeout.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pyhv import images
from pyhv.errors import HostError


def disk_linux_image() -> images.LinuxImage:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("needs Debian's apt-get and dpkg-deb to fetch the guest kernel")
    if shutil.which("qemu-img") is None or shutil.which("debugfs") is None:
        pytest.skip("needs qemu-img and debugfs (e2fsprogs)")
    try:
        return images.fetch_linux(quiet=True)
    except HostError as e:
        pytest.skip(f"cannot fetch Debian's kernel here: {e}")


def counts(text: bytes) -> list[int]:
    return [int(x) for x in re.findall(rb"count (\d+)\r?\n", text)]


def the_log(disk: Path, tmp_path: Path) -> list[int]:
    raw = tmp_path / f"{disk.stem}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(disk), str(raw)],
                   check=True, timeout=60)
    r = subprocess.run(["debugfs", "-R", "cat /log", str(raw)], capture_output=True,
                       check=True, timeout=60)
    return [int(x) for x in r.stdout.split()]
