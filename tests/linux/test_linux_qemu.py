"""Boot Debian's kernel with pyhv's initramfs under `qemu-system-x86_64 -accel tcg`: the
reference machine proves the image and the /init protocol independently of pyhv's engines.

- a command passed as `pyhv.cmd=<base64>` runs through `sh -c`, its output is printed and
  `@@PYHV-EXIT <status>@@` reports its status before the guest powers off;
- /bin/pyhv-boottimer writes 123 to port 0x440: with QEMU's isa-debug-exit on that port,
  QEMU exits with status (123 << 1) | 1 = 247 the moment /init starts.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest

from pyhv import images
from pyhv.exitmarker import ExitMarker

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64")]
BOOT_TIMEOUT = 90
ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")     # SeaBIOS clears the screen


def qemu(img: images.LinuxImage, append: str, *extra: str) -> tuple[int, str, float]:
    assert QEMU is not None
    argv = [QEMU, "-accel", "tcg", "-M", "pc", "-m", "256", "-nographic", "-no-reboot",
            "-monitor", "none", "-serial", "stdio", "-kernel", str(img.kernel_path),
            "-initrd", str(img.initrd_path), "-append", f"{img.cmdline_default} {append}",
            "-nic", "none", *extra]
    t0 = time.monotonic()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=BOOT_TIMEOUT)
    out = ANSI.sub("", proc.stdout.decode(errors="replace")).replace("\r", "")
    return proc.returncode, out, time.monotonic() - t0


@pytest.mark.timeout(BOOT_TIMEOUT + 30)
def test_command_runs_and_reports_its_status(debian_image: images.LinuxImage) -> None:
    cmd = ("echo; uname -r; echo pyhv > /tmp/f && cat /tmp/f; echo $((6*7)) | tr 4 x; "
           "grep -c virtio /proc/modules; exit 7")
    rc, out, secs = qemu(debian_image, "quiet " + images.command_param(cmd))
    lines = out.splitlines()
    assert debian_image.version in lines
    assert "pyhv" in lines and "x2" in lines
    assert "0" in lines                          # no virtio device: no modules loaded
    assert ExitMarker().parse(out.encode()) == 7, out[-2000:]
    assert rc == 0                               # poweroff -f ended QEMU cleanly
    print(f"qemu-tcg: command run and powered off in {secs:.2f} s")


@pytest.mark.timeout(BOOT_TIMEOUT + 30)
def test_virtio_modules_load_when_a_virtio_device_exists(
        debian_image: images.LinuxImage) -> None:
    cmd = "cat /sys/block/*/dev >/dev/null && ls /sys/block; lsmod | cut -d' ' -f1"
    rc, out, _ = qemu(debian_image, "quiet " + images.command_param(cmd),
                      "-drive", "file=null-co://,if=virtio,format=raw,readonly=on")
    mods = re.findall(r"[\w-]+", out)
    assert "vda" in mods
    for m in ("virtio_blk", "virtio_pci", "virtio", "virtio_ring"):
        assert m in mods
    assert ExitMarker().parse(out.encode()) == 0


@pytest.mark.timeout(BOOT_TIMEOUT + 30)
def test_boot_timer_port(debian_image: images.LinuxImage) -> None:
    rc, out, secs = qemu(debian_image, "quiet",
                         "-device", "isa-debug-exit,iobase=0x440,iosize=1")
    assert rc == (123 << 1) | 1, out[-2000:]
    print(f"qemu-tcg: /init's boot-timer write {secs:.2f} s after QEMU started")
