"""Snapshots through the control API and virsh's verbs, and `pyhv run --restore`.

A counting guest (tests/guests/core/counter.S) runs under `pyhv run --name` on emu with
its run and snapshot directories in temporary folders. `pyhv snapshot-create` writes
snapshots while it runs, `snapshot-list` shows the tree, `snapshot-revert` and
`snapshot-delete` act on it; `pyhv run --restore DIR` in a new process continues the
count: its output is a contiguous piece of the counter's output, not starting from 1.
Damaged and foreign snapshots make `pyhv run --restore` refuse with one `pyhv:` line
and status 2, with no guest output (nothing ran).

Every subprocess has a timeout; waits are bounded loops on an observable condition.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from guestbuild import GuestBuilder, engine_unavailable
from snaphelp import counting, flip_ram_byte, offset_in_count, rewrite_json

from pyhv.snapshot.manifest import MANIFEST, RAM, VMSTATE

pytestmark = pytest.mark.skipif(engine_unavailable("emu") is not None,
                                reason=str(engine_unavailable("emu")))
WAIT_S = 30.0


def wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def make_env(where: Path) -> dict[str, str]:
    return {**os.environ, "PYHV_RUN_DIR": str(where / "run"),
            "PYHV_SNAPSHOT_DIR": str(where / "snaps")}


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return make_env(tmp_path)


def pyhv(env: dict[str, str], *args: str, timeout: float = 60
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyhv", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture
def vm(guests: GuestBuilder, env: dict[str, str], tmp_path: Path
       ) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    yield from running_vm(guests, env, tmp_path)


def running_vm(guests: GuestBuilder, env: dict[str, str], tmp_path: Path
               ) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    out = tmp_path / "c1.out"
    with out.open("wb") as o:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyhv", "run", "--kernel", str(guests("counter")),
             "--engine", "emu", "--mem", "32M", "--name", "c1", "--timeout", "120"],
            stdout=o, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)
    try:
        sock = Path(env["PYHV_RUN_DIR"]) / "c1.sock"
        wait_for(lambda: sock.exists() and b"count 3\n" in out.read_bytes()
                 or proc.poll() is not None, "the VM's socket and first counts")
        assert proc.poll() is None
        yield proc, out
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def restore(env: dict[str, str], snapdir: Path, *extra: str
            ) -> subprocess.CompletedProcess[str]:
    return pyhv(env, "run", "--restore", str(snapdir), "--timeout", "2", *extra)


def test_create_list_revert_delete_and_restore(
        vm: tuple[subprocess.Popen[bytes], Path], env: dict[str, str]) -> None:
    proc, out = vm
    for name in ("s1", "s2"):
        r = pyhv(env, "snapshot-create", "c1", name)
        assert r.returncode == 0 and f"Domain snapshot {name} created" in r.stdout, r.stderr
    r = pyhv(env, "snapshot-create", "c1", "s1")
    assert r.returncode == 2 and "exists already" in r.stderr
    r = pyhv(env, "snapshot-create", "c1", "../x")
    assert r.returncode == 2 and "bad snapshot name" in r.stderr
    listing = json.loads(pyhv(env, "snapshot-list", "c1", "--json").stdout)["snapshots"]
    assert [(s["name"], s["parent"], s["current"]) for s in listing] == \
        [("s1", None, False), ("s2", "s1", True)]
    r = pyhv(env, "snapshot-revert", "c1", "nosuch")
    assert r.returncode == 2 and "no snapshot named 'nosuch'" in r.stderr
    r = pyhv(env, "snapshot-revert", "c1", "s1")
    assert r.returncode == 0 and "reverted to snapshot s1" in r.stdout, r.stderr
    r = pyhv(env, "snapshot-delete", "c1", "s2")
    assert r.returncode == 0, r.stderr
    assert "s2" not in pyhv(env, "snapshot-list", "c1").stdout
    pyhv(env, "destroy", "c1")
    assert proc.wait(timeout=30) == 0
    source = out.read_bytes()
    # the revert to s1 shows as the count going back once, then counting on. A revert
    # that lands while the guest is half-way through a line joins that half to the rest
    # of the line the snapshot was in (the console simply goes on), so at most one
    # line at the boundary may be such a join: it breaks the sequence on both sides.
    counts = re.findall(rb"count (\d+)\n", source)
    irregular = [i for i in range(len(counts) - 1)
                 if int(counts[i + 1]) != int(counts[i]) + 1]
    if len(irregular) == 2 and irregular[1] == irregular[0] + 1:
        del counts[irregular[1]]                       # the joined boundary line
    backs = [(a, b) for a, b in zip(counts, counts[1:], strict=False)
             if int(b) != int(a) + 1]
    assert len(backs) == 1 and int(backs[0][1]) < int(backs[0][0]), backs

    snapdir = Path(env["PYHV_SNAPSHOT_DIR"]) / "c1" / "s1"
    r = restore(env, snapdir)
    assert r.returncode == 124, r.stderr               # it ran until --timeout
    resumed = r.stdout.encode()
    at = offset_in_count(resumed)                      # a piece of the count...
    assert at > len(counting(3)) and not resumed.startswith(b"count 1\n")   # ...not anew
    first_pass = source[:source.index(b"count " + backs[0][0] + b"\n")]
    assert at <= len(first_pass)                       # a point the source had reached


@pytest.fixture(scope="module")
def snapshot(guests: GuestBuilder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One snapshot of a running counter for the refusal tests (taken once)."""
    where = tmp_path_factory.mktemp("snapshot")
    env = make_env(where)
    for proc, _out in running_vm(guests, env, where):
        r = pyhv(env, "snapshot-create", "c1", "s1")
        assert r.returncode == 0, r.stderr
        pyhv(env, "destroy", "c1")
        proc.wait(timeout=30)
    return Path(env["PYHV_SNAPSHOT_DIR"]) / "c1" / "s1"


