"""The Debian root disk (pyhv.debian) and /init's root-disk mode (pyhv.root=), checked
against QEMU: `qemu-img check`/`compare` on the disks pyhv's block layer writes, and
`qemu-system-x86_64 -drive if=virtio` booting pyhv's kernel + initramfs onto them.

The default run builds only tiny disks (a busybox tree through `mke2fs -d` and pyhv's
raw -> qcow2 conversion) and checks the failure paths of `fetch_debian`; building the
real Debian disk (mmdebstrap, a few hundred MB from the mirror) is slow-marked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_linux_qemu import qemu

from pyhv import cli, debian, images
from pyhv.errors import HostError, ImageError
from pyhv.exitmarker import ExitMarker
from pyhv.loader.initramfs import read_newc

QEMU_IMG = shutil.which("qemu-img")
needs_qemu = pytest.mark.skipif(QEMU_IMG is None or shutil.which("qemu-system-x86_64") is None,
                                reason="needs qemu-img and qemu-system-x86_64")
needs_mke2fs = pytest.mark.skipif(shutil.which("mke2fs") is None, reason="needs mke2fs")
BOOT_TIMEOUT = 90
PI_100 = ("3.141592653589793238462643383279502884197169399375105820974944592307"
          "8164062862089986280348253421170676")


def _busybox_tree(img: images.LinuxImage, tree: Path, marker: str) -> None:
    """A minimal root file system: the initramfs's own busybox and a marker file."""
    (tree / "bin").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "root").mkdir()
    busybox = next(e for e in read_newc(img.initrd_path.read_bytes())
                   if e.path == "bin/busybox")
    (tree / "bin" / "busybox").write_bytes(busybox.data)
    (tree / "bin" / "busybox").chmod(0o755)
    for applet in ("sh", "cat", "echo", "ls", "grep"):
        (tree / "bin" / applet).symlink_to("busybox")
    (tree / "etc" / "marker").write_text(marker + "\n")


def _qemu_img(*argv: str) -> subprocess.CompletedProcess[str]:
    assert QEMU_IMG is not None
    return subprocess.run([QEMU_IMG, *argv], capture_output=True, text=True, timeout=120)


def _root_disk(debian_image: images.LinuxImage, tmp_path: Path, marker: str) -> Path:
    tree = tmp_path / "tree"
    _busybox_tree(debian_image, tree, marker)
    raw, disk = tmp_path / "root.raw", tmp_path / "root.qcow2"
    debian.mke2fs_dir(tree, raw, 64 << 20)
    debian.raw_to_qcow2(raw, disk)
    return disk


# ---------------------------------------------------------------- no guest

def test_init_script_has_a_root_disk_mode() -> None:
    text = images.init_script("6.1.0-test")
    for needle in ("pyhv.root=*) root=", 'mount -o rw "$root" /newroot',
                   "mount -o rbind /dev /newroot/dev", "/bin/pyhv-modprobe >",
                   "/proc/sys/kernel/modprobe", 'chroot="chroot /newroot"',
                   "/bin/cttyhack /bin/pyhv-rootshell", "mount -o remount,ro /newroot"):
        assert needle in text, needle
    sh = shutil.which("sh")
    if sh:
        for script in (text, images.ROOT_SHELL, images.MODPROBE_HELPER):
            subprocess.run([sh, "-n"], input=script.encode(), check=True, timeout=10)


