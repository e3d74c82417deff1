"""`pyhv vm VERB`: the host daemon's VMs in virsh's words, through its REST API.

    define [FILE.json | --name N --kernel K ...]   undefine NAME
    start NAME   shutdown NAME   destroy NAME   suspend NAME   resume NAME
    list [--all] [--json]    dominfo NAME [--json]    schedinfo NAME [--json]
    console NAME             events [--vm NAME] [--json]    nodeinfo [--json]
    snapshot-create NAME SNAP   snapshot-list NAME [--json]
    snapshot-revert NAME SNAP   snapshot-delete NAME SNAP
    migrate NAME --to http://HOST:PORT [--to-token-file FILE] [--max-downtime MS]

Each verb finds the daemon through --state-dir (its daemon.json, api.sock and token),
or --socket / --url with --token-file (pyhv.hostd.client). Errors are the daemon's one
line (`pyhv: ...`, status 2). `console` attaches the terminal to the VM's serial console
over the daemon's websocket; Ctrl-] leaves (as virsh console); on a pipe, input is sent
as it comes and the command ends when the console closes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import termios
import threading
import time
import tty
from pathlib import Path
from typing import Any

from pyhv.errors import ConfigError
from pyhv.hostd.client import Client, DaemonError
from pyhv.units import parse_size

VERBS = ("define", "undefine", "start", "shutdown", "destroy", "suspend", "resume", "list",
         "dominfo", "schedinfo", "console", "events", "nodeinfo", "snapshot-create",
         "snapshot-list", "snapshot-revert", "snapshot-delete", "migrate")
ESCAPE = 0x1D


def _connection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                   help="the daemon's state directory (default as `pyhv host serve`)")
    p.add_argument("--socket", type=Path, default=None, metavar="PATH",
                   help="the daemon's UNIX socket (default: from the state directory)")
    p.add_argument("--url", default=None, metavar="http://HOST:PORT",
                   help="reach the daemon over TCP instead")
    p.add_argument("--token-file", type=Path, default=None, metavar="FILE",
                   help="the API token (default DIR/token)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="vm_verb", metavar="VERB", required=True)
    helps = {
        "define": "define a VM (a JSON definition file, or options)",
        "undefine": "remove a stopped VM's definition", "start": "start a defined VM",
        "shutdown": "press the VM's ACPI power button", "destroy": "stop the VM at once",
        "suspend": "pause the VM", "resume": "resume a paused VM",
        "list": "list the VMs (running ones; --all: every one)",
        "dominfo": "a VM's definition and state", "schedinfo": "a VM's CPU settings",
        "console": "attach to the VM's serial console (Ctrl-] leaves)",
        "events": "the daemon's event log", "nodeinfo": "the host's statistics",
        "snapshot-create": "snapshot a running VM", "snapshot-list": "a VM's snapshots",
        "snapshot-revert": "put a VM back to a snapshot",
        "snapshot-delete": "delete a snapshot",
        "migrate": "live-migrate a running VM to another pyhv host daemon",
    }
    for verb in VERBS:
        v = sub.add_parser(verb, help=helps[verb], description=helps[verb])
        _connection_options(v)
        if verb in ("list", "dominfo", "schedinfo", "events", "nodeinfo", "snapshot-list",
                    "migrate"):
            v.add_argument("--json", action="store_true", help="print JSON")
        if verb == "list":
            v.add_argument("--all", action="store_true", help="stopped VMs too")
        elif verb == "events":
            v.add_argument("--vm", default=None, metavar="NAME")
            v.add_argument("--limit", type=int, default=100)
        elif verb == "define":
            _define_options(v)
        elif verb != "nodeinfo":
            v.add_argument("name", metavar="NAME")
        if verb in ("snapshot-create", "snapshot-revert", "snapshot-delete"):
            v.add_argument("snapshot", metavar="SNAP")
        elif verb == "migrate":
            v.add_argument("--to", required=True, metavar="http://HOST:PORT",
                           help="the destination daemon (its TCP address)")
            v.add_argument("--to-token-file", type=Path, default=None, metavar="FILE",
                           help="the destination's token (default: this daemon's token, "
                                "as when both share a state directory's token)")
            v.add_argument("--max-downtime", type=float, default=None, metavar="MS")
            v.add_argument("--bandwidth", type=float, default=None, metavar="MBPS")


def _define_options(v: argparse.ArgumentParser) -> None:
    v.add_argument("file", nargs="?", type=Path, metavar="FILE.json",
                   help="a JSON definition (docs/host-daemon.md; '-' for stdin)")
    v.add_argument("--name")
    v.add_argument("--kernel", type=Path)
    v.add_argument("--image", choices=("linux", "debian"))
    v.add_argument("--initrd", type=Path)
    v.add_argument("--append", dest="cmdline")
    v.add_argument("--command")
    v.add_argument("--mem", default=None, metavar="SIZE", help="guest RAM (default 128M)")
    v.add_argument("--cpus", type=int, default=None)
    v.add_argument("--engine", default=None)
    v.add_argument("--disk", action="append", default=[])
    v.add_argument("--net", action="append", default=[])
    v.add_argument("--cpu-shares", default=None, metavar="N|low|normal|high",
                   help="CPU weight (ESX's low/normal/high: 500/1000/2000 per vCPU)")
    v.add_argument("--cpu-reservation", default=None, metavar="PCT",
                   help="CPU guaranteed under contention, percent of one host CPU")
    v.add_argument("--cpu-limit", default=None, metavar="PCT",
                   help="the most CPU it may use, percent of one host CPU")
    v.add_argument("--pin", action="append", default=[], metavar="CPUS|VCPU=CPUS",
                   help="host CPUs for every vCPU (0, 0-1), or VCPU=CPUS for each vCPU")


def _definition(args: argparse.Namespace) -> dict[str, Any]:
    if args.file is not None:
        if args.name is not None:
            raise ConfigError("give a definition file or options, not both")
        try:
            text = sys.stdin.read() if str(args.file) == "-" else args.file.read_text()
            d = json.loads(text)
        except OSError as e:
            raise ConfigError(f"{args.file}: {e.strerror or e}") from None
        except ValueError as e:
            raise ConfigError(f"{args.file}: not JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{args.file}: the definition must be a JSON object")
        return d
    if args.name is None:
        raise ConfigError("define needs a definition file or --name (and --kernel ...)")
    d = {"name": args.name}
    for key in ("kernel", "initrd"):
        if getattr(args, key) is not None:
            d[key] = str(getattr(args, key).absolute())
    for key in ("image", "cmdline", "command", "engine"):
        if getattr(args, key) is not None:
            d[key] = getattr(args, key)
    opt: dict[str, Any] = {}
    if args.mem is not None:
        opt["memory_mib"] = parse_size(args.mem, default_unit="M") >> 20
    if args.cpus is not None:
        opt["vcpus"] = args.cpus
    if args.disk:
        opt["disks"] = args.disk
    if args.net:
        opt["networks"] = args.net
    from pyhv.sched.settings import parse_percent, parse_shares
    if args.cpu_shares is not None:
        opt["cpu_shares"] = parse_shares(args.cpu_shares, args.cpus or 1)
    for key, flag in (("cpu_reservation", "--cpu-reservation"), ("cpu_limit", "--cpu-limit")):
        if getattr(args, key) is not None:
            opt[key] = parse_percent(getattr(args, key), flag)
    if args.pin:
        opt["pin"] = _pins(args.pin)
    return {**d, **opt}


def _pins(words: list[str]) -> list[str]:
    """`--pin CPUS` (every vCPU) or `--pin VCPU=CPUS` for each vCPU -> the pin list."""
    if all("=" not in w for w in words):
        if len(words) > 1:
            raise ConfigError("--pin: one CPU list for all vCPUs, or VCPU=CPUS for each")
        return words
    per: dict[int, str] = {}
    for w in words:
        idx, eq, cpus = w.partition("=")
        if not eq or not idx.isdigit() or int(idx) in per:
            raise ConfigError(f"--pin {w!r}: expected VCPU=CPUS, each vCPU once")
        per[int(idx)] = cpus
    if sorted(per) != list(range(len(per))):
        raise ConfigError(f"--pin: vCPUs {sorted(per)} are not 0..{len(per) - 1}")
    return [per[i] for i in range(len(per))]


def main(args: argparse.Namespace) -> int:
    client = Client.find(args.state_dir, args.socket, args.url, args.token_file)
    verb: str = args.vm_verb
    if verb == "define":
        vm = client.call("POST", "/v1/vms", _definition(args))
        print(f"Domain '{vm['name']}' defined")
    elif verb == "undefine":
        client.call("DELETE", f"/v1/vms/{args.name}")
        print(f"Domain '{args.name}' has been undefined")
    elif verb in ("start", "shutdown", "destroy", "suspend", "resume"):
        route = {"suspend": "pause"}.get(verb, verb)
        client.call("POST", f"/v1/vms/{args.name}/{route}")
        said = {"start": "started", "shutdown": "is being shutdown",
                "destroy": "destroyed", "suspend": "suspended", "resume": "resumed"}[verb]
        print(f"Domain '{args.name}' {said}")
    elif verb == "list":
        vms = client.call("GET", "/v1/vms")["vms"]
        if not args.all:
            vms = [v for v in vms if v["state"] in ("starting", "running", "paused")]
        if args.json:
            print(json.dumps(vms, indent=2))
        else:
            _table(vms)
    elif verb == "dominfo":
        vm = client.call("GET", f"/v1/vms/{args.name}")
        print(json.dumps(vm, indent=2) if args.json else _dominfo(vm))
    elif verb == "schedinfo":
        info = client.call("GET", f"/v1/vms/{args.name}/sched")
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print(_schedinfo(info))
    elif verb == "events":
        q = f"?limit={args.limit}" + (f"&vm={args.vm}" if args.vm else "")
        events = client.call("GET", f"/v1/events{q}")["events"]
        if args.json:
            print(json.dumps(events, indent=2))
        else:
            for e in events:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"]))
                print(f"{when}  {e['vm'] or '-':<16} {e['kind']:<13} {e['message']}")
    elif verb == "nodeinfo":
        h = client.call("GET", "/v1/host")
        if args.json:
            print(json.dumps(h, indent=2))
        else:
            for k, v in h.items():
                print(f"{k + ':':<22} {v}")
    elif verb == "console":
        return console(client, args.name)
    elif verb.startswith("snapshot-"):
        return _snapshot(client, verb, args)
    elif verb == "migrate":
        return _migrate(client, args)
    return 0


def _snapshot(client: Client, verb: str, args: argparse.Namespace) -> int:
    base = f"/v1/vms/{args.name}/snapshots"
    if verb == "snapshot-list":
        snaps = client.call("GET", base)
        if args.json:
            print(json.dumps(snaps, indent=2))
        else:
            items = snaps.get("snapshots", []) if isinstance(snaps, dict) else snaps
            print(f"{'Name':<24} {'Parent':<24} {'Created':<20} Current")
            for sn in items:
                when = time.strftime("%Y-%m-%d %H:%M:%S",
                                     time.localtime(float(sn.get("created") or 0)))
                print(f"{sn['name']:<24} {sn.get('parent') or '-':<24} {when:<20} "
                      f"{'yes' if sn.get('current') else ''}")
        return 0
    if verb == "snapshot-create":
        client.call("POST", base, {"name": args.snapshot}, timeout=180)
        print(f"Domain snapshot {args.snapshot} created")
    elif verb == "snapshot-revert":
        client.call("POST", f"{base}/{args.snapshot}/revert", timeout=180)
        print(f"Domain '{args.name}' reverted to snapshot {args.snapshot}")
    else:
        client.call("DELETE", f"{base}/{args.snapshot}", timeout=180)
        print(f"Domain snapshot {args.snapshot} deleted")
    return 0


def _migrate(client: Client, args: argparse.Namespace) -> int:
    from pyhv.hostd.statedir import read_token
    token = read_token(args.to_token_file) if args.to_token_file else client.token
    body: dict[str, Any] = {"to": args.to, "token": token}
    if args.max_downtime is not None:
        body["max_downtime_ms"] = args.max_downtime
    if args.bandwidth is not None:
        body["bandwidth_mbps"] = args.bandwidth
    report = client.call("POST", f"/v1/vms/{args.name}/migrate", body, timeout=360)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"Domain '{args.name}' migrated to {args.to} (downtime "
              f"{report.get('downtime_ms')} ms, {report.get('rounds')} rounds, "
              f"{report.get('bytes')} bytes)")
    return 0


def _table(vms: list[dict[str, Any]]) -> None:
    rows = [(str(v["pid"] or "-"), v["name"], v["state"]) for v in vms]
    w = max([4] + [len(r[1]) for r in rows])
    print(f" {'Id':<8} {'Name':<{w}}   State")
    print("-" * (w + 22))
    for pid, name, state in rows:
        print(f" {pid:<8} {name:<{w}}   {state}")


def _schedinfo(info: dict[str, Any]) -> str:
    rows: list[tuple[str, Any]] = [
        ("cpu_shares", info["cpu_shares"]),
        ("cpu_reservation", f"{info['cpu_reservation']:g}%"),
        ("cpu_limit", "-" if info["cpu_limit"] is None else f"{info['cpu_limit']:g}%"),
        ("pin", "-" if info["pin"] is None else " ".join(
            info["pin"] if len(info["pin"]) == 1 else
            [f"{i}={c}" for i, c in enumerate(info["pin"])])),
        ("controller", info["controller"]), ("cgroup", info["cgroup"] or "-")]
    rows += [(k, v) for k, v in (info["cgroup_values"] or {}).items()]
    if info["usage_ns"] is not None:
        rows.append(("cpu_time", f"{info['usage_ns'] / 1e9:.3f} s"))
    return "\n".join(f"{k:<18}: {v}" for k, v in rows)


def _dominfo(vm: dict[str, Any]) -> str:
    d = vm["definition"]
    boot = d["kernel"] or f"pyhv image {d['image'] or 'linux'}"
    rows = [("Id", vm["pid"] or "-"), ("Name", vm["name"]), ("UUID", vm["uuid"]),
            ("State", vm["state"]), ("CPU(s)", d["vcpus"]),
            ("Memory", f"{d['memory_mib']} MiB"), ("Engine", d["engine"]),
            ("Boot", boot), ("Disks", ", ".join(d["disks"]) or "-"),
            ("Networks", ", ".join(d["networks"]) or "-"),
            ("Last exit", vm["last_exit"] or "-")]
    return "\n".join(f"{k + ':':<15} {v}" for k, v in rows)


def _attach(ws: Any, name: str) -> None:
    """stdin -> the websocket (a thread), the websocket -> stdout, until it closes."""
    from websockets.exceptions import ConnectionClosed
    fd = sys.stdin.fileno()
    is_tty = os.isatty(fd)
    saved = termios.tcgetattr(fd) if is_tty else None
    if is_tty:
        sys.stderr.write(f"Connected to domain '{name}'\r\nEscape character is ^]\r\n")
        tty.setraw(fd, termios.TCSANOW)
    stop = threading.Event()

    def pump_input() -> None:
        while not stop.is_set():
            try:
                data = os.read(fd, 4096)
            except OSError:
                return
            if not data:
                return                                  # end of input: keep reading
            if is_tty and ESCAPE in data:
                head = data[:data.index(ESCAPE)]
                with contextlib.suppress(ConnectionClosed):
                    if head:
                        ws.send(head)
                    ws.close()
                return
            try:
                ws.send(data)
            except ConnectionClosed:
                return

    threading.Thread(target=pump_input, name="pyhv-console-in", daemon=True).start()
    out = sys.stdout.buffer
    try:
        for msg in ws:
            out.write(msg if isinstance(msg, bytes) else msg.encode())
            out.flush()
    except ConnectionClosed:
        pass
    finally:
        stop.set()
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
            sys.stderr.write("\n")


def console(client: Client, name: str) -> int:
    """Attach stdin/stdout to the VM's console websocket until it closes or Ctrl-]."""
    client.call("GET", f"/v1/vms/{name}")              # a clear error for an unknown VM
    with client.websocket(f"/v1/vms/{name}/console") as ws:
        _attach(ws, name)
    code = ws.close_code
    if code is not None and code >= 4000:
        raise DaemonError(ws.close_reason or f"the console closed ({code})")
    return 0
