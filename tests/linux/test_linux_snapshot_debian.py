"""A snapshot of a VM started with `--image debian` restores after its run ended.

`--image debian`'s root disk is a throwaway overlay removed when the run ends; a
snapshot keeps it (a hard link in the snapshot's directory, named by the manifest:
snapshot/disks.py). Debian's kernel and root disk boot on emu under `pyhv run --name`;
the shell writes a line to a file on the root disk and syncs; `pyhv snapshot-create`
writes the snapshot; then the guest changes the file again and the VM is destroyed
(its overlay directory is gone). `pyhv run --restore` in a new process continues the
shell, which reads the file as it was at the snapshot (the overlay's internal snapshot
applied), not the later change. Slow: two Debian boots' worth of emu time.

Every subprocess has a timeout; waits are bounded loops on what the console shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pyhv import debian

pytestmark = pytest.mark.slow
RUN_TIMEOUT_S = 240
WAIT_S = 180.0


def wait_for(cond: Callable[[], bool], what: str, out: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}: "
                                 f"{out.read_bytes()[-2000:].decode(errors='replace')}")
        time.sleep(0.1)


def pyhv(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyhv", *args], capture_output=True,
                          text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)


def test_a_debian_vm_snapshot_keeps_its_overlay_and_restores(
        debian_disk: debian.DebianDisk, tmp_path: Path) -> None:
    env = {**os.environ, "PYHV_RUN_DIR": str(tmp_path / "run"),
           "PYHV_SNAPSHOT_DIR": str(tmp_path / "snaps")}
    out = tmp_path / "d1.out"
    with out.open("wb") as o:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyhv", "run", "--image", "debian", "--engine", "emu",
             "--name", "d1", "--timeout", str(RUN_TIMEOUT_S)],
            stdin=subprocess.PIPE, stdout=o, stderr=subprocess.STDOUT, env=env)
    assert proc.stdin is not None
    vmdir = tmp_path / "snaps" / "d1"
    try:
        wait_for(lambda: b"# " in out.read_bytes() or proc.poll() is not None, "a shell",
                 out)
        assert proc.poll() is None
        overlays = [p for p in vmdir.iterdir() if p.name.startswith(".pyhv-overlay-")]
        assert len(overlays) == 1          # the run's overlay lives by its snapshots
        proc.stdin.write(b"echo before-snap > /root/mark; sync; echo wrote-$((6*7))\n")
        proc.stdin.flush()
        wait_for(lambda: b"wrote-42" in out.read_bytes(), "the first write", out)
        r = pyhv(env, "snapshot-create", "d1", "s1")
        assert r.returncode == 0, r.stderr
        proc.stdin.write(b"echo after-snap > /root/mark; sync; echo wrote-$((6*8))\n")
        proc.stdin.flush()
        wait_for(lambda: b"wrote-48" in out.read_bytes(), "the second write", out)
        r = pyhv(env, "destroy", "d1")
        assert r.returncode == 0, r.stderr
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert not overlays[0].exists()                     # the run's own overlay is gone
    snap = vmdir / "s1"
    manifest = json.loads((snap / "manifest.json").read_text())
    kept = snap / "disk0.qcow2"
    assert kept.is_file()
    assert manifest["disks"][0]["path"] == str(kept)
    assert manifest["machine"]["pci"][0]["path"] == str(kept)
    assert "throwaway" not in manifest["machine"]["pci"][0]
    r2 = subprocess.run(
        [sys.executable, "-m", "pyhv", "run", "--restore", str(snap), "--timeout", "60"],
        input=b"cat /root/mark; echo read-$((6*9))\n", capture_output=True,
        timeout=120, env=env)
    text = r2.stdout.decode(errors="replace")
    assert "read-54" in text, (r2.returncode, text[-2000:], r2.stderr[-2000:])
    assert "before-snap" in text.split("read-54")[0].split("cat /root/mark")[-1]
    assert "after-snap" not in text.split("cat /root/mark")[-1].split("read-54")[0]
