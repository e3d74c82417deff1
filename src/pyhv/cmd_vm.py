"""`pyhv list | suspend | resume | shutdown | destroy VM` and `pyhv info VM`: virsh's verbs
on the control API of running VMs (pyhv.vmapi, through pyhv.vmclient).

VM is a name (a VM started with `pyhv run --name NAME`, found in the run directory,
pyhv.rundir) or the path of a control socket (`--api-sock PATH`). A VM that does not
exist, or whose process has died, is a clear one-line error (status 2).

    list               the live VMs in the run directory: name, state, engine, pid
    info VM [--json]   GET /machine
    suspend VM         PUT /state paused (returns once the vCPUs have stopped)
    resume VM          PUT /state running
    shutdown VM        PUT /actions shutdown (the ACPI power button)
    destroy VM         PUT /actions stop (hard stop)
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pyhv import rundir
from pyhv.vmclient import VmError, call

VERBS = ("list", "suspend", "resume", "shutdown", "destroy")


def add_arguments(p: argparse.ArgumentParser) -> None:
    verb = p.prog.split()[-1]
    p.set_defaults(_verb=verb)
    if verb == "list":
        p.add_argument("--json", action="store_true", help="print the list as JSON")
        return
    p.add_argument("vm", metavar="VM", help="a VM's name (pyhv run --name) or the path "
                                            "of its control socket (--api-sock)")


def main(args: argparse.Namespace) -> int:
    verb: str = args._verb
    if verb == "list":
        return list_vms(args.json)
    sock = rundir.socket_for(args.vm)
    if verb in ("suspend", "resume"):
        state = "paused" if verb == "suspend" else "running"
        call(sock, "PUT", "/state", {"state": state})
        print(f"VM {args.vm} {'suspended' if verb == 'suspend' else 'resumed'}")
    elif verb == "shutdown":
        out = call(sock, "PUT", "/actions", {"action": "shutdown"})
        print(f"VM {args.vm}: {out.get('result', 'shutting down')}")
    else:
        call(sock, "PUT", "/actions", {"action": "stop"})
        print(f"VM {args.vm} destroyed")
    return 0


def info(vm: str, as_json: bool) -> int:
    """`pyhv info VM`."""
    m = call(rundir.socket_for(vm), "GET", "/machine")
    if as_json:
        print(json.dumps(m, indent=2))
        return 0
    rows: list[tuple[str, Any]] = [
        ("Name", m.get("name") or "-"), ("State", m.get("state")), ("Engine", m.get("engine")),
        ("CPU(s)", m.get("cpus")), ("Memory", f"{m.get('memory_mib')} MiB"),
        ("Uptime", f"{m.get('uptime_s')} s"), ("PID", m.get("pid")),
        ("Guest", m.get("guest")), ("Socket", m.get("socket")),
        ("Devices", ", ".join(m.get("devices") or [])),
    ]
    for k, v in rows:
        print(f"{k + ':':<10} {v}")
    return 0


def list_vms(as_json: bool) -> int:
    d = rundir.run_dir(create=False)
    vms: list[dict[str, Any]] = []
    for name in rundir.live_names(d):
        sock = d / (name + rundir.SOCK_SUFFIX)
        pid = rundir.holder(d / (name + rundir.LOCK_SUFFIX))
        try:
            m = call(sock, "GET", "/machine", timeout=5.0)
            vms.append({"name": name, "state": m.get("state"), "engine": m.get("engine"),
                        "pid": m.get("pid", pid), "cpus": m.get("cpus"),
                        "memory_mib": m.get("memory_mib")})
        except VmError:
            vms.append({"name": name, "state": "unreachable", "engine": None, "pid": pid,
                        "cpus": None, "memory_mib": None})
    if as_json:
        print(json.dumps(vms, indent=2))
        return 0
    print(f"{'Name':<20} {'State':<12} {'Engine':<8} {'PID':>8}")
    for v in vms:
        print(f"{v['name']:<20} {v['state']:<12} {v['engine'] or '-':<8} {v['pid'] or '-':>8}")
    return 0
