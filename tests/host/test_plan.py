"""`pyhv host plan` against real daemons: loads measured by the daemons, the plan, and
--apply carrying out the moves by live migration.

Counting guests (busy: they print as fast as they can) capped with --cpu-limit (the
cgroup's CPU quota, pyhv.sched) are the light work loops; the daemons measure them
(GET /v1/loads). The assertions are on the plan given the measured figures (the JSON
has both) and on what the quota guarantees (a VM never measures above its limit), never
on timing. The default run has three VMs; the article's ten are `-m slow` (and
bench/host_plan.py prints the table the README quotes).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from guestbuild import GuestBuilder
from hostkit import Daemon

from pyhv.hostd.plan import Capacity, Load, plan


def need_cgroups() -> None:
    from pyhv import sched
    try:
        sched.detect()
    except sched.CgroupUnavailable as e:
        pytest.skip(f"no CPU controller for --cpu-limit: {e}")


def start_capped(d: Daemon, guests: GuestBuilder, limits: dict[str, float]) -> None:
    for name, limit in limits.items():
        status, vm = d.request("POST", "/v1/vms", {
            "name": name, "kernel": str(guests("counter")), "engine": "emu",
            "memory_mib": 8, "cpu_limit": limit})
        assert status == 201, vm
        d.ok("POST", f"/v1/vms/{name}/start")


def host_plan(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyhv", "host", "plan", *args],
                          capture_output=True, text=True, timeout=600)


def check_measured(out: dict[str, Any], limits: dict[str, float]) -> list[Load]:
    loads = [Load(**ld) for ld in out["measured"]["loads"]]
    assert sorted(ld.vm for ld in loads) == sorted(limits)
    for ld in loads:       # the quota caps it (5 % slack: accounting and tick rounding)
        assert 0 < ld.cpu_pct <= limits[ld.vm] * 1.05 + 1, ld
    # the plan printed is the planner's on the measured figures
    caps = [Capacity(**c) for c in out["measured"]["hosts"]]
    assert out["plan"] == plan(loads, caps, out["plan"]["target_pct"]).to_json(loads, caps)
    return loads


def test_plan_measures_and_apply_moves(daemon: Callable[..., Daemon],
                                       guests: GuestBuilder) -> None:
    need_cgroups()
    a, b = daemon(), daemon()
    limits = {"w1": 10.0, "w2": 8.0, "w3": 6.0}
    start_capped(a, guests, limits)
    # B first: the planner fills B (one CPU, 80 % target) and empties A
    r = host_plan("--host", f"{b.state},cpus=1", "--host", f"{a.state},cpus=1",
                  "--window", "2", "--json", "--apply")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    loads = check_measured(out, limits)
    ua, ub = f"http://{a.tcp}", f"http://{b.tcp}"
    # at most 24 % in all: everything fits on B's 80 %
    assert {m["vm"]: (m["from"], m["to"]) for m in out["plan"]["moves"]} == \
        {ld.vm: (ua, ub) for ld in loads}
    hosts = {h["host"]: h for h in out["plan"]["hosts"]}
    assert hosts[ub]["vms"] == sorted(limits) and hosts[ua]["vms"] == []
    assert r.stderr.count("moved ") == 3
    for name in limits:
        assert b.vm(name)["state"] == "running"
        src = a.vm(name)
        assert src["state"] == "stopped" and src["last_exit"] == f"migrated to {ub}"
        assert b.ok("GET", f"/v1/vms/{name}/sched")["cpu_limit"] == limits[name]
    # the table (rich), measured again on B alone: nothing to move
    r = host_plan("--host", f"{b.state},cpus=1", "--window", "1")
    assert r.returncode == 0, r.stderr
    assert "0 move(s); hosts in use 1 of 1" in r.stdout and "w1" in r.stdout


@pytest.mark.slow
def test_ten_light_vms_onto_two_hosts(daemon: Callable[..., Daemon],
                                      guests: GuestBuilder) -> None:
    """The article's example from measured loads: ten VMs capped at 10-15 % on one
    daemon, planned onto two one-CPU hosts at 80 % target, then moved."""
    need_cgroups()
    a, b = daemon(), daemon()
    limits = {f"srv{i}": v for i, v in enumerate(
        [10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 10.0, 12.0, 14.0, 15.0])}
    start_capped(a, guests, limits)
    r = host_plan("--host", f"{a.state},cpus=1", "--host", f"{b.state},cpus=1",
                  "--window", "5", "--json", "--apply")
    out = json.loads(r.stdout)
    loads = check_measured(out, limits)
    total = sum(ld.cpu_pct for ld in loads)
    used = [h for h in out["plan"]["hosts"] if h["vms"]]
    if total > 80:                       # more than one host's 80 %: both in use
        assert len(used) == 2
    assert all(h["utilisation_planned_pct"] <= 80 for h in used)
    assert r.returncode == 0, r.stderr
    for m in out["plan"]["moves"]:
        assert b.vm(m["vm"])["state"] == "running"
        assert a.vm(m["vm"])["state"] == "stopped"
