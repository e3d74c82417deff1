"""`pyhv host serve | openapi`: run the host daemon; print its OpenAPI document.

    pyhv host serve [--state-dir DIR] [--listen HOST:PORT|none] [--socket PATH]
                    [--memory-capacity SIZE]
    pyhv host openapi            (the document docs/api/host.openapi.json holds)
    pyhv host plan --host SPEC ... [--window S] [--target PCT] [--json] [--apply]
                                 (consolidation: pyhv.hostd.cmd_plan)

The daemon runs in the foreground (a service manager or `&` puts it in the background);
SIGTERM or Ctrl-C ends it, and the VMs it started keep running.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from pyhv.hostd.statedir import StateDir, default_dir
from pyhv.units import parse_size

DEFAULT_LISTEN = "127.0.0.1:8086"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="host_verb", metavar="VERB", required=True)
    s = sub.add_parser("serve", help="run the host daemon (REST API, inventory, VMs)")
    s.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                   help="inventory, token, sockets and VM logs (default $PYHV_STATE_DIR, "
                        "else $XDG_STATE_HOME/pyhv, else ~/.local/state/pyhv)")
    s.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"the API's TCP address (default {DEFAULT_LISTEN}; port 0 picks a "
                        "free one, written to DIR/daemon.json; none: UNIX socket only)")
    s.add_argument("--socket", type=Path, default=None, metavar="PATH",
                   help="the API's UNIX socket (default DIR/api.sock)")
    s.add_argument("--memory-capacity", default=None, metavar="SIZE",
                   help="the memory VMs are admitted against (default: the host's RAM)")
    sub.add_parser("openapi", help="print the API's OpenAPI document (JSON)")
    from pyhv.hostd import cmd_plan
    cmd_plan.add_arguments(sub.add_parser(
        "plan", help="measure the VMs of one or more daemons and propose (--apply: carry "
                     "out) a consolidated placement"))


def openapi_document() -> str:
    """The app's OpenAPI document as stored in docs/api/host.openapi.json."""
    from pyhv.hostd.app import build_app
    from pyhv.hostd.inventory import Inventory
    from pyhv.hostd.manager import Manager
    with tempfile.TemporaryDirectory() as d:
        state = StateDir(Path(d))
        inv = Inventory(Path(d) / "x.db")
        try:
            app = build_app(Manager(state, inv, 1 << 30), "x" * 32)
            return json.dumps(app.openapi(), indent=2, sort_keys=True) + "\n"
        finally:
            inv.close()


def main(args: argparse.Namespace) -> int:
    if args.host_verb == "plan":
        from pyhv.hostd import cmd_plan
        return cmd_plan.main(args)
    if args.host_verb == "openapi":
        print(openapi_document(), end="")
        return 0
    from pyhv.hostd.server import parse_listen, serve
    capacity = (parse_size(args.memory_capacity, default_unit="M")
                if args.memory_capacity else None)
    state = StateDir(args.state_dir or default_dir())
    listen = parse_listen(args.listen)
    os.environ.pop("PYHV_RUN_DIR", None)     # the VMs' run directory is DIR/vms
    return serve(state, listen, args.socket, capacity)
