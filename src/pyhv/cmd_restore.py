"""`pyhv run --restore DIR`: the machine a snapshot describes, checked before it is built.

The snapshot (pyhv.snapshot) is opened and checked first: its manifest (format,
fields), every file's size and checksum, the state against the manifest; the RAM file
by its quick check (size and sparse map, snapshot/ramfile.py) unless `--verify` asks for
the full content hash (`pyhv snapshot-verify DIR` does that check alone). Then the
machine is configured from it: the vCPU count and RAM size of the snapshot (refused if
this host has less RAM), its engine unless `--engine` names another (the cross-engine
case: the engine's `set_state` refuses a CPU mode it cannot run), its engine options
when the engine is the same, and its RAM mapped copy-on-write from the snapshot's RAM
file (MachineConfig.restore_ram), so building costs the same for any RAM size. The run
command then applies the state (pyhv.vmstate.apply, which refuses another device set)
before the first guest instruction; any refusal is one `pyhv:` line, status 2, and
nothing has run.

The snapshot's virtio devices are built again from its manifest (`machine.pci`): its
disks by path, format, read-only flag and serial, put back to their qcow2 internal
snapshots before the state is applied (snapshot/disks.py); rng; the balloon; the NIC with the MAC
its driver knows, on a new back end of the same spec.

Options that describe a new guest (--kernel, --image, --initrd, --append, --command,
--format, --load-addr, --mem, --cpus, --disk, --net, --mac, --rng) are refused with
--restore: the snapshot says what the guest is.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from pyhv.devices.state import Reader
from pyhv.errors import ConfigError, StateError
from pyhv.machine import Machine, MachineConfig, check_memory, resolve_engine
from pyhv.snapshot import open_snapshot
from pyhv.snapshot.manifest import RAM
from pyhv.snapshot.ops import restore_machine

if TYPE_CHECKING:
    from pyhv.devices.deferred import DeferredCalls
    from pyhv.devices.pci.function import PciFunction
    from pyhv.memory import GuestMemory

_NEW_GUEST: tuple[tuple[str, object], ...] = (
    ("kernel", None), ("image", None), ("initrd", None), ("append", None),
    ("command", None), ("format", "auto"), ("load_addr", None), ("mem", "128M"),
    ("cpus", 1), ("disk", []), ("net", None), ("mac", None), ("rng", False))


def restore_config(args: argparse.Namespace
                   ) -> tuple[MachineConfig, Callable[[Machine], None], str,
                              list[dict[str, object]]]:
    """The machine to build, what puts it in the snapshot's state once built (disks,
    then the state), the snapshot's name (the VM's current snapshot) and the PCI
    devices' description (for snapshots of the restored VM)."""
    given = [name for name, default in _NEW_GUEST if getattr(args, name) != default]
    if given:
        opts = ", ".join("--" + n.replace("_", "-") for n in given)
        raise ConfigError(f"--restore continues a saved VM; {opts} would describe a new "
                          "one (the snapshot says what the guest is)")
    snapdir = args.restore
    if not snapdir.is_dir():
        raise ConfigError(f"--restore {snapdir}: not a directory")
    manifest, state = open_snapshot(snapdir, ram="full" if args.verify else "quick")
    check_memory(manifest.mem_size)
    engine = resolve_engine(manifest.engine if args.engine == "auto" else args.engine)
    options = manifest.machine.get("engine_options", {})
    if engine != manifest.engine or not isinstance(options, dict):
        options = {}
    strict = bool(manifest.machine.get("strict_io", False)) or args.strict_io
    pci_info = manifest.machine.get("pci", [])
    pci = pci_devices(pci_info)
    config = MachineConfig(mem_size=manifest.mem_size, n_cpus=manifest.cpus, engine=engine,
                           strict_io=strict,
                           engine_options={str(k): str(v) for k, v in options.items()},
                           restore_ram=snapdir / RAM, pci_devices=pci)

    def prepare(machine: Machine) -> None:
        restore_machine(machine, manifest, state)
    return config, prepare, manifest.name, list(pci_info)


def pci_devices(info: object) -> list[Callable[[GuestMemory, DeferredCalls], PciFunction]]:
    """The virtio devices a manifest's `machine.pci` names, in order (their slots):
    disks (path, format, read_only, serial), rng, balloon, net (the back end spec and the MAC the
    guest's driver knows). Anything else is a StateError."""
    from pyhv.diskspec import DiskSpec, make_function
    if not isinstance(info, list):
        raise StateError("manifest: machine.pci is not a list")
    out: list[Callable[[GuestMemory, DeferredCalls], PciFunction]] = []
    disks = 0
    for i, d in enumerate(info):
        r = Reader(f"manifest machine.pci[{i}]", d)
        kind = r.str("kind", 8)
        if kind == "disk":
            fmt = r.raw("format")
            if fmt not in (None, "raw", "qcow2"):
                raise r.fail("format", f"= {fmt!r} is not raw or qcow2")
            spec = DiskSpec(r.str("path", 4096), fmt, r.bool("read_only"),
                            r.str("serial", 20))
            out.append(make_function(spec, disks))
            disks += 1
        elif kind == "rng":
            from pyhv.cmd_run import _rng_function
            out.append(_rng_function)
        elif kind == "balloon":
            from pyhv.cmd_run import _balloon_function
            out.append(_balloon_function)
        elif kind == "net":
            from pyhv.net.spec import parse_net
            from pyhv.nic import make_nic
            net = parse_net(r.str("net", 4096))
            out.append(make_nic(net, r.hex("mac", length=6)))
        else:
            raise r.fail("kind", f"= {kind!r} is not disk, rng, balloon or net")
        r.done()
    return out
