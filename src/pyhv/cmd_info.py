"""`pyhv info`: what this host offers for virtualization (the seed's exercise 1); with a
VM (a name or a control socket), that running VM instead (pyhv.cmd_vm)."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from pyhv.host import probe_host

KEY_CAPS = ("KVM_CAP_IRQCHIP", "KVM_CAP_USER_MEMORY", "KVM_CAP_SET_TSS_ADDR", "KVM_CAP_PIT2",
            "KVM_CAP_NR_VCPUS", "KVM_CAP_MAX_VCPUS", "KVM_CAP_NR_MEMSLOTS",
            "KVM_CAP_VCPU_EVENTS", "KVM_CAP_XSAVE", "KVM_CAP_IMMEDIATE_EXIT")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("vm", nargs="?", metavar="VM", default=None,
                   help="a running VM (its --name or control socket): show it instead")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--kvm-device", default="/dev/kvm", help="path of the KVM device node")


def main(args: argparse.Namespace) -> int:
    if args.vm is not None:
        from pyhv.cmd_vm import info
        return info(args.vm, args.json)
    r = probe_host(args.kvm_device)
    if args.json:
        print(json.dumps(r.to_dict(), indent=2))
        return 0
    c = Console(highlight=False)
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("CPU", f"{r.cpu_model} ({r.machine}, {r.pcpus} pCPUs)")
    t.add_row("CPU flags", " ".join(f"{k}={'yes' if v else 'no'}" for k, v in r.cpu_flags.items()))
    t.add_row("KVM modules", ", ".join(r.kvm_modules) or "none loaded")
    t.add_row("/dev/kvm", "usable" if r.kvm_usable else f"not usable: {r.kvm_error}")
    if r.kvm_usable:
        t.add_row("KVM API", str(r.kvm_api_version))
        t.add_row("capabilities", ", ".join(
            f"{k.removeprefix('KVM_CAP_')}={r.kvm_capabilities.get(k, 0)}" for k in KEY_CAPS))
    t.add_row("virtualization", f"{r.kind}: {r.kind_reason}")
    t.add_row("UMIP", "yes" if r.umip else "no")
    t.add_row("unicorn", r.unicorn or f"missing: {r.unicorn_error}")
    t.add_row("default engine", f"{r.default_engine}: {r.engine_reason}")
    c.print(t)
    return 0
