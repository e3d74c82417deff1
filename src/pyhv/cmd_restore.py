"""`pyhv run --restore DIR`: the machine a snapshot describes, checked before it is built.

The snapshot (pyhv.snapshot) is opened and checked in full first: its manifest (format,
fields), every file's size and checksum, the state against the manifest. Then the
machine is configured from it: the vCPU count and RAM size of the snapshot (refused if
this host has less RAM), its engine unless `--engine` names another (the cross-engine
case: the engine's `set_state` refuses a CPU mode it cannot run), its engine options
when the engine is the same, and its RAM mapped copy-on-write from the snapshot's RAM
file (MachineConfig.restore_ram), so building costs the same for any RAM size. The run
command then applies the state (pyhv.vmstate.apply, which refuses another device set)
before the first guest instruction; any refusal is one `pyhv:` line, status 2, and
nothing has run.

Options that describe a new guest (--kernel, --image, --initrd, --append, --command,
--format, --load-addr, --mem, --cpus, --disk, --net, --mac, --rng) are refused with
--restore: the snapshot says what the guest is.
"""

from __future__ import annotations

import argparse

from pyhv.errors import ConfigError
from pyhv.machine import MachineConfig, check_memory, resolve_engine
from pyhv.snapshot import open_snapshot
from pyhv.snapshot.manifest import RAM
from pyhv.vmstate import VmState

_NEW_GUEST: tuple[tuple[str, object], ...] = (
    ("kernel", None), ("image", None), ("initrd", None), ("append", None),
    ("command", None), ("format", "auto"), ("load_addr", None), ("mem", "128M"),
    ("cpus", 1), ("disk", []), ("net", None), ("mac", None), ("rng", False))


def restore_config(args: argparse.Namespace) -> tuple[MachineConfig, VmState]:
    given = [name for name, default in _NEW_GUEST if getattr(args, name) != default]
    if given:
        opts = ", ".join("--" + n.replace("_", "-") for n in given)
        raise ConfigError(f"--restore continues a saved VM; {opts} would describe a new "
                          "one (the snapshot says what the guest is)")
    snapdir = args.restore
    if not snapdir.is_dir():
        raise ConfigError(f"--restore {snapdir}: not a directory")
    manifest, state = open_snapshot(snapdir)
    check_memory(manifest.mem_size)
    engine = resolve_engine(manifest.engine if args.engine == "auto" else args.engine)
    options = manifest.machine.get("engine_options", {})
    if engine != manifest.engine or not isinstance(options, dict):
        options = {}
    strict = bool(manifest.machine.get("strict_io", False)) or args.strict_io
    state.extra["snapshot"] = manifest.name
    return MachineConfig(mem_size=manifest.mem_size, n_cpus=manifest.cpus, engine=engine,
                         strict_io=strict,
                         engine_options={str(k): str(v) for k, v in options.items()},
                         restore_ram=snapdir / RAM), state
