"""Snapshots and live migration through the host daemon (pyhv.hostd.mover).

Two real daemons on this machine (their own state directories and TCP ports) move a
counting guest (tests/guests/core/counter.S on emu): the source's log followed by the
destination's is one unbroken count; the source's inventory says the VM migrated away,
the destination's that it runs. A migration that fails (the VM paused: its control API
refuses) leaves the source running and the destination with nothing half-made.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from guestbuild import GuestBuilder
from hostkit import Daemon, wait_for
from migrationkit import assert_counts_on

from pyhv import rundir


def start_counter(d: Daemon, name: str, guests: GuestBuilder) -> None:
    status, vm = d.request("POST", "/v1/vms", {"name": name, "kernel": str(guests("counter")),
                                               "engine": "emu", "memory_mib": 16})
    assert status == 201, vm
    d.ok("POST", f"/v1/vms/{name}/start")


def log(d: Daemon, name: str) -> bytes:
    return (d.state / "vms" / f"{name}.log").read_bytes()


def last_count(d: Daemon, name: str) -> int:
    found = re.findall(rb"count (\d+)\n", log(d, name))
    return int(found[-1]) if found else 0


def test_snapshot_create_list_revert_delete(daemon: Callable[..., Daemon],
                                            guests: GuestBuilder) -> None:
    d = daemon()
    start_counter(d, "c1", guests)
    wait_for(lambda: last_count(d, "c1") >= 10, "counts")
    r = d.cli("snapshot-create", "c1", "s1")
    assert r.returncode == 0, r.stderr
    after_create = last_count(d, "c1")
    listed = json.loads(d.cli("snapshot-list", "c1", "--json").stdout)
    assert [s["name"] for s in listed["snapshots"]] == ["s1"]
    wait_for(lambda: last_count(d, "c1") >= after_create + 20, "more counts")
    mark = len(log(d, "c1"))
    r = d.cli("snapshot-revert", "c1", "s1")
    assert r.returncode == 0, r.stderr

    def went_back() -> int | None:
        c = [int(x) for x in re.findall(rb"\ncount (\d+)\n", log(d, "c1")[mark:])]
        return next((c[i + 1] for i in range(len(c) - 1) if c[i + 1] <= c[i]), None)
    # the count goes back to where the snapshot was taken, and on from there
    back = wait_for(went_back, "the count to go back")
    assert back <= after_create + 1, (back, after_create)
    assert d.request("POST", "/v1/vms/c1/snapshots", {"name": "s1"})[0] == 409
    assert d.request("POST", "/v1/vms/c1/snapshots/nope/revert")[0] == 409
    assert d.request("POST", "/v1/vms/c1/snapshots", {"name": "../x"})[0] == 422
    r = d.cli("snapshot-delete", "c1", "s1")
    assert r.returncode == 0, r.stderr
    assert d.ok("GET", "/v1/vms/c1/snapshots")["snapshots"] == []
    kinds = [e["kind"] for e in d.events("c1")]
    assert {"snapshot-create", "snapshot-revert", "snapshot-delete"} <= set(kinds)
    assert d.vm("c1")["state"] == "running"
    d.ok("POST", "/v1/vms/c1/destroy")


def test_a_counter_moves_between_two_daemons_with_no_gap(
        daemon: Callable[..., Daemon], guests: GuestBuilder) -> None:
    a, b = daemon(), daemon()
    assert a.state != b.state and a.tcp != b.tcp
    to = f"http://{b.tcp}"
    start_counter(a, "mover", guests)
    wait_for(lambda: last_count(a, "mover") >= 20, "counts on the source")

    # a failed migration: the VM is paused (its control API refuses to migrate it):
    # the source runs on, the destination's half-made VM is gone
    a.ok("POST", "/v1/vms/mover/pause")
    status, obj = a.request("POST", "/v1/vms/mover/migrate", {"to": to, "token": b.token})
    assert status == 409 and "runs on here" in obj["detail"], obj
    assert a.vm("mover")["state"] == "paused"
    assert b.ok("GET", "/v1/vms") == {"vms": []}
    assert rundir.holder(b.state / "vms/mover.lock") is None
    assert "incoming-failed" in [e["kind"] for e in b.events("mover")]
    # a wrong token: refused by the destination, nothing made there
    a.ok("POST", "/v1/vms/mover/resume")
    status, obj = a.request("POST", "/v1/vms/mover/migrate", {"to": to, "token": "x"})
    assert status == 409 and "token" in obj["detail"], obj
    assert b.ok("GET", "/v1/vms") == {"vms": []}

    # the move, through the CLI
    r = a.cli("migrate", "mover", "--to", to, "--to-token-file", str(b.state / "token"),
              "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["status"] == "completed" and report["bytes"] > 0
    src = a.vm("mover")
    assert src["state"] == "stopped" and src["last_exit"] == f"migrated to {to}"
    assert src["pid"] is None
    assert rundir.holder(a.state / "vms/mover.lock") is None
    assert {"migrating", "migrated"} <= {e["kind"] for e in a.events("mover")}
    dst = b.vm("mover")
    assert dst["state"] == "running"
    assert b.events("mover")[-1]["kind"] == "migrated-in"
    before = log(a, "mover")
    n = assert_counts_on(before)
    wait_for(lambda: last_count(b, "mover") >= n + 20, "counts on the destination")
    joined = before + log(b, "mover")
    assert assert_counts_on(joined) >= n + 20           # one count: no gap, no repeat
    # the destination controls it fully
    assert b.ok("POST", "/v1/vms/mover/destroy")["state"] == "stopped"
