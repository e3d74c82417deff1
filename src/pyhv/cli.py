"""The `pyhv` command: a table of subcommands, in the manner of virsh and qemu-img.

Each subcommand lives in its own module, which provides `add_arguments(parser)` and
`main(args) -> int`; this file only dispatches. Modules are imported when their
subcommand runs, so `pyhv img` works on a host without /dev/kvm or unicorn.

Exit statuses: 0 success; 2 bad input or host problem (one `pyhv: ...` line on stderr);
the guest-run statuses are documented in `pyhv.runner` (odd values come from the guest's
debug-exit port, pyhv's own are even, but for 141, a closed stdout as with SIGPIPE).
A subcommand may keep another tool's statuses: `pyhv img` exits as qemu-img does (its
module's USAGE_STATUS for a bad command line; see pyhv.disk.imgcli). A former subcommand
name (`image`, now `guest`) is refused as argparse refuses any unknown name, with a hint
to the new one.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from pyhv import __version__
from pyhv.errors import PyhvError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("pyhv.cmd_run", "boot a guest and attach its serial console"),
    "info": ("pyhv.cmd_info", "report what this host offers and which engine pyhv picks"),
    "img": ("pyhv.disk.imgcli", "create, inspect and convert disk images (qemu-img verbs)"),
    "guest": ("pyhv.cmd_guest", "fetch and list guest images (Debian's Linux + busybox)"),
    "popek-goldberg": ("pyhv.cmd_popek", "probe which sensitive x86 instructions trap here"),
    "bench": ("pyhv.cmd_bench", "measure trap, bt, pv, kvm, emu, QEMU TCG and native side by side"),
    "list": ("pyhv.cmd_vm", "list the running VMs (pyhv run --name)"),
    "suspend": ("pyhv.cmd_vm", "pause a running VM (its control API)"),
    "resume": ("pyhv.cmd_vm", "resume a paused VM"),
    "shutdown": ("pyhv.cmd_vm", "press a VM's ACPI power button"),
    "destroy": ("pyhv.cmd_vm", "stop a VM at once"),
    "host": ("pyhv.hostd.cmd_host", "the host daemon: `pyhv host serve` (REST API, VMs)"),
    "vm": ("pyhv.hostd.cmd_vm", "manage the host daemon's VMs (virsh's verbs)"),
    "migrate": ("pyhv.cmd_migrate", "move a running VM to another pyhv (live, pre-copy)"),
    "snapshot-create": ("pyhv.cmd_snapshot", "snapshot a running VM (RAM, devices, vCPUs)"),
    "snapshot-list": ("pyhv.cmd_snapshot", "list a VM's snapshots (the tree)"),
    "snapshot-revert": ("pyhv.cmd_snapshot", "put a running VM back to a snapshot"),
    "snapshot-delete": ("pyhv.cmd_snapshot", "delete one of a VM's snapshots"),
    "snapshot-verify": ("pyhv.cmd_snapshot_verify", "check a snapshot directory in full"),
}


# Former subcommand names: argparse refuses them as usual, with a hint to the new name.
RENAMED = {"image": "guest"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        for old, new in RENAMED.items():
            if f"invalid choice: '{old}'" in message:
                message += f" (`pyhv {old}` is now `pyhv {new}`)"
        super().error(message)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with `only`, just that subcommand's module is imported (the
    others stay listed), so `pyhv img` does not pay for importing the run loop."""
    parser = _Parser(prog="pyhv", description="A hypervisor written in Python.")
    parser.add_argument("--version", action="version", version=f"pyhv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if only is not None and name != only:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue  # a subcommand whose module is not built yet stays listed, unusable
        module.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    first = next((w for w in words if not w.startswith("-")), None)
    parser = build_parser(first if first in SUBCOMMANDS else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        if e.code == 2 and first in SUBCOMMANDS:  # argparse's usage error
            module = sys.modules.get(SUBCOMMANDS[first][0])
            return int(getattr(module, "USAGE_STATUS", 2))
        raise
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    try:
        module = importlib.import_module(args._module)
        status: int = module.main(args)
        return status
    except PyhvError as e:
        print(f"pyhv: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("pyhv: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
