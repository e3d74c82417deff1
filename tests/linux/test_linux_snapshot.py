"""A Linux shell session snapshotted and restored goes on: its counter has no gap.

Debian's kernel with pyhv's initramfs boots on emu under `pyhv run --name`, at its
shell; the shell runs a loop printing `tick-N` every 0.2 s of guest time (so the
guest's timers, the APIC and the clock must come back right, not only its registers).
The VM is suspended, its console output let settle (the last tick printed is the last
the guest made), `pyhv snapshot-create` writes the snapshot and the VM is destroyed.
`pyhv run --restore` in a new process continues the loop: its first tick is the next
one, and every tick after it follows by one. The revert variant (slow) reverts a
running VM to the snapshot: the ticks go back to the snapshot's and count on from
there.

Every subprocess has a timeout; waits are bounded loops on what the console shows.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyhv import images
from pyhv.disk.qcow2.create import create as create_qcow2

RUN_TIMEOUT_S = 150
WAIT_S = 90.0
PROMPT = b"pyhv:/# "
# each turn: read the disk's first 8 bytes past the page cache (what the disk holds),
# print them and the tick, write the tick to the disk (synchronously), sleep
LOOP = (b"i=0; while true; do i=$((i+1)); sync; echo 3 > /proc/sys/vm/drop_caches; "
        b"echo disk-$(head -c 8 /dev/vda); echo tick-$i; "
        b"printf t%07d $i | dd of=/dev/vda conv=fsync 2>/dev/null; sleep 0.2; done\n")


def wait_for(cond: Callable[[], bool], what: str, out: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}: "
                                 f"{out.read_bytes()[-2000:].decode(errors='replace')}")
        time.sleep(0.05)


def ticks(data: bytes) -> list[int]:
    return [int(n) for n in re.findall(rb"tick-(\d+)\r?\n", data)]


def settled(out: Path) -> bytes:
    """The file's content once it stopped growing (the VM is paused; the console
    writer flushes what it holds within milliseconds)."""
    last = out.read_bytes()
    while True:
        time.sleep(0.3)
        now = out.read_bytes()
        if now == last:
            return now
        last = now


def pyhv(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyhv", *args], env=env,
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def ticking(debian_image: images.LinuxImage, tmp_path: Path
            ) -> Iterator[tuple[subprocess.Popen[bytes], Path, dict[str, str]]]:
    env = {**os.environ, "PYHV_RUN_DIR": str(tmp_path / "run"),
           "PYHV_SNAPSHOT_DIR": str(tmp_path / "snaps")}
    out = tmp_path / "console"
    disk = tmp_path / "d.qcow2"
    create_qcow2(str(disk), 16 << 20)
    with out.open("wb") as o:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyhv", "run", "--engine", "emu", "--name", "lx",
             "--disk", str(disk), "--rng", "--timeout", str(RUN_TIMEOUT_S)],
            stdin=subprocess.PIPE, stdout=o, stderr=subprocess.DEVNULL, env=env)
    try:
        assert proc.stdin is not None
        wait_for(lambda: PROMPT in out.read_bytes() or proc.poll() is not None,
                 "the guest's shell prompt", out)
        proc.stdin.write(LOOP)
        proc.stdin.flush()
        wait_for(lambda: 5 in ticks(out.read_bytes()) or proc.poll() is not None,
                 "tick-5", out)
        assert proc.poll() is None
        yield proc, out, env
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def disk_reads(data: bytes) -> list[str]:
    return [m.decode() for m in re.findall(rb"disk-(t\d{7})\r?\n", data)]


def test_a_shell_loop_continues_after_restore(
        ticking: tuple[subprocess.Popen[bytes], Path, dict[str, str]], tmp_path: Path
        ) -> None:
    """With a qcow2 disk the loop writes and an rng: the disk goes back to the
    snapshot's content (its qcow2 internal snapshot `s1`) when the VM is restored,
    although the source wrote on after the snapshot."""
    proc, out, env = ticking
    assert pyhv(env, "suspend", "lx").returncode == 0
    last = ticks(settled(out))[-1]
    r = pyhv(env, "snapshot-create", "lx", "s1")
    assert r.returncode == 0, r.stderr
    assert pyhv(env, "resume", "lx").returncode == 0      # the disk moves on...
    wait_for(lambda: last + 3 in ticks(out.read_bytes()), f"tick-{last + 3}", out)
    pyhv(env, "destroy", "lx")
    proc.wait(timeout=30)

    snapdir = Path(env["PYHV_SNAPSHOT_DIR"]) / "lx" / "s1"
    restored = tmp_path / "restored"
    with restored.open("wb") as o:
        new = subprocess.Popen([sys.executable, "-m", "pyhv", "run", "--restore",
                                str(snapdir), "--name", "lx2", "--timeout",
                                str(RUN_TIMEOUT_S)], stdout=o, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, env=env)
    try:
        wait_for(lambda: len(ticks(restored.read_bytes())) >= 5 or new.poll() is not None,
                 "5 ticks from the restored VM", restored)
        assert new.poll() is None, new.stderr.read() if new.stderr else ""
        pyhv(env, "destroy", "lx2")
        assert new.wait(timeout=30) == 0
    finally:
        if new.poll() is None:
            new.kill()
        new.wait(timeout=10)
    got = ticks(restored.read_bytes())
    assert got[0] == last + 1, (last, got[:5])     # no gap, no repeat at the restore
    assert got == list(range(got[0], got[0] + len(got)))
    # ...and is back at the snapshot's: the first read after the restore sees tick `last`
    assert disk_reads(restored.read_bytes())[0] == f"t{last:07d}"
    assert disk_reads(out.read_bytes())[-1] > f"t{last:07d}"   # the source had moved on


@pytest.mark.slow
def test_revert_takes_a_running_shell_back_to_the_snapshot(
        ticking: tuple[subprocess.Popen[bytes], Path, dict[str, str]]) -> None:
    proc, out, env = ticking
    assert pyhv(env, "suspend", "lx").returncode == 0
    last = ticks(settled(out))[-1]
    assert pyhv(env, "snapshot-create", "lx", "s1").returncode == 0
    assert pyhv(env, "resume", "lx").returncode == 0
    wait_for(lambda: last + 10 in ticks(out.read_bytes()), f"tick-{last + 10}", out)
    mark = len(out.read_bytes())
    r = pyhv(env, "snapshot-revert", "lx", "s1")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: len(ticks(out.read_bytes()[mark:])) >= 5, "ticks after the revert", out)
    after = ticks(out.read_bytes()[mark:])
    # ticks printed between `mark` and the revert are the old run's (a few, all later)
    assert last + 1 in after, (last, after)
    k = after.index(last + 1)
    assert all(t > last + 1 for t in after[:k]), after
    assert after[k:] == list(range(last + 1, last + 1 + len(after) - k))