def test_the_initramfs_carries_the_root_disk_helpers(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF not run")
    entries = {e.path: e for e in read_newc(images.build_initramfs(busybox, applets=[]))}
    for helper in ("bin/pyhv-modprobe", "bin/pyhv-rootshell"):
        assert entries[helper].mode & 0o111
    assert b"chroot /newroot /sbin/modprobe" in entries["bin/pyhv-modprobe"].data


def test_mmdebstrap_argv_pins_the_kernel_and_runs_the_hook(tmp_path: Path) -> None:
    argv = debian.mmdebstrap_argv(suite="bookworm", release="6.1.0-57-cloud-amd64",
                                  package_version="6.1.192-3", work=tmp_path, size=4 << 30,
                                  sources=["/etc/apt/sources.list.d/debian.sources"])
    assert argv[0] == "mmdebstrap" and "--variant=apt" in argv
    assert "--include=bc,python3,linux-image-6.1.0-57-cloud-amd64=6.1.192-3" in argv
    hook = next(a for a in argv if a.startswith("--customize-hook="))
    assert str(tmp_path / "hook.sh") in hook and hook.endswith(" 4194304")
    assert argv[-3:] == ["bookworm", "/dev/null", "/etc/apt/sources.list.d/debian.sources"]


def test_apt_error_picks_the_telling_line() -> None:
    lines = ["I: running apt-get update...",
             "W: Failed to fetch http://127.0.0.1:9/debian/dists/bookworm/InRelease  "
             "Could not connect to 127.0.0.1:9 (127.0.0.1). - connect (111: Connection "
             "refused)",
             "E: apt-get update -oAPT::Status-Fd=<$fd> -oDpkg::Use-Pty=false failed",
             "E: mmdebstrap failed to run"]
    assert debian._apt_error(lines).startswith("W: Failed to fetch http://127.0.0.1:9")
    assert debian._apt_error(["E: mmdebstrap failed to run", "E: something specific",
                              "E: setup failed: E: x"]) == "E: something specific"


def test_fetch_without_mmdebstrap_says_how_to_install_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))           # no tool is found
    try:
        debian.host_suite()
    except HostError:
        pytest.skip("not a Debian host")
    with pytest.raises(HostError, match=r"needs mmdebstrap.*apt-get install mmdebstrap"):
        debian.fetch_debian(root=tmp_path / "cache", quiet=True)
    assert not (tmp_path / "cache").exists()


