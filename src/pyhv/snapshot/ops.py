"""Snapshot operations on a machine: create, revert, and open one to restore.

    create_snapshot(machine, store, name, ...)  the machine is paused (parked) by the
        caller: capture its state (pyhv.vmstate), write vmstate.json and the sparse RAM
        file with progress, take each disk's snapshot, then the manifest; build it in a
        hidden directory and rename it into place (a failure leaves nothing behind)
    revert_snapshot(machine, store, name)        the machine is paused by the caller:
        check everything (manifest, checksums, device set, vCPUs, RAM size), then copy
        the RAM in, revert the disks, apply the state; the caller resumes it
    open_snapshot(dir, ram=...)                  for `pyhv run --restore DIR`: the
        manifest, the files' checksums and the state, all checked, before any machine
        is built (the RAM file by its quick check unless --verify: ramfile.py);
        the RAM is then mapped from the file (MachineConfig.restore_ram) and
        restore_machine(machine, manifest, state) puts the disks back and applies it
    Disks: each read-write qcow2 disk gets an internal snapshot of the same name
        (snapshot/disks.py); a read-write raw disk makes create refuse the machine

Checks: a snapshot is refused with a StateError (one line) when its manifest is
malformed or of a newer format, a file is missing or its size or checksum differs, the
state does not agree with the manifest (vCPUs, RAM size, device set), or the machine it
is applied to is not like the one it was taken of.

Invariants: nothing here resumes or runs the machine; `revert_snapshot` changes the
machine only after every check passed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyhv
from pyhv.errors import StateError
from pyhv.snapshot.disks import (
    apply_disks,
    check_disks,
    check_disks_savable,
    delete_disk_snapshots,
    keep_throwaway,
    snapshot_disks,
)
from pyhv.snapshot.manifest import (
    MANIFEST,
    RAM,
    VMSTATE,
    Manifest,
    check_files,
    check_name,
    file_entry,
    load_manifest,
    read_json,
)
from pyhv.snapshot.ramfile import Progress, read_ram_into, write_ram
from pyhv.snapshot.store import SnapshotStore
from pyhv.vmstate import VmState, apply, capture, check_fits

if TYPE_CHECKING:
    from pyhv.machine import Machine


@dataclass
class Created:
    manifest: Manifest
    path: Path
    seconds: float
    ram_bytes_stored: int        # bytes of RAM data in the file (zero pages are holes)


def create_snapshot(machine: Machine, store: SnapshotStore, name: str, *, vm: str,
                    parent: str | None = None, machine_info: dict[str, Any] | None = None,
                    progress: Progress | None = None) -> Created:
    t0 = time.monotonic()
    check_name(name)
    if store.exists(name):
        raise StateError(f"a snapshot named {name!r} exists already (delete it first)")
    if machine.memory is None:
        raise StateError("the machine is closed")
    check_disks_savable(machine, name)
    store.sweep()
    state = capture(machine)
    tmp = store.partial(name)
    disks: list[dict[str, Any]] | None = None
    unkeep: Callable[[], None] | None = None
    try:
        (tmp / VMSTATE).write_text(json.dumps(state.to_json()))
        digest = write_ram(machine.memory, tmp / RAM, progress)
        info, unkeep = keep_throwaway(machine, dict(machine_info or {}), tmp,
                                      store.path(name))
        disks = snapshot_disks(machine, name)
        m = Manifest(name=name, vm=vm, parent=parent, engine=state.engine,
                     cpus=state.n_cpus, mem_size=state.mem_size,
                     devices=state.device_names(),
                     created=datetime.now(UTC).isoformat(timespec="milliseconds"),
                     machine=info, disks=disks,
                     pyhv_version=pyhv.__version__,
                     files={VMSTATE: file_entry(tmp / VMSTATE),
                            RAM: file_entry(tmp / RAM, digest)})
        data = json.dumps(m.to_json(), indent=1) + "\n"
        with open(tmp / MANIFEST, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        stored = os.stat(tmp / RAM).st_blocks * 512
        final = store.commit(tmp, name)
    except BaseException:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        if disks is not None:
            delete_disk_snapshots(machine, disks)
        if unkeep is not None:
            unkeep()
        raise
    return Created(m, final, time.monotonic() - t0, stored)


def open_snapshot(snapdir: Path, *, ram: str = "full") -> tuple[Manifest, VmState]:
    """The manifest and state of the snapshot in `snapdir`, every file checked (the RAM
    file as `ram` says: "full", "quick" or "size"; manifest.check_files)."""
    m = load_manifest(snapdir)
    check_files(snapdir, m, ram=ram)
    state = VmState.from_json(read_json(snapdir / VMSTATE, "the VM state"))
    if state.n_cpus != m.cpus or state.mem_size != m.mem_size or \
            sorted(state.device_names()) != sorted(m.devices):
        raise StateError(f"snapshot {snapdir}: the VM state does not agree with the "
                         "manifest (vCPUs, RAM size or devices): damaged")
    return m, state


def revert_snapshot(machine: Machine, store: SnapshotStore, name: str,
                    on_ram: Callable[[], None] | None = None) -> Manifest:
    """Put the (paused) machine back to snapshot `name`; see the module docstring."""
    if not store.exists(name):
        raise StateError(f"no snapshot named {name!r} (in {store.dir})")
    snapdir = store.path(name)
    m, state = open_snapshot(snapdir)
    check_fits(machine, state)
    check_disks(machine, m.disks, f"snapshot {name!r}")
    assert machine.memory is not None
    read_ram_into(machine.memory, snapdir / RAM)
    if on_ram is not None:
        on_ram()
    apply_disks(machine, m.disks)
    apply(machine, state)
    return m


def restore_machine(machine: Machine, manifest: Manifest, state: VmState) -> None:
    """`pyhv run --restore`: the machine was built from the snapshot (its RAM mapped
    from the file); check its disks, put them back to their internal snapshots, apply
    the state. Before the first guest instruction."""
    check_fits(machine, state)
    check_disks(machine, manifest.disks, f"snapshot {manifest.name!r}")
    apply_disks(machine, manifest.disks)
    apply(machine, state)
