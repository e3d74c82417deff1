"""`pyhv host plan`: consolidate the VMs of one or more host daemons (pyhv.hostd.plan).

    pyhv host plan --host SPEC [--host SPEC ...] [--window S] [--target PCT]
                   [--json] [--apply]

SPEC is a daemon's state directory (its daemon.json gives its TCP address, DIR/token its
token) or `http://HOST:PORT,token-file=FILE`; either may end with `,cpus=N` (the host's
CPU capacity, 100 x N percent; default the daemon's own, 100 x the CPUs it may use) and
`,mem=SIZE` (default the daemon's memory capacity). The hosts are measured one after
the other (`GET /v1/loads?window=S` on each: every running VM's CPU use over the window,
percent of one host CPU, and its memory), planned (first-fit decreasing onto the hosts
in the order given, each at most --target percent busy; then spread evenly over the
hosts that stay in use, unless --no-balance), and printed as a table (rich)
or, with --json, as {"measured": ..., "plan": ...}. --apply then carries out the moves,
one at a time, by live migration between the daemons (`POST /v1/vms/NAME/migrate` on
the source, with the destination's address and token); a move that fails is reported
and the others go on (status 1 if any failed).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyhv.errors import ConfigError
from pyhv.hostd.client import Client, DaemonError
from pyhv.hostd.plan import Capacity, Load, Plan, plan
from pyhv.hostd.statedir import StateDir, read_token
from pyhv.units import parse_size

MIB = 1 << 20


@dataclass
class HostSpec:
    url: str
    token: str
    cpus: float | None = None
    memory_mib: int | None = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", action="append", required=True, metavar="SPEC",
                   help="a daemon: its state directory, or http://HOST:PORT,token-file=F; "
                        "optionally ,cpus=N ,mem=SIZE (repeat, in fill order)")
    p.add_argument("--window", type=float, default=5.0, metavar="S",
                   help="the measuring window on each host (default 5 s)")
    p.add_argument("--target", type=float, default=80.0, metavar="PCT",
                   help="the highest planned CPU use of a host, percent of its capacity "
                        "(default 80: 20 %% headroom)")
    p.add_argument("--no-balance", action="store_true",
                   help="plain first-fit decreasing (fill the first hosts to the target)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--apply", action="store_true",
                   help="carry out the moves (live migration between the daemons)")


def parse_spec(spec: str) -> HostSpec:
    first, *opts = spec.split(",")
    kv: dict[str, str] = {}
    for o in opts:
        key, eq, value = o.partition("=")
        if not eq or key not in ("token-file", "cpus", "mem"):
            raise ConfigError(f"--host {spec!r}: unknown option {o!r} (token-file=, cpus=, "
                              "mem=)")
        kv[key] = value
    if first.startswith("http://"):
        if "token-file" not in kv:
            raise ConfigError(f"--host {spec!r}: an address needs ,token-file=FILE")
        url, token = first.rstrip("/"), read_token(Path(kv["token-file"]))
    else:
        state = StateDir(Path(first))
        try:
            info = json.loads(state.info_file.read_text())
            listen = str(info["listen"])
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"--host {first}: no running daemon with a TCP address "
                              "there (DIR/daemon.json)") from None
        url = f"http://{listen}"
        token = read_token(Path(kv["token-file"]) if "token-file" in kv
                           else state.token_file)
    try:
        cpus = float(kv["cpus"]) if "cpus" in kv else None
    except ValueError:
        raise ConfigError(f"--host {spec!r}: cpus= wants a number") from None
    if cpus is not None and cpus <= 0:
        raise ConfigError(f"--host {spec!r}: cpus= must be positive")
    mem = parse_size(kv["mem"], default_unit="M") // MIB if "mem" in kv else None
    return HostSpec(url, token, cpus, mem)


def measure(specs: list[HostSpec], window: float
            ) -> tuple[list[Load], list[Capacity]]:
    loads: list[Load] = []
    caps: list[Capacity] = []
    for h in specs:
        m = Client(h.token, None, h.url).call("GET", f"/v1/loads?window={window:g}",
                                              timeout=window + 60)
        caps.append(Capacity(h.url, h.cpus * 100 if h.cpus is not None
                             else float(m["cpu_capacity_pct"]),
                             h.memory_mib if h.memory_mib is not None
                             else int(m["memory_capacity_mib"])))
        for v in m["vms"]:
            if v["cpu_pct"] is not None:
                loads.append(Load(v["name"], h.url, float(v["cpu_pct"]),
                                  int(v["memory_mib"])))
    return loads, caps


def table(p: Plan, loads: list[Load], caps: list[Capacity]) -> None:
    from rich.console import Console
    from rich.table import Table
    doc: Any = p.to_json(loads, caps)
    t = Table(title=f"measured loads -> plan (first-fit decreasing, balanced; "
                    f"target {p.target_pct:g} %)")
    for col in ("VM", "CPU %", "MiB", "from", "to"):
        t.add_column(col, justify="right" if col in ("CPU %", "MiB") else "left")
    for v in sorted(doc["vms"], key=lambda x: (x["from"], x["vm"])):
        t.add_row(v["vm"], f"{v['cpu_pct']:.1f}", str(v["memory_mib"]), v["from"],
                  v["to"] or "(nowhere)")
    h = Table(title="hosts")
    for col in ("host", "capacity %", "VMs before", "busy before", "VMs planned",
                "busy planned", "MiB planned"):
        h.add_column(col, justify="left" if col == "host" else "right")
    for row in doc["hosts"]:
        before = sum(1 for v in doc["vms"] if v["from"] == row["host"])
        h.add_row(row["host"], f"{row['cpu_capacity_pct']:g}", str(before),
                  f"{row['utilisation_before_pct']:.1f} %", str(len(row["vms"])),
                  f"{row['utilisation_planned_pct']:.1f} %",
                  str(row["memory_planned_mib"]))
    con = Console(width=110)
    con.print(t)
    con.print(h)
    con.print(f"{len(p.moves)} move(s); hosts in use {len(p.hosts_used())} of {len(caps)}"
              + (f"; fit nowhere: {', '.join(p.unplaced)}" if p.unplaced else ""))


def main(args: argparse.Namespace) -> int:
    specs = [parse_spec(s) for s in args.host]
    if not 0 < args.target <= 100:
        raise ConfigError(f"--target {args.target}: must be in (0, 100]")
    loads, caps = measure(specs, args.window)
    p = plan(loads, caps, args.target, balance=not args.no_balance)
    if args.json:
        print(json.dumps({"measured": {
            "window_s": args.window,
            "loads": [vars(ld) for ld in loads],
            "hosts": [vars(c) for c in caps]}, "plan": p.to_json(loads, caps)}, indent=2))
    else:
        table(p, loads, caps)
    if not args.apply:
        return 0
    tokens = {s.url: s.token for s in specs}
    failed = 0
    for vm, src, dst in p.moves:
        try:
            r = Client(tokens[src], None, src).call(
                "POST", f"/v1/vms/{vm}/migrate", {"to": dst, "token": tokens[dst]},
                timeout=360)
            downtime = float(r.get("downtime_ms") or 0)
            print(f"moved {vm}: {src} -> {dst} (downtime {downtime:.1f} ms)",
                  file=sys.stderr if args.json else sys.stdout)
        except DaemonError as e:
            failed += 1
            print(f"pyhv: moving {vm} {src} -> {dst} failed: {e}", file=sys.stderr)
    return 1 if failed else 0
