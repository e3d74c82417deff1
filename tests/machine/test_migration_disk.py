"""Live migration of a Linux guest with a qcow2 disk on shared storage (same path).

The guest (Debian's kernel, pyhv's initramfs, emu) makes an ext2 file system on its
qcow2 disk, mounts it and counts: each turn appends its count to /mnt/log, syncs, then
prints `count N` on the console. The VM is migrated (`pyhv migrate`) to a
`pyhv run --incoming` built with the same `--disk`: the source flushes and releases the
image at the switch-over, the destination opens it when it takes over
(pyhv.disk.handover). Then: the console's count has no gap or repeat across the two
processes, the file on the image holds every count up to the last one printed (read back with
qemu-img convert and debugfs), and `qemu-img check` is clean. Before that, a migration to a
destination whose disk differs (another image, of another size) fails after the source
released its image: the source takes it back and runs on, its count and its disk log
going on without a gap.

Every subprocess has a timeout; waits are bounded (migrationkit).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from diskguest import counts, disk_linux_image, the_log
from guestbuild import engine_unavailable
from migrationkit import PyhvProc, destination, migrate, source

from pyhv import images

EMU = engine_unavailable("emu")
LOOP = ("mke2fs -q /dev/vda && mkdir -p /mnt && mount /dev/vda /mnt && "
        "i=0; while true; do i=$((i+1)); echo $i >> /mnt/log; sync; "
        "echo count $i; sleep 0.1; done")


@pytest.fixture(scope="module")
def linux_image() -> images.LinuxImage:
    return disk_linux_image()


def qemu_img_check(disk: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "check", str(disk)], capture_output=True, text=True,
                          timeout=60)


def test_a_linux_guest_writing_its_disk_migrates_on_shared_storage(
        tmp_path: Path, linux_image: images.LinuxImage) -> None:
    if EMU is not None:
        pytest.skip(EMU)
    disk = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"],
                   check=True, timeout=30)
    args = ["--engine", "emu", "--mem", "128M", "--disk", str(disk), "--rng"]
    dst, uri = destination(args)
    procs: list[PyhvProc] = [dst]
    try:
        sock = tmp_path / "src.sock"
        src = source([*args, "--command", LOOP], sock)
        procs.append(src)
        src.wait_out(b"count 10\r\n", timeout=120)
        other = tmp_path / "other.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), "32M"],
                       check=True, timeout=30)
        bad_args = [a if a != str(disk) else str(other) for a in args]
        bad, bad_uri = destination(bad_args)
        procs.append(bad)
        r = migrate(sock, bad_uri, "--json")
        assert r.returncode != 0 and "sectors" in r.stderr + r.stdout, r.stderr
        bad.wait_exit()
        m = counts(bytes(src.out))[-1]
        src.wait_out(b"count %d\r\n" % (m + 5), timeout=60)   # runs on, disk and all
        r = migrate(sock, uri, "--json")
        assert r.returncode == 0, r.stderr
        assert src.wait_exit() == 0, bytes(src.err)
        before = bytes(src.out)
        n = counts(before)[-1]
        dst.wait_out(b"count %d\r\n" % (n + 10), timeout=120)
        assert dst.end() in (0, 143, -15, 130), bytes(dst.err)
        seen = counts(before + bytes(dst.out))
        assert seen == list(range(1, len(seen) + 1)), seen
        last = seen[-1]
        assert last >= n + 10
        log = the_log(disk, tmp_path)
        assert log[:last] == list(range(1, last + 1)), log
        check = qemu_img_check(disk)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        for p in procs:
            p.kill()
