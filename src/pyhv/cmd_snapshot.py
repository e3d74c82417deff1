"""`pyhv snapshot-create | snapshot-list | snapshot-revert | snapshot-delete VM [NAME]`:
virsh's snapshot verbs on a running VM's control API (pyhv.vmapi: /snapshots,
/snapshot/create|revert|delete, /snapshot/progress).

VM is a name (`pyhv run --name`) or a control socket path, as for `pyhv info VM`.
snapshot-create waits for the VM to write the snapshot; while it does, a progress bar
(rich, on stderr, when stderr is a terminal) follows the bytes of RAM written, polled
from /snapshot/progress. Errors (no such VM or snapshot, a name taken, a damaged
snapshot) are one `pyhv:` line, status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from typing import Any

from pyhv import rundir
from pyhv.errors import PyhvError
from pyhv.vmclient import VmError, call

LONG_TIMEOUT_S = 1800.0     # writing or reading a large guest's RAM
POLL_S = 0.1


def add_arguments(p: argparse.ArgumentParser) -> None:
    verb = p.prog.split()[-1]
    p.set_defaults(_verb=verb)
    p.add_argument("vm", metavar="VM", help="a VM's name (pyhv run --name) or the path "
                                            "of its control socket (--api-sock)")
    if verb == "snapshot-list":
        p.add_argument("--json", action="store_true", help="print the list as JSON")
    else:
        p.add_argument("name", metavar="NAME", help="the snapshot's name (1-64 of "
                                                    "A-Za-z0-9._-)")


def main(args: argparse.Namespace) -> int:
    verb: str = args._verb
    sock = rundir.socket_for(args.vm)
    if verb == "snapshot-list":
        return _list(sock, args.vm, args.json)
    if verb == "snapshot-create":
        out = _with_progress(sock, args.name)
        mib = out.get("ram_bytes_stored", 0) / (1 << 20)
        print(f"Domain snapshot {args.name} created ({out.get('seconds')} s, "
              f"{mib:.1f} MiB of RAM stored, in {out.get('path')})")
    elif verb == "snapshot-revert":
        call(sock, "PUT", "/snapshot/revert", {"name": args.name}, timeout=LONG_TIMEOUT_S)
        print(f"Domain {args.vm} reverted to snapshot {args.name}")
    else:
        call(sock, "PUT", "/snapshot/delete", {"name": args.name})
        print(f"Domain snapshot {args.name} deleted")
    return 0


def _list(sock: Any, vm: str, as_json: bool) -> int:
    out = call(sock, "GET", "/snapshots")
    snaps = out.get("snapshots", [])
    if as_json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'Name':<24} {'Creation Time':<30} {'Parent':<24} {'Engine':<7} Current")
    for s in snaps:
        if "problem" in s:
            print(f"{s['name']:<24} (unreadable: {s['problem']})")
            continue
        print(f"{s['name']:<24} {s['created']:<30} {s['parent'] or '-':<24} "
              f"{s['engine']:<7} {'yes' if s.get('current') else ''}")
    return 0


def _with_progress(sock: Any, name: str) -> dict[str, Any]:
    """PUT /snapshot/create on a thread; meanwhile show /snapshot/progress."""
    result: dict[str, Any] = {}
    error: list[BaseException] = []

    def create() -> None:
        try:
            result.update(call(sock, "PUT", "/snapshot/create", {"name": name},
                               timeout=LONG_TIMEOUT_S))
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            error.append(e)
    t = threading.Thread(target=create, name="snapshot-create", daemon=True)
    t.start()
    if sys.stderr.isatty():
        _show_progress(sock, name, t)
    t.join()
    if error:
        raise error[0]
    return result


def _show_progress(sock: Any, name: str, worker: threading.Thread) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
    with Progress("[progress.description]{task.description}", BarColumn(),
                  DownloadColumn(), TransferSpeedColumn(),
                  console=Console(file=sys.stderr), transient=True) as bar:
        task = bar.add_task(f"snapshot {name}: RAM", total=None)
        while worker.is_alive():
            try:
                p = call(sock, "GET", "/snapshot/progress", timeout=5.0)
            except (VmError, PyhvError):
                break
            if p.get("op") == "create" and p.get("name") == name:
                bar.update(task, completed=p.get("done_bytes", 0),
                           total=p.get("total_bytes"))
            worker.join(POLL_S)
