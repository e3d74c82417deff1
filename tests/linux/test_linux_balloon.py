"""The virtio-balloon with Debian's virtio_balloon driver: the host takes memory back.

One boot of Debian's kernel with pyhv's initramfs on emu (`pyhv run --balloon
--api-sock`). The guest first dirties 48 MiB (a file in its tmpfs root, then removed),
so those pages are resident in the host process. Through the control API the host then
sets the balloon to 64 MiB: the driver inflates until `actual` reaches the target, the
guest's own view (its memory statistics on the stats queue, MemTotal) shrinks by
exactly 64 MiB, and the host process's RSS falls (the inflated pages are madvised
away). Deflating to 0 gives the guest its memory back. Then a hard stop ends the run.
Measured here once (2026-12-03): host RSS 206 -> 157 MB for a 64 MiB inflation.

Every subprocess has a timeout; waits are bounded loops on what the guest and the API
report, never sleeps sized to the host's speed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyhv import images
from pyhv.vmclient import VmError, call

WAIT_S = 90.0
MiB = 1 << 20


def wait_for(cond: Callable[[], bool], what: str, out: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}: "
                                 f"{out.read_bytes()[-2000:].decode(errors='replace')}")
        time.sleep(0.1)


def test_balloon_inflates_and_deflates(debian_image: images.LinuxImage,
                                       tmp_path: Path) -> None:
    sock, out, err = tmp_path / "vm.sock", tmp_path / "console", tmp_path / "stderr"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyhv", "run", "--engine", "emu", "--mem", "128M",
             "--balloon", "--api-sock", str(sock), "--timeout", "200", "--command",
             "dd if=/dev/zero of=/tmp/fill bs=1M count=48 2>/dev/null; rm /tmp/fill;"
             " echo filled-$((6*7)); sleep 1000"],
            stdin=subprocess.DEVNULL, stdout=o, stderr=e)
    try:
        wait_for(lambda: b"filled-42" in out.read_bytes() or proc.poll() is not None,
                 "the guest to dirty its memory", out)
        assert proc.poll() is None, err.read_text()

        def balloon() -> dict[str, Any]:
            return call(sock, "GET", "/balloon")

        def fresh_stats() -> dict[str, Any]:
            """Ask for a new report (GET does) and wait until it arrived."""
            n = balloon()["stats_updates"]
            wait_for(lambda: balloon()["stats_updates"] > n, "a stats report", out)
            return balloon()

        wait_for(lambda: balloon()["stats_updates"] >= 1, "the driver's first stats", out)
        before = fresh_stats()
        total0 = before["guest_stats"]["total_memory"]
        assert before["actual_bytes"] == 0 and 64 * MiB < total0 <= 128 * MiB

        assert call(sock, "PUT", "/balloon", {"target": "64M"}) == {"target_bytes": 64 * MiB}
        wait_for(lambda: balloon()["actual_bytes"] == 64 * MiB, "the balloon to inflate", out)
        inflated = fresh_stats()
        assert inflated["held_pages"] == 64 * MiB // 4096 and inflated["bad_frames"] == 0
        assert total0 - inflated["guest_stats"]["total_memory"] == 64 * MiB
        assert before["host_rss_bytes"] - inflated["host_rss_bytes"] >= 24 * MiB, \
            (before["host_rss_bytes"], inflated["host_rss_bytes"])

        call(sock, "PUT", "/balloon", {"target": "0"})
        wait_for(lambda: balloon()["actual_bytes"] == 0, "the balloon to deflate", out)
        after = fresh_stats()
        assert after["held_pages"] == 0 and after["guest_stats"]["total_memory"] == total0

        for bad in ({"target": "129M"}, {"target": "lots"}, {"size": "1M"}):
            try:
                call(sock, "PUT", "/balloon", bad)
                raise AssertionError(f"{bad} was accepted")
            except VmError as e:
                assert "target" in str(e) or "unknown field" in str(e) or "needs" in str(e)
        call(sock, "PUT", "/actions", {"action": "stop"})
        proc.wait(timeout=60)       # status 4: --command's shell never reported its status
        assert "stopped through the control API" in err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