def _host_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _too_big(d: Path) -> None:
    big = (_host_ram() // (1 << 30) + 4) << 30
    rewrite_json(d, VMSTATE, lambda s: s.update(mem_size=big))
    rewrite_json(d, MANIFEST, lambda m: m.update(mem_size=big))
    os.truncate(d / RAM, big)                           # sparse: costs nothing
    rewrite_json(d, MANIFEST, lambda m: m["files"][RAM].update(size=big))


def _foreign_devices(d: Path) -> None:
    def swap(s: dict[str, object]) -> None:
        devs = s["devices"]
        assert isinstance(devs, dict)
        devs["floppy"] = devs.pop("rtc")
    rewrite_json(d, VMSTATE, swap)
    rewrite_json(d, MANIFEST, lambda m: m.update(
        devices=["floppy" if x == "rtc" else x for x in m["devices"]]))


REFUSALS: dict[str, tuple[Callable[[Path], None], str]] = {
    "bad-checksum": (flip_ram_byte, "does not match its checksum"),
    "newer-version": (lambda d: rewrite_json(d, MANIFEST, lambda m: m.update(format=2)),
                      "newer than this pyhv reads"),
    "other-device-set": (_foreign_devices, "device set differs"),
    "too-little-host-memory": (_too_big, "more than this host's"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_damaged_or_foreign_snapshots_are_refused_and_nothing_runs(
        snapshot: Path, env: dict[str, str], tmp_path: Path, case: str) -> None:
    """Each damage on a copy; then the original still restores (checked once, last)."""
    damaged = tmp_path / "copy"
    shutil.copytree(snapshot, damaged)
    change, words = REFUSALS[case]
    change(damaged)
    r = restore(env, damaged)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stdout == ""                               # no guest output: nothing ran
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("pyhv: ") and words in r.stderr, \
        r.stderr


def test_the_untouched_snapshot_restores(snapshot: Path, env: dict[str, str]) -> None:
    ok = restore(env, snapshot)
    assert ok.returncode == 124 and offset_in_count(ok.stdout.encode()) > 0


def test_restore_refuses_options_of_a_new_guest(snapshot: Path, env: dict[str, str]) -> None:
    r = restore(env, snapshot, "--mem", "64M")
    assert r.returncode == 2 and "--mem" in r.stderr and r.stdout == ""


@pytest.mark.kvm
@pytest.mark.skipif(engine_unavailable("kvm") is not None,
                    reason=str(engine_unavailable("kvm")))
def test_restore_on_another_engine(snapshot: Path, env: dict[str, str]) -> None:
    """Taken on emu, restored on kvm: `--engine` picks the engine, the count goes on."""
    r = restore(env, snapshot, "--engine", "kvm")
    assert r.returncode == 124, r.stderr
    assert offset_in_count(r.stdout.encode()) > len(counting(3))


def test_snapshot_verify_and_restore_verify_hash_the_whole_ram(
        snapshot: Path, env: dict[str, str], tmp_path: Path) -> None:
    """The full check alone (`pyhv snapshot-verify DIR`) and before a restore
    (`--restore DIR --verify`): a byte changed inside a RAM data page is refused by both
    (the default quick check does not see it: test_snapshot_ops), nothing runs."""
    ok = pyhv(env, "snapshot-verify", str(snapshot))
    assert ok.returncode == 0 and "every file matches its checksum" in ok.stdout, ok.stderr
    damaged = tmp_path / "copy"
    shutil.copytree(snapshot, damaged)
    flip_ram_byte(damaged)
    for r in (pyhv(env, "snapshot-verify", str(damaged)),
              restore(env, damaged, "--verify")):
        assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stderr)
        assert r.stderr.startswith("pyhv: ") and "does not match its checksum" in r.stderr
    r = pyhv(env, "run", "--verify", "--kernel", str(snapshot / "x"))
    assert r.returncode == 2 and "goes with --restore" in r.stderr
