"""The host daemon (pyhv.hostd): authentication, the lifecycle through the CLI, the
console websocket, adoption across a restart, and bad input.

Guests are the core test guests on emu with 8-16 MiB: counter (counts forever, powers
off on the ACPI power button) and echo (answers its console in upper case). Progress is
the guest's own output, never timing; every wait is bounded (conftest.wait_for).
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from guestbuild import GuestBuilder
from hostkit import Daemon, wait_for

from pyhv import rundir


def define(d: Daemon, name: str, kernel: Path, mem: int = 8, **extra: Any) -> dict[str, Any]:
    status, vm = d.request("POST", "/v1/vms", {"name": name, "kernel": str(kernel),
                                               "engine": "emu", "memory_mib": mem, **extra})
    assert status == 201, vm
    return vm  # type: ignore[no-any-return]


def counts(d: Daemon, name: str) -> list[int]:
    log = (d.state / "vms" / f"{name}.log").read_bytes()
    return [int(n) for n in re.findall(rb"count (\d+)\n", log)]


def test_every_request_needs_the_token(daemon: Callable[..., Daemon]) -> None:
    d = daemon()
    st = d.state
    assert stat.S_IMODE(st.stat().st_mode) == 0o700
    assert stat.S_IMODE((st / "token").stat().st_mode) == 0o600
    assert stat.S_IMODE((st / "api.sock").stat().st_mode) == 0o600
    assert len(d.token) == 64
    body = {"name": "x", "kernel": "/bin/true"}
    for token in (None, "", "wrong", d.token + "x", d.token[:-1]):
        for method, path, b in (("GET", "/v1/vms", None), ("POST", "/v1/vms", body),
                                ("GET", "/openapi.json", None), ("GET", "/nowhere", None),
                                ("POST", "/v1/vms/x/start", None),
                                ("DELETE", "/v1/vms/x", None)):
            for tcp in (False, True):
                status, obj = d.request(method, path, b, token=token, tcp=tcp)
                assert status == 401, (token, method, path, obj)
                assert "bearer token" in obj["detail"]
    # a Basic or malformed Authorization is no better
    for header in ("Basic " + d.token, d.token, f"Bearer  {d.token}"):
        status, _ = d.request("GET", "/v1/vms", token=None,
                              headers={"Authorization": header})
        assert status == 401
    assert d.ok("GET", "/v1/vms") == {"vms": []}          # nothing was defined
    status, _ = d.request("GET", "/v1/vms", tcp=True)
    assert status == 200
    # the websocket too: refused before any upgrade
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import unix_connect
    with pytest.raises(InvalidStatus) as e:
        unix_connect(str(st / "api.sock"), "ws://x/v1/vms/x/console", open_timeout=30)
    assert e.value.response.status_code == 401
    # the CLI with a token file that others can read refuses to use it
    (st / "token").chmod(0o644)
    r = d.cli("list")
    assert r.returncode == 2 and "readable by others" in r.stderr
    (st / "token").chmod(0o600)
    # a second daemon on the same state directory is refused
    r = subprocess.run([sys.executable, "-m", "pyhv", "host", "serve", "--state-dir",
                        str(st), "--listen", "none"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "already serves" in r.stderr, r.stderr
    assert d.ok("GET", "/v1/vms") == {"vms": []}


def test_lifecycle_through_the_cli_and_the_console(daemon: Callable[..., Daemon],
                                                   guests: GuestBuilder) -> None:
    d = daemon()
    r = d.cli("define", "--name", "echo1", "--kernel", str(guests("echo")), "--engine",
              "emu", "--mem", "16M", "--cpu-shares", "2000", "--pin", "0")
    assert r.returncode == 0 and "Domain 'echo1' defined" in r.stdout, r.stderr
    r = d.cli("list", "--all", "--json")
    [vm] = json.loads(r.stdout)
    assert vm["state"] == "stopped" and vm["pid"] is None
    assert vm["definition"]["memory_mib"] == 16 and vm["definition"]["pin"] == ["0"]
    assert json.loads(d.cli("list", "--json").stdout) == []      # only running ones
    r = d.cli("schedinfo", "echo1", "--json")
    info = json.loads(r.stdout)
    assert (info["cpu_shares"], info["cpu_reservation"], info["cpu_limit"], info["pin"],
            info["cgroup"]) == (2000, 0.0, None, ["0"], None)

    r = d.cli("start", "echo1")
    assert r.returncode == 0 and "started" in r.stdout, r.stderr
    info = json.loads(d.cli("dominfo", "echo1", "--json").stdout)
    pid = info["pid"]
    assert info["state"] == "running" and rundir.holder(d.state / "vms/echo1.lock") == pid
    assert os.getpgid(pid) == pid                # its own process group (own session)
    assert re.search(rf"{pid}\s+echo1\s+running", d.cli("list").stdout)
    # the same over TCP, with the token file named
    r = d.cli("list", "--url", f"http://{d.tcp}", "--token-file", str(d.state / "token"))
    assert r.returncode == 0 and re.search(rf"{pid}\s+echo1\s+running", r.stdout), r.stderr
    r = d.cli("list", "--url", f"http://{d.tcp}", "--token-file", "/nonexistent")
    assert r.returncode == 2 and "no token file" in r.stderr
    wait_for(lambda: b"echo ready" in (d.state / "vms/echo1.log").read_bytes(),
             "the guest's banner in its log")

    # the console: bytes typed go to the guest, its answer (upper case) comes back
    con = subprocess.Popen([sys.executable, "-m", "pyhv", "vm", "console", "echo1",
                            "--state-dir", str(d.state)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           start_new_session=True)
    try:
        assert con.stdin is not None and con.stdout is not None
        os.set_blocking(con.stdout.fileno(), False)
        got = b""

        def answered() -> bool:
            nonlocal got
            assert con.stdin is not None and con.stdout is not None
            if not got:
                con.stdin.write(b"hello pyhv\n")   # until the websocket is up
                con.stdin.flush()
            chunk = con.stdout.read()
            got += chunk or b""
            return b"HELLO PYHV\n" in got
        wait_for(answered, "the guest's answer on the console")
    finally:
        os.killpg(con.pid, signal.SIGKILL)
        con.wait(timeout=30)

    r = d.cli("suspend", "echo1")
    assert r.returncode == 0 and "suspended" in r.stdout
    assert d.vm("echo1")["state"] == "paused"
    r = d.cli("shutdown", "echo1")
    assert r.returncode == 2 and "paused" in r.stderr
    r = d.cli("resume", "echo1")
    assert r.returncode == 0 and d.vm("echo1")["state"] == "running"
    r = d.cli("undefine", "echo1")
    assert r.returncode == 2 and "running" in r.stderr
    r = d.cli("shutdown", "echo1")
    assert r.returncode == 0 and "is being shutdown" in r.stdout, r.stderr
    vm = d.wait_state("echo1", "stopped", "crashed")
    assert vm["state"] == "stopped" and vm["last_exit"] == "shut down" and vm["pid"] is None
    assert (d.state / "vms/echo1.log").read_bytes().endswith(b"power button\n")
    kinds = [e["kind"] for e in d.events("echo1")]
    assert kinds == ["defined", "starting", "started", "paused", "resumed", "shutdown",
                     "stopped"]
    r = d.cli("events", "--vm", "echo1")
    assert "ACPI power button pressed" in r.stdout
    # a console on a stopped VM: the daemon's reason, status 2
    r = d.cli("console", "echo1")
    assert r.returncode == 2 and "stopped" in r.stderr and "Traceback" not in r.stderr
    r = d.cli("undefine", "echo1")
    assert r.returncode == 0 and "undefined" in r.stdout
    assert d.ok("GET", "/v1/vms") == {"vms": []}
    assert not list((d.state / "vms").glob("echo1.*"))


def test_vms_outlive_a_daemon_restart_and_are_adopted(daemon: Callable[..., Daemon],
                                                      guests: GuestBuilder) -> None:
    d = daemon()
    for name in ("keep", "lost", "idle"):
        define(d, name, guests("counter"))
    for name in ("keep", "lost"):
        d.ok("POST", f"/v1/vms/{name}/start")
    d.ok("POST", "/v1/vms/keep/pause")
    keep_pid, lost_pid = d.vm("keep")["pid"], d.vm("lost")["pid"]
    assert d.stop() == 0                      # SIGTERM: the daemon goes, the VMs stay
    assert not (d.state / "daemon.json").exists()
    assert rundir.holder(d.state / "vms/keep.lock") == keep_pid
    os.killpg(lost_pid, signal.SIGKILL)       # one VM dies while nobody watches
    wait_for(lambda: rundir.holder(d.state / "vms/lost.lock") is None, "lost to die")

    d.start()
    keep = d.vm("keep")
    assert keep["state"] == "paused" and keep["pid"] == keep_pid
    assert d.events("keep")[-1]["kind"] == "adopted"
    lost = d.vm("lost")
    assert lost["state"] == "stopped" and lost["pid"] is None
    assert d.events("lost")[-1]["kind"] == "lost"
    assert d.ok("GET", "/v1/vms/lost/sched")["cgroup"] is None     # its group went too
    assert d.vm("idle")["state"] == "stopped"
    # the adopted VM is fully controlled: resume (its count goes on), destroy
    before = len(counts(d, "keep"))
    d.ok("POST", "/v1/vms/keep/resume")
    wait_for(lambda: len(counts(d, "keep")) > before + 3, "keep's count to go on")
    c = counts(d, "keep")
    assert c == list(range(1, len(c) + 1))
    vm = d.ok("POST", "/v1/vms/keep/destroy")
    assert vm["state"] == "stopped" and vm["last_exit"] == "destroyed"
    assert rundir.holder(d.state / "vms/keep.lock") is None
    # and the dead one starts again
    assert d.ok("POST", "/v1/vms/lost/start")["state"] == "running"
    d.ok("POST", "/v1/vms/lost/destroy")


def test_bad_input_leaves_the_inventory_whole(daemon: Callable[..., Daemon],
                                              guests: GuestBuilder, tmp_path: Path) -> None:
    d = daemon("--memory-capacity", "40M")
    counter = guests("counter")
    # malformed JSON, not an object, wrong fields
    assert d.request("POST", "/v1/vms", raw=b'{"name": ')[0] == 400
    assert d.request("POST", "/v1/vms", raw=b"[1, 2]")[0] == 400
    assert d.request("POST", "/v1/vms", raw=b"\xff\xfe")[0] == 400
    status, obj = d.request("POST", "/v1/vms", {"name": "a", "kernel": str(counter),
                                                "memory_mib": "lots", "colour": "red"})
    assert status == 422 and "memory_mib" in obj["detail"] and "colour" in obj["detail"]
    for bad in ({"name": "../etc"}, {"name": "a", "kernel": "relative/path"},
                {"name": "a", "kernel": str(counter), "image": "linux"},
                {"name": "a", "vcpus": 0}, {"name": "a", "vcpus": 2, "pin": [0]},
                {"name": "a", "cpu_limit": 100, "cpu_reservation": 200},
                {"name": "a", "engine": "vmware"}):
        status, obj = d.request("POST", "/v1/vms", bad)
        assert status == 422, (bad, obj)
    # what the host cannot take: a missing kernel, more memory than its capacity, a pin
    # to a CPU it lacks, a name too long for a socket path
    for bad, word in (({"name": "a", "kernel": str(tmp_path / "none")}, "no such file"),
                      ({"name": "a", "kernel": str(counter), "memory_mib": 64}, "capacity"),
                      ({"name": "a", "kernel": str(counter), "memory_mib": 8, "pin": ["4095"]},
                       "does not offer"),
                      ({"name": "a", "kernel": str(counter), "memory_mib": 8,
                        "cpu_reservation": 150}, "more than its 1 vCPU"),
                      ({"name": "a", "kernel": str(counter), "memory_mib": 8,
                        "cpu_reservation": 50, "cpu_limit": 20}, "below the reservation"),
                      ({"name": "a", "kernel": str(counter), "memory_mib": 8,
                        "pin": ["0", "0"]}, "2 CPU pins for 1 vCPUs"),
                      ({"name": "a" * 64, "kernel": str(counter), "memory_mib": 8},
                       "too long")):
        status, obj = d.request("POST", "/v1/vms", bad)
        assert status == 422 and word in obj["detail"], (bad, obj)
    assert d.ok("GET", "/v1/vms") == {"vms": []}
    # unknown VMs, on every route
    for method, path in (("GET", "/v1/vms/nope"), ("DELETE", "/v1/vms/nope"),
                         ("GET", "/v1/vms/nope/stats"),
                         *(("POST", f"/v1/vms/nope/{v}") for v in
                           ("start", "shutdown", "destroy", "pause", "resume"))):
        status, obj = d.request(method, path)
        assert status == 404 and "nope" in obj["detail"], (method, path, obj)

    define(d, "one", counter, mem=24)
    define(d, "two", counter, mem=24)
    assert d.request("POST", "/v1/vms", {"name": "one", "kernel": str(counter),
                                         "memory_mib": 8})[0] == 409
    assert d.request("POST", "/v1/vms/one/pause")[0] == 409        # not running
    assert d.ok("POST", "/v1/vms/one/start")["state"] == "running"
    assert d.request("POST", "/v1/vms/one/start")[0] == 409        # already running
    # admission: 24 + 24 MiB does not fit 40 MiB; nothing is started, nothing changes
    status, obj = d.request("POST", "/v1/vms/two/start")
    assert status == 409 and "capacity" in obj["detail"]
    assert d.vm("two")["state"] == "stopped" and not (d.state / "vms/two.lock").exists()
    host = d.ok("GET", "/v1/host")
    assert host["memory_capacity_mib"] == 40 and host["memory_committed_mib"] == 24
    assert host["vms"] == {"running": 1, "stopped": 1}
    assert d.ok("GET", "/v1/vms/one/stats")["state"] == "running"

    # killed behind the daemon's back: crashed, with the event
    pid = d.vm("one")["pid"]
    os.killpg(pid, signal.SIGKILL)
    vm = d.wait_state("one", "crashed")
    assert vm["pid"] is None and "SIGKILL" in vm["last_exit"]
    assert d.events("one")[-1]["kind"] == "crashed"
    assert d.ok("GET", "/v1/host")["memory_committed_mib"] == 0
    # a crashed VM starts again
    assert d.ok("POST", "/v1/vms/one/start")["state"] == "running"
    d.ok("POST", "/v1/vms/one/destroy")

    # a start that fails (pyhv run refuses the image) leaves it stopped, with the reason
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x7fELF" + b"\0" * 60)
    define(d, "junk", junk)
    status, obj = d.request("POST", "/v1/vms/junk/start")
    assert status == 422 and "did not start" in obj["detail"], obj
    vm = d.vm("junk")
    assert vm["state"] == "stopped" and vm["pid"] is None and "start failed" in vm["last_exit"]
    assert rundir.holder(d.state / "vms/junk.lock") is None
    assert not (d.state / "vms/junk.console").exists()
    assert [e["kind"] for e in d.events("junk")][-1] == "start-failed"
    assert d.ok("GET", "/v1/host")["memory_committed_mib"] == 0
    # query parameters of the wrong form
    assert d.request("GET", "/v1/events?limit=0")[0] == 422
    assert d.request("GET", "/v1/events?since=x")[0] == 422


def test_openapi_document_is_what_the_app_serves() -> None:
    from pyhv.hostd.cmd_host import openapi_document
    stored = Path(__file__).resolve().parents[2] / "docs" / "api" / "host.openapi.json"
    assert stored.read_text() == openapi_document(), \
        "regenerate: pyhv host openapi > docs/api/host.openapi.json"
    doc = json.loads(stored.read_text())
    assert "bearer" in json.dumps(doc["components"]["securitySchemes"]).lower()
    assert {"/v1/vms", "/v1/vms/{name}/start", "/v1/host", "/v1/events"} <= set(doc["paths"])


def test_the_served_document_equals_the_stored_one(daemon: Callable[..., Daemon]) -> None:
    d = daemon()
    stored = Path(__file__).resolve().parents[2] / "docs" / "api" / "host.openapi.json"
    assert d.ok("GET", "/openapi.json") == json.loads(stored.read_text())
    time.sleep(0)


def test_cpu_settings_admission_and_cgroups(daemon: Callable[..., Daemon],
                                            guests: GuestBuilder) -> None:
    """pyhv.sched wired in: reservations admitted per pinned CPU set, each VM in its own
    cgroup with the weight and limit pyhv.sched computes, vCPU threads pinned, the group
    gone when the VM ends."""
    from pyhv import sched
    from pyhv.hostd.cpu import vm_cpu
    from pyhv.hostd.models import VmDefinition
    from pyhv.sched.cgroup import cgroup_value
    try:
        fs = sched.detect()
    except sched.CgroupUnavailable as e:
        pytest.skip(str(e))
    d = daemon()
    counter = guests("counter")
    # both pinned to CPU 0: 60% + 50% of one CPU do not fit it, whatever the host
    r1 = define(d, "r1", counter, cpu_shares=2000, cpu_reservation=60, cpu_limit=90,
                pin=["0"])
    define(d, "r2", counter, cpu_reservation=50, pin=["0"])
    define(d, "plain", counter)
    pid = d.ok("POST", "/v1/vms/r1/start")["pid"]
    status, obj = d.request("POST", "/v1/vms/r2/start")
    assert status == 409 and "reservations do not fit CPU(s) 0" in obj["detail"], obj
    assert d.vm("r2")["state"] == "stopped"
    host = d.ok("GET", "/v1/host")
    assert host["cpu_reserved_pct"] == 60 and host["cpu_controller"] == fs.describe()

    info = d.ok("GET", "/v1/vms/r1/sched")
    group = Path(info["cgroup"])
    assert group.name == "r1" and group.parent.name.startswith("pyhv-hostd-")
    assert pid in [int(x) for x in (group / "cgroup.procs").read_text().split()]
    host_cpus = sched.HostCpus.detect()
    want = sched.weights([vm_cpu(VmDefinition.model_validate(r1["definition"]))],
                         host_cpus)["r1"]
    values = info["cgroup_values"]
    if fs.version == 1:
        assert values["cpu.shares"] == str(cgroup_value(fs, want))
        assert values["cpu.cfs_quota_us"] == "90000"
    else:
        assert values["cpu.weight"] == str(cgroup_value(fs, want))
        assert values["cpu.max"] == "90000 100000"
    # the vCPU thread is pinned to CPU 0 (pyhv run --pin, inside the VM process)
    allowed = [line.split(":", 1)[1].strip()
               for t in Path(f"/proc/{pid}/task").iterdir()
               for line in (t / "status").read_text().splitlines()
               if line.startswith("Cpus_allowed_list:")]
    assert "0" in allowed, allowed

    # a second VM joins: both are reweighed by pyhv.sched.weights over the two
    d.ok("POST", "/v1/vms/plain/start")
    defs = [VmDefinition.model_validate(d.vm(n)["definition"]) for n in ("r1", "plain")]
    both = sched.weights([vm_cpu(x) for x in defs], host_cpus)
    key = "cpu.shares" if fs.version == 1 else "cpu.weight"
    for name in ("r1", "plain"):
        got = d.ok("GET", f"/v1/vms/{name}/sched")["cgroup_values"][key]
        assert got == str(cgroup_value(fs, both[name])), (name, got, both)

    # ended: the groups go (and the daemon's parent group with the last one)
    d.ok("POST", "/v1/vms/r1/destroy")
    assert not group.exists()
    assert d.ok("GET", "/v1/vms/r1/sched")["cgroup"] is None
    assert d.ok("POST", "/v1/vms/r2/start")["state"] == "running"   # 50% fits now
    d.ok("POST", "/v1/vms/r2/destroy")
    d.ok("POST", "/v1/vms/plain/destroy")
    assert not group.parent.exists()
