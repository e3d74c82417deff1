"""`pyhv migrate VM tcp:HOST:PORT [--max-downtime MS] [--bandwidth MBPS]`: move a running
VM to a destination started with `pyhv run --incoming tcp:ADDR:PORT` (pyhv.migration).

VM is a name or a control socket path, as for `pyhv info`. The command asks the VM's
control API to start the migration (PUT /migrate), then polls its progress (GET
/migrate) and shows a progress bar per round (pyhv.migration.report) until it is over:
status 0 and the report (total time, downtime, bytes, rounds; `--json`: the progress
dict) when the VM runs on the destination; a failure is one `pyhv:` line, status 2, and
the VM keeps running on the source.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from pyhv import rundir
from pyhv.migration.report import ProgressView, final_lines
from pyhv.vmclient import VmError, call

POLL_S = 0.05
LIMIT_S = 3600.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("vm", metavar="VM", help="a VM's name (pyhv run --name) or the path of "
                                            "its control socket (--api-sock)")
    p.add_argument("uri", metavar="tcp:HOST:PORT",
                   help="the destination (pyhv run --incoming tcp:ADDR:PORT)")
    p.add_argument("--max-downtime", type=float, default=None, metavar="MS",
                   help="the pause the guest may see at the switch-over (default 50 ms): "
                        "rounds go on while the rest would take longer at the measured "
                        "bandwidth")
    p.add_argument("--bandwidth", type=float, default=None, metavar="MBPS",
                   help="limit the stream to MBPS x 10^6 bytes per second (default: none)")
    p.add_argument("--max-rounds", type=int, default=None, metavar="N",
                   help="switch over after at most N rounds (default 30)")
    p.add_argument("--no-auto-converge", action="store_true",
                   help="do not slow the guest's vCPUs when it dirties RAM faster than "
                        "the link carries it")
    p.add_argument("--copy-storage", action="store_true",
                   help="mirror the disks over the same connection to the destination's "
                        "own images of the same sizes (docs/migration.md)")
    p.add_argument("--json", action="store_true", help="print the final report as JSON")


def main(args: argparse.Namespace) -> int:
    sock = rundir.socket_for(args.vm)
    body: dict[str, object] = {"uri": args.uri}
    if args.max_downtime is not None:
        body["max_downtime_ms"] = args.max_downtime
    if args.bandwidth is not None:
        body["bandwidth_mbps"] = args.bandwidth
    if args.max_rounds is not None:
        body["max_rounds"] = args.max_rounds
    if args.no_auto_converge:
        body["auto_converge"] = False
    if args.copy_storage:
        body["copy_storage"] = True
    call(sock, "PUT", "/migrate", body)
    deadline = time.monotonic() + LIMIT_S
    p: dict[str, object] = {}
    with ProgressView(enabled=not args.json and sys.stderr.isatty()) as view:
        while time.monotonic() < deadline:
            try:
                p = call(sock, "GET", "/migrate")
            except VmError as e:
                if p.get("status") == "switchover":
                    raise VmError(f"the source VM ended during the switch-over ({e}); "
                                  "see the destination") from None
                raise
            view.update(p)
            if p.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(POLL_S)
    if p.get("status") != "completed":
        raise VmError(f"the migration {p.get('status', 'did not end')}: {p.get('error')}; "
                      "the VM keeps running on the source")
    if args.json:
        print(json.dumps(p, indent=2))
    else:
        print("\n".join(final_lines(p)))
    return 0
