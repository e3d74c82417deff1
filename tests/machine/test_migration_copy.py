"""`pyhv migrate --copy-storage`: a Linux guest's disk mirrored over the migration.

The guest (Debian's kernel, pyhv's initramfs, emu) makes an ext2 file system on its
qcow2 disk, fills 8 MiB of it with random data, then counts: for the first WRITES turns
it appends its count to /mnt/log and syncs, then it unmounts the file system and only
prints. The destination has its own image of the same size, created empty with
qemu-img. The migration runs under a bandwidth limit, so the disk's bulk copy and the
first RAM round take seconds while the guest writes (the block layer's dirty tracking
sends those chunks again: the report's disk_again > 0), and the switch-over comes after
the guest unmounted (checked: the source printed "unmounted").

Then: `qemu-img compare` finds the two images equal, the file on the destination's
image holds every count, `qemu-img check` is clean, the console's count is unbroken.
The fault test kills the destination during the disk's bulk copy: the migration fails,
the source counts on and writes on, its image stays clean and its file complete.

All slow (a Linux boot each; the default run has tests/machine/test_migration_disk.py).
Every subprocess has a timeout; waits are bounded (migrationkit).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from diskguest import counts, disk_linux_image, the_log
from guestbuild import engine_unavailable
from migrationkit import PYHV, PyhvProc, destination, migrate, source

from pyhv import images
from pyhv.vmclient import call

pytestmark = pytest.mark.slow
EMU = engine_unavailable("emu")
WRITES = 30


def loop(writes: int) -> str:
    return ("mke2fs -q /dev/vda && mkdir -p /mnt && mount /dev/vda /mnt && "
            "dd if=/dev/urandom of=/mnt/fill bs=1M count=8 2>/dev/null && sync && "
            f"i=0; while true; do i=$((i+1)); if [ $i -le {writes} ]; then "
            "echo $i >> /mnt/log; sync; "
            f"elif [ $i -eq {writes + 1} ]; then umount /mnt && echo unmounted; fi; "
            "echo count $i; sleep 0.1; done")


@pytest.fixture(scope="module")
def linux_image() -> images.LinuxImage:
    return disk_linux_image()


def qcow2(path: Path, size: str = "32M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size],
                   check=True, timeout=30)
    return path


def check_clean(disk: Path) -> None:
    r = subprocess.run(["qemu-img", "check", str(disk)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_copy_storage_gives_the_destination_an_equal_disk(
        tmp_path: Path, linux_image: images.LinuxImage) -> None:
    if EMU is not None:
        pytest.skip(EMU)
    a, b = qcow2(tmp_path / "a.qcow2"), qcow2(tmp_path / "b.qcow2")
    base = ["--engine", "emu", "--mem", "128M", "--rng"]
    dst, uri = destination([*base, "--disk", str(b)])
    procs: list[PyhvProc] = [dst]
    try:
        sock = tmp_path / "src.sock"
        src = source([*base, "--disk", str(a), "--command", loop(WRITES)], sock)
        procs.append(src)
        src.wait_out(b"count 3\r\n", timeout=120)
        r = migrate(sock, uri, "--copy-storage", "--bandwidth", "4", "--json",
                    timeout=240)
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["storage"] == "copy" and report["disk_chunks"] >= 512, report
        assert report["disk_again"] > 0, report          # writes during the copy re-sent
        assert src.wait_exit() == 0, bytes(src.err)
        before = bytes(src.out)
        assert b"unmounted" in before, "the switch-over came before the guest unmounted"
        n = counts(before)[-1]
        dst.wait_out(b"count %d\r\n" % (n + 5), timeout=120)
        dst.end()
        seen = counts(before + bytes(dst.out))
        assert seen == list(range(1, len(seen) + 1)), seen
        cmp = subprocess.run(["qemu-img", "compare", str(a), str(b)], capture_output=True,
                             text=True, timeout=60)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
        assert the_log(b, tmp_path) == list(range(1, WRITES + 1))
        check_clean(a)
        check_clean(b)
    finally:
        for p in procs:
            p.kill()


def test_killing_the_destination_during_the_disk_copy_leaves_the_source_intact(
        tmp_path: Path, linux_image: images.LinuxImage) -> None:
    if EMU is not None:
        pytest.skip(EMU)
    a, b = qcow2(tmp_path / "a.qcow2"), qcow2(tmp_path / "b.qcow2")
    base = ["--engine", "emu", "--mem", "128M"]
    dst, uri = destination([*base, "--disk", str(b)])
    procs: list[PyhvProc] = [dst]
    try:
        sock = tmp_path / "src.sock"
        src = source([*base, "--disk", str(a), "--command", loop(10_000)], sock)
        procs.append(src)
        src.wait_out(b"count 3\r\n", timeout=120)
        mig = subprocess.Popen([*PYHV, "migrate", str(sock), uri, "--copy-storage",
                                "--bandwidth", "1"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while True:
                p = call(sock, "GET", "/migrate")
                if p.get("status") == "storage" and p.get("disk_chunks", 0) > 16:
                    break
                assert time.monotonic() < deadline, p
                time.sleep(0.05)
            dst.kill()
            _, err = mig.communicate(timeout=120)
            assert mig.returncode != 0, err
        finally:
            if mig.poll() is None:
                mig.kill()
                mig.communicate(timeout=10)
        m = counts(bytes(src.out))[-1]
        src.wait_out(b"count %d\r\n" % (m + 5), timeout=60)     # the guest runs on
        src.end()
        last = counts(bytes(src.out))[-1]
        seen = counts(bytes(src.out))
        assert seen == list(range(1, len(seen) + 1))
        log = the_log(a, tmp_path)
        assert log[:last] == list(range(1, last + 1)), log[-5:]
        check_clean(a)
    finally:
        for p in procs:
            p.kill()

