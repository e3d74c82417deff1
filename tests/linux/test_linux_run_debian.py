"""`pyhv run --image debian` end to end on the software engine: Debian's kernel, pyhv's
initramfs and the Debian root disk (pyhv.debian) as /dev/vda on pyhv's virtio-blk.

Each test is one boot (about 7 s here). The first runs everywhere, on a small busybox
root disk put in a temporary cache in the Debian disk's place; the others need the real
cached Debian disk: the default run uses it when `pyhv guest fetch debian` has built it
and skips otherwise, `-m slow` builds it (conftest.debian_disk).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_linux_qemu import qemu
from test_linux_rootdisk import _busybox_tree

from pyhv import cli, debian, images
from pyhv.cmd_run import LINUX_WORKAROUNDS
from pyhv.disk.qcow2.create import create
from pyhv.exitmarker import ExitMarker

BOOT_TIMEOUT = 120
needs_mke2fs = pytest.mark.skipif(shutil.which("mke2fs") is None, reason="needs mke2fs")
PI_100 = ("3.141592653589793238462643383279502884197169399375105820974944592307\\\r\n"
          "8164062862089986280348253421170676\r\n")


def pyhv(*args: str, stdin: bytes | None = None, image: tuple[str, ...] = ("--image", "debian"),
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "pyhv", "run", "--engine", "emu",
                           "--timeout", str(BOOT_TIMEOUT), *image, *args],
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                          capture_output=True, timeout=BOOT_TIMEOUT + 30,
                          env={**os.environ, **(env or {})})


def _overlays(tmp: Path) -> set[str]:
    """The overlays left in `tmp`, the run's private TMPDIR (a shared /tmp would also show
    other pyhv runs' overlays, alive at the same time on a busy machine)."""
    return {n for n in os.listdir(tmp) if n.startswith("pyhv-overlay-")}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@needs_mke2fs
def test_image_debian_boots_the_cached_disk_as_vda(debian_image: images.LinuxImage,
                                                   tmp_path: Path) -> None:
    """The CLI path without the real disk (so it runs in every default run): a cache whose
    Debian disk is a small busybox tree. --image debian must attach it (through an
    overlay) as vda and root the command in it, and leave it and the temp dir as found."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / debian_image.directory.name).symlink_to(debian_image.directory)
    suite = debian.host_suite()
    ddir = cache / f"debian-{suite}-{debian_image.version}"
    ddir.mkdir()
    tree = tmp_path / "tree"
    _busybox_tree(debian_image, tree, "tiny-root")
    debian.mke2fs_dir(tree, tmp_path / "root.raw", 32 << 20)
    debian.raw_to_qcow2(tmp_path / "root.raw", ddir / "disk.qcow2")
    (ddir / "image.json").write_text(json.dumps({
        "format": debian.DISK_FORMAT, "suite": suite, "packages": ["busybox"],
        "kernel_release": debian_image.version,
        "kernel_package_version": debian_image.package_version,
        "used_bytes": 0, "disk_size": 32 << 20}))
    before = _digest(ddir / "disk.qcow2")
    (tmp := tmp_path / "tmp").mkdir()
    r = pyhv("--command", "cat /etc/marker; echo changed > /etc/marker; ls /dev | grep vd",
             env={images.CACHE_ENV: str(cache), "TMPDIR": str(tmp)})
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert r.stdout.decode().replace("\r", "").splitlines() == ["tiny-root", "vda"]
    assert _digest(ddir / "disk.qcow2") == before and _overlays(tmp) == set()


def test_bc_prints_pi(debian_disk: debian.DebianDisk) -> None:
    """The issue's target: the article's `bc` in a VM, on Debian's own bc."""
    r = pyhv("--command", 'echo "scale=100; 4*a(1)" | bc -l')
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert r.stdout.decode() == PI_100


def test_userland_runs_from_the_disk_and_the_cache_is_not_written(
        debian_disk: debian.DebianDisk, tmp_path: Path) -> None:
    before = _digest(debian_disk.disk_path)
    cmd = ('python3 -c "print(6*7)"; apt-get --version | head -1; cat /etc/debian_version; '
           "modprobe vfat && grep -c '^vfat ' /proc/modules; cat /proc/sys/kernel/modprobe; "
           "findmnt -no SOURCE,FSTYPE /; echo data > /root/f && cat /root/f; exit 9")
    r = pyhv("--command", cmd, env={"TMPDIR": str(tmp_path)})
    out = r.stdout.decode().replace("\r", "").splitlines()
    assert r.returncode == 9, (out, r.stderr.decode()[-2000:])
    assert out[0] == "42" and out[1].startswith("apt ")
    host = Path("/etc/debian_version").read_text().split(".")[0]
    assert out[2].split(".")[0] == host                 # the host's release (12 = bookworm)
    assert out[3:] == ["1", "/bin/pyhv-modprobe", "/dev/vda ext4", "data"]
    assert _digest(debian_disk.disk_path) == before     # writes went to the overlay
    assert _overlays(tmp_path) == set()                 # which is gone


def test_interactive_shell_is_the_disks_bash(debian_disk: debian.DebianDisk) -> None:
    r = pyhv(stdin=b"echo $((6*7)) $BASH_VERSION; hostname\npoweroff\n")
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0, (out[-2000:], r.stderr.decode()[-2000:])
    assert "42 5." in out and "\npyhv-debian\r\n" in out        # bash 5, on the disk


def test_image_and_kernel_exclude_each_other(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--image", "debian", "--kernel", str(tmp_path / "k")]) == 2
    assert "--image and --kernel exclude each other" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(3 * BOOT_TIMEOUT + 120)
def test_pyhv_and_qemu_share_a_debian_disk(debian_disk: debian.DebianDisk,
                                           tmp_path: Path) -> None:
    """Differential, both directions: a file Debian writes on pyhv's virtio-blk is read
    under QEMU, and one written under QEMU is read on pyhv; qemu-img check is clean after
    each writer. The disk is the user's own overlay of the cached disk (README)."""
    mine = tmp_path / "mine.qcow2"
    create(str(mine), debian_disk.disk_size, backing_file=str(debian_disk.disk_path),
           backing_format="qcow2")
    append = " ".join(["console=ttyS0", *(w for w, _ in LINUX_WORKAROUNDS["emu"]),
                       "loglevel=1", *debian_disk.cmdline_words])
    on_pyhv = ("--disk", f"{mine},format=qcow2", "--append", append)
    r = pyhv("--command", 'python3 -c "print(2**64)" > /root/from-pyhv', image=on_pyhv)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    check = subprocess.run(["qemu-img", "check", str(mine)], capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout
    cmd = "echo; cat /root/from-pyhv; echo scale=5\\;1/7 | bc > /root/from-qemu"
    rc, out, _ = qemu(debian_disk.linux, " ".join(debian_disk.cmdline_words) + " quiet "
                      + images.command_param(cmd),
                      "-drive", f"file={mine},if=virtio,format=qcow2")
    assert str(2**64) in out.splitlines(), out[-2000:]
    assert ExitMarker().parse(out.encode()) == 0 and rc == 0
    check = subprocess.run(["qemu-img", "check", str(mine)], capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout
    r = pyhv("--command", "cat /root/from-qemu", image=on_pyhv)
    assert r.returncode == 0 and r.stdout == b".14285\r\n", r.stderr.decode()[-2000:]
