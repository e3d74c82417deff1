"""A hostile guest against pyhv's PCI and virtio models, from inside Debian's Linux:
busybox's `devmem` reaches the virtio BAR at any width and the sysfs `config` file writes
configuration space, with the guest's own driver unbound so the guest is the driver.

One boot does it all (slow-marked): a queue size that is not a power of two puts the
device in NEEDS_RESET, notifies for queues that do not exist are ignored, odd-width and
straddling reads see the fields' bytes, a BAR moved onto RAM leaves RAM as it was, a BAR
moved onto another device's BAR does not take that device's addresses; after the guest
puts the BAR back and rebinds the driver, the disk works again with its file system.
virtio-rng feeds /dev/hwrng in the same boot.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyhv import images

BOOT_TIMEOUT = 150

SCRIPT = r"""
b() { printf "\\$(printf %03o $(($1&255)))"; }
sb() { v=$2; { b $v; b $((v>>8)); b $((v>>16)); b $((v>>24)); } |
  dd of=$1/config bs=4 seek=4 conv=notrunc 2>/dev/null; }
D=/sys/bus/pci/devices/0000:00:01.0; R=/sys/bus/pci/devices/0000:00:02.0
B=$(($(cut -d' ' -f1 $D/resource | head -1))); RB=$(($(cut -d' ' -f1 $R/resource | head -1)))
m() { devmem $((B+$1)) $2 $3; }
echo ids $(cat $D/vendor $D/device $R/vendor $R/device)
echo rng $(cat /sys/class/misc/hw_random/rng_current) $(head -c 32 /dev/hwrng | wc -c)
mke2fs /dev/vda >/dev/null && mount /dev/vda /mnt && echo kept > /mnt/f && umount /mnt
echo 0000:00:01.0 > /sys/bus/pci/drivers/virtio-pci/unbind
m 0x14 8 0; m 0x14 8 3; m 0x16 16 7; echo absent $(m 0x18 16)
m 0x16 16 0; m 0x18 16 3; m 0x1c 16 1; echo needs-reset $(m 0x14 8) $(m 0x1c 16)
m 0x3024 16 9; m 0x3002 8 0
echo odd $(m 0x11 16) $(m 0x13 32) $(m 0x12 64)
m 0x14 8 0
sb $D 0x1000000; echo ram $(m 0x12 16) $(cat /mnt/../proc/version | wc -l)
echo 0000:00:02.0 > /sys/bus/pci/drivers/virtio-pci/unbind
devmem $RB 32 0; sb $D $RB; echo overlap $(devmem $((RB+4)) 32)
sb $D $B; echo back $(m 0x12 16)
echo 0000:00:01.0 > /sys/bus/pci/drivers/virtio-pci/bind; sleep 1
mount /dev/vda /mnt && cat /mnt/f
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_hostile_guest_driver(debian_image: images.LinuxImage, tmp_path: Path) -> None:
    disk = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(disk), "32M"], check=True,
                   capture_output=True, timeout=60)
    r = subprocess.run([sys.executable, "-m", "pyhv", "run", "--engine", "emu", "--timeout",
                        str(BOOT_TIMEOUT), "--disk", str(disk), "--rng", "--command", SCRIPT],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=BOOT_TIMEOUT + 30)
    out = r.stdout.decode(errors="replace")
    info = out + r.stderr.decode(errors="replace")[-3000:]
    assert r.returncode == 0, info
    lines = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines() if ln.strip()}
    assert lines["ids"] == ["0x1af4", "0x1042", "0x1af4", "0x1044"], info
    assert lines["rng"] == ["virtio_rng.0", "32"], info
    assert lines["absent"] == ["0x0000"], info                  # queue 7: size 0
    assert lines["needs-reset"] == ["0x43", "0x0000"], info     # NEEDS_RESET, not enabled
    # 0x11: msix_config high byte, num_queues low; 0x13: num_queues high, status,
    # generation, queue_select low; 0x12 as 64 bits: num_queues .. queue_size
    assert lines["odd"] == ["0x01FF", "0x00004300", "0x0003000000430001"], info
    # the BAR moved onto the kernel's own RAM (16 MiB): it decodes nothing there or at
    # its old address, and the kernel, whose text lives there, runs on
    assert lines["ram"] == ["0xFFFF", "1"], info
    rng_features = int(lines["overlap"][0], 16)
    assert rng_features == 0x30000000, info                     # the rng answered, not blk
    assert lines["back"] == ["0x0001"], info
    assert out.strip().splitlines()[-1].strip() == "kept", info
    check = subprocess.run(["qemu-img", "check", str(disk)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
