"""Debian's kernel on pyhv's PCI bus and virtio devices, end to end (emu engine).

One boot per test, through `pyhv run` (see test_linux_run.py); slow ones are marked.
"""

from __future__ import annotations

import os
import subprocess
import sys

from pyhv import images

BOOT_TIMEOUT = 90


def pyhv(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "pyhv", "run", "--engine", "emu",
                           "--timeout", str(BOOT_TIMEOUT), *args],
                          stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=BOOT_TIMEOUT + 30, env=dict(os.environ))


def test_linux_finds_the_host_bridge(debian_image: images.LinuxImage) -> None:
    r = pyhv("--command", "for d in /sys/bus/pci/devices/*; do "
             "echo $(basename $d) $(cat $d/vendor $d/device $d/class); done")
    out = r.stdout.decode()
    assert r.returncode == 0, (out, r.stderr.decode()[-2000:])
    assert "0000:00:00.0 0x8086 0x1237 0x060000" in out
