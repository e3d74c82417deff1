"""The host daemon on a full disk: its state directory on a 4 MiB tmpfs (mounted for
the test: needs root; skipped with the reason otherwise), filled to the last block.

Every operation that must write the inventory answers 507 with a one-line reason that
names the state directory; nothing is half-made: no new definition, no event, no VM
process left running for a start the inventory could not record (it is killed before
the answer). Once space is freed the same requests succeed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from guestbuild import GuestBuilder
from hostkit import Daemon, wait_for


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "m"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs",
                        str(mnt)], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], timeout=30)


def fill(path: Path) -> None:
    with contextlib.suppress(OSError), path.open("wb") as f:
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    with contextlib.suppress(OSError), path.open("ab") as f:   # the last partial block
        while True:
            f.write(b"\0")
            f.flush()


def vm_processes(state: Path) -> list[int]:
    """Every live process whose command line mentions this state directory's VMs."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            if b"run" in cmd and any(str(state).encode() in c for c in cmd):
                out.append(int(d.name))
    return out


def test_a_full_state_directory_is_507_and_leaves_nothing_half_made(
        tiny_fs: Path, guests: GuestBuilder) -> None:
    d = Daemon(tiny_fs / "s")
    counter = str(guests("counter"))
    try:
        d.start()
        vm = {"kernel": counter, "engine": "emu", "memory_mib": 8}
        assert d.request("POST", "/v1/vms", {"name": "a", **vm})[0] == 201
        before = (d.ok("GET", "/v1/vms"), d.ok("GET", "/v1/events"))
        fill(tiny_fs / "filler")

        status, obj = d.request("POST", "/v1/vms", {"name": "b", **vm})
        assert status == 507, obj
        assert "could not be written" in obj["detail"] and str(d.state) in obj["detail"]
        status, obj = d.request("POST", "/v1/vms/a/start")
        assert status == 507, obj
        assert (d.ok("GET", "/v1/vms"), d.ok("GET", "/v1/events")) == before
        assert vm_processes(d.state) == []          # the spawned VM did not outlive it
        assert d.request("DELETE", "/v1/vms/a")[0] == 507
        assert d.ok("GET", "/v1/vms") == before[0]

        (tiny_fs / "filler").unlink()
        assert d.request("POST", "/v1/vms", {"name": "b", **vm})[0] == 201
        assert d.ok("POST", "/v1/vms/a/start")["state"] == "running"
        assert d.ok("POST", "/v1/vms/a/destroy")["state"] == "stopped"
        wait_for(lambda: not vm_processes(d.state), "the VM to end")
    finally:
        d.reap()
