"""`pyhv shutdown NAME` powers a Linux guest off cleanly: the ACPI power button end to end.

One boot of Debian's kernel with pyhv's initramfs under `pyhv run --name` (run directory
in a temporary folder), at its shell on emu. The signal that the guest is ready is the
guest's own: the shell, asked through the console, prints a line once busybox acpid
holds /dev/input/event* open (the input device button.ko + evdev give the fixed-feature
power button); a button press before that would reach no listener. Then `pyhv shutdown`
presses the button: acpid runs `poweroff`, busybox init shuts down in order, and the
kernel powers off through ACPI S5 ("reboot: Power down"), which ends the run with
status 0. The root-disk mode's variant (the Debian disk, chrooted shell) is slow-marked.

Every subprocess has a timeout; waits are bounded loops on what the console shows.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pyhv import debian, images

RUN_TIMEOUT_S = 150        # pyhv's own --timeout
WAIT_S = 60.0
# Asked of the guest's shell: wait (at most 20 s) until acpid has an input event device
# open; say whether it has.
READY_CMD = (b"i=0; until ls -l /proc/$(pidof acpid)/fd 2>/dev/null | grep -q input/event;"
             b" do [ $i -ge 200 ] && break; sleep 0.1; i=$((i+1)); done;"
             b" [ $i -lt 200 ] && echo acpid-ready-$((6*7)) || echo acpid-missing-$((6*7))\n")


def wait_for(cond: Callable[[], bool], what: str, out: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}: "
                                 f"{out.read_bytes()[-3000:].decode(errors='replace')}")
        time.sleep(0.05)


def shutdown_by_name(tmp_path: Path, *run_args: str, prompt: bytes) -> tuple[int, str, str]:
    """Boot under --name, wait for `prompt` and then acpid, `pyhv shutdown`; return the
    run's status, console output and stderr."""
    env = {**os.environ, "PYHV_RUN_DIR": str(tmp_path / "run")}
    out, err = tmp_path / "console", tmp_path / "stderr"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyhv", "run", "--engine", "emu", "--name", "lx",
             "--timeout", str(RUN_TIMEOUT_S), *run_args],
            stdin=subprocess.PIPE, stdout=o, stderr=e, env=env)
    try:
        assert proc.stdin is not None
        wait_for(lambda: prompt in out.read_bytes() or proc.poll() is not None,
                 "the guest's shell prompt", out)
        assert proc.poll() is None, err.read_text()
        proc.stdin.write(READY_CMD)
        proc.stdin.flush()
        wait_for(lambda: re.search(rb"acpid-(ready|missing)-42", out.read_bytes())
                 is not None or proc.poll() is not None, "the guest's answer", out)
        assert b"acpid-ready-42" in out.read_bytes(), out.read_bytes()[-3000:]
        r = subprocess.run([sys.executable, "-m", "pyhv", "shutdown", "lx"], env=env,
                           capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0 and "power button pressed" in r.stdout, r.stderr
        status = proc.wait(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    return status, out.read_bytes().decode(errors="replace"), err.read_text()


def test_shutdown_powers_the_initramfs_shell_off(debian_image: images.LinuxImage,
                                                 tmp_path: Path) -> None:
    status, console, err = shutdown_by_name(tmp_path, prompt=b"pyhv:/# ")
    assert status == 0, (console[-3000:], err[-2000:])
    assert "reboot: Power down" in console, console[-3000:]


@pytest.mark.slow
def test_shutdown_remounts_the_root_disk_read_only_and_powers_off(
        debian_disk: debian.DebianDisk, tmp_path: Path) -> None:
    """With the Debian root disk (a throwaway overlay on the cached one), init's shutdown
    actions sync it and remount it read-only (ext4 says "re-mounted" only when that
    succeeded) before the kernel powers off."""
    status, console, err = shutdown_by_name(tmp_path, "--image", "debian",
                                            prompt=b"root@")
    assert status == 0, (console[-3000:], err[-2000:])
    remounted = console.find("EXT4-fs (vda): re-mounted")
    assert 0 <= remounted < console.find("reboot: Power down"), console[-3000:]