@needs_mke2fs
@needs_qemu
def test_a_tree_becomes_a_qcow2_that_qemu_img_agrees_with(
        debian_image: images.LinuxImage, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    _busybox_tree(debian_image, tree, "tree-ok")
    raw, disk = tmp_path / "root.raw", tmp_path / "root.qcow2"
    debian.mke2fs_dir(tree, raw, 64 << 20)
    debian.raw_to_qcow2(raw, disk)
    assert _qemu_img("check", str(disk)).returncode == 0
    cmp = _qemu_img("compare", "-f", "raw", "-F", "qcow2", str(raw), str(disk))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    info = json.loads(_qemu_img("info", "--output=json", str(disk)).stdout)
    assert info["virtual-size"] == 64 << 20 and info["format"] == "qcow2"
    assert disk.stat().st_blocks * 512 < raw.stat().st_size // 2   # zeros left out


@needs_mke2fs
def test_mke2fs_failure_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(HostError, match=r"mke2fs -d .* failed"):
        debian.mke2fs_dir(tmp_path / "missing", tmp_path / "x.raw", 64 << 20)


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="needs mmdebstrap")
def test_fetch_with_no_network_fails_clearly_and_keeps_nothing(
        debian_image: images.LinuxImage, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    with pytest.raises(HostError) as err:
        debian.fetch_debian(root=root, quiet=True, linux=debian_image,
                            sources=["http://127.0.0.1:9/debian"])
    msg = str(err.value)
    assert msg.startswith("building the Debian disk failed (mmdebstrap"), msg
    assert "127.0.0.1:9" in msg and "\n" not in msg
    assert list(root.iterdir()) == []                 # no manifest, no temporary files
    assert debian.cached_disks(root) == []


def test_an_incomplete_disk_does_not_count(debian_image: images.LinuxImage,
                                           tmp_path: Path) -> None:
    d = tmp_path / "debian-bookworm-x"
    d.mkdir()
    (d / "disk.qcow2").write_bytes(b"QFI\xfb")
    assert debian.cached_disks(tmp_path) == []        # no image.json: incomplete
    (d / "image.json").write_text(json.dumps({"format": debian.DISK_FORMAT,
                                              "kernel_release": "6.1.0-0-none"}))
    assert debian.cached_disks(tmp_path) == []        # its kernel is not cached


def test_guest_path_debian_without_a_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(images.CACHE_ENV, str(tmp_path))
    assert cli.main(["guest", "path", "debian"]) == 2
    assert "pyhv guest fetch debian" in capsys.readouterr().err


# ---------------------------------------------------------------- QEMU boots the root disk

@needs_mke2fs
@needs_qemu
@pytest.mark.timeout(BOOT_TIMEOUT + 60)
def test_qemu_boots_into_a_root_disk(debian_image: images.LinuxImage, tmp_path: Path) -> None:
    disk = _root_disk(debian_image, tmp_path, "root-disk-ok")
    cmd = ("echo; cat /etc/marker; ls /bin/pyhv-modprobe 2>&1 | grep -c 'No such'; "
           "cat /proc/sys/kernel/modprobe; echo hello > /root/f; exit 5")
    rc, out, _ = qemu(debian_image, "quiet pyhv.root=/dev/vda " + images.command_param(cmd),
                      "-drive", f"file={disk},if=virtio,format=qcow2")
    lines = out.splitlines()
    assert "root-disk-ok" in lines, out[-2000:]
    assert "1" in lines                               # chrooted: the initramfs is not seen
    assert "/bin/pyhv-modprobe" in lines
    assert ExitMarker().parse(out.encode()) == 5
    assert rc == 0
    check = _qemu_img("check", str(disk))
    assert check.returncode == 0, check.stdout
    # the guest's write is on the disk after it powered off
    rc, out, _ = qemu(debian_image, "quiet pyhv.root=/dev/vda "
                      + images.command_param("echo; cat /root/f"),
                      "-drive", f"file={disk},if=virtio,format=qcow2,snapshot=on")
    assert "hello" in out.splitlines(), out[-2000:]


@needs_mke2fs
@needs_qemu
@pytest.mark.timeout(BOOT_TIMEOUT + 60)
def test_a_root_disk_without_a_shell_is_reported(debian_image: images.LinuxImage,
                                                  tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    raw, disk = tmp_path / "root.raw", tmp_path / "root.qcow2"
    debian.mke2fs_dir(tree, raw, 16 << 20)
    debian.raw_to_qcow2(raw, disk)
    rc, out, _ = qemu(debian_image, "quiet pyhv.root=/dev/vda " + images.command_param("true"),
                      "-drive", f"file={disk},if=virtio,format=qcow2")
    assert "pyhv: the root disk /dev/vda has no /bin/sh" in out, out[-2000:]
    assert ExitMarker().parse(out.encode()) == 127
    assert rc == 0


# ---------------------------------------------------------------- the real Debian disk

@pytest.mark.slow
@needs_qemu
@pytest.mark.timeout(1800)
@pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="needs mmdebstrap")
def test_fetch_debian_builds_a_disk_that_boots_and_computes_pi(
        debian_image: images.LinuxImage, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    disk = debian.fetch_debian(root=root, quiet=True, linux=debian_image)
    assert disk.linux == debian_image and disk.suite == debian.host_suite()
    assert _qemu_img("check", str(disk.disk_path)).returncode == 0
    assert debian._read(disk.directory, debian_image) == disk
    assert sorted(os.listdir(root)) == [disk.directory.name]    # temporaries are gone
    mtime = disk.disk_path.stat().st_mtime_ns
    again = debian.fetch_debian(root=root, quiet=True, linux=debian_image)
    assert again == disk and disk.disk_path.stat().st_mtime_ns == mtime   # idempotent
    cmd = ('echo; echo "scale=100; 4*a(1)" | BC_LINE_LENGTH=0 bc -l; python3 -c "print(6*7)"; '
           "modprobe vfat && grep -c '^vfat ' /proc/modules; apt-get --version | head -1; "
           "cat /etc/debian_version")
    rc, out, _ = qemu(debian_image, "quiet " + " ".join(disk.cmdline_words) + " "
                      + images.command_param(cmd),
                      "-drive", f"file={disk.disk_path},if=virtio,format=qcow2,snapshot=on")
    lines = out.splitlines()
    assert PI_100 in lines, out[-3000:]
    assert "42" in lines and "1" in lines
    assert any(line.startswith("apt ") for line in lines)
    assert ExitMarker().parse(out.encode()) == 0 and rc == 0


@needs_qemu
def test_qemu_img_check_rejects_a_damaged_disk(tmp_path: Path) -> None:
    disk = tmp_path / "d.qcow2"
    assert _qemu_img("create", "-f", "qcow2", str(disk), "16M").returncode == 0
    debian.qemu_img_check(disk)                        # clean: no error
    data = bytearray(disk.read_bytes())
    data[0x30:0x38] = (1 << 40).to_bytes(8, "big")     # refcount table beyond the file
    disk.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="qemu-img check finds the converted disk"):
        debian.qemu_img_check(disk)
