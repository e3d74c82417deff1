"""A snapshot's disks: each virtio-blk disk gets a qcow2 internal snapshot of the same
name, taken, applied and deleted through the image the VM has open.

Design: the disks are the machine's virtio-blk functions in slot order. A read-write
qcow2 image gets an internal snapshot named like the pyhv snapshot (`qemu-img snapshot
-l` lists it), taken after the devices were quiesced (in-flight requests finished, the
image flushed) while the vCPUs are parked; a read-only disk needs none (nothing writes
it) and is only recorded. A read-write raw image cannot be put back, so a machine with
one is refused before anything is written (use a qcow2 image, or readonly=on).

The manifest's `disks` lists each disk: index, path, format, read_only, snapshot (the
internal snapshot's name, or null). Revert and restore check first that the machine's
disks are those (same files, same count) and that every internal snapshot is there, then
apply them (`snapshot_apply`: the image's active tables become the snapshot's).

Throwaway disks (`pyhv run --image debian`'s overlay, removed when the run ends: its
entry in the machine's `pci` list says `"throwaway": true`): create keeps it, as a hard
link `diskN.qcow2` in the snapshot's own directory (N: the disk's index), before it
takes the internal snapshot; the manifest (its `disks` and `machine.pci`) names that
link, and the open image is renamed to it, so revert, later snapshots and
`--restore` find the file after the run. The overlay lives on the snapshot directory's
filesystem (pyhv.overlay), so the link cannot cross filesystems. Several snapshots of
one run link the same file (each with its internal snapshot); deleting one removes
only its link.

Invariants: a failed create deletes the internal snapshots it made; nothing here reads
or writes guest RAM.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyhv.devices.virtio.blk import VirtioBlk
from pyhv.devices.virtio.transport import VirtioPciFunction
from pyhv.errors import PyhvError, StateError

if TYPE_CHECKING:
    from pyhv.machine import Machine


def blk_devices(machine: Machine) -> list[VirtioBlk]:
    try:
        slots = machine.devices.pci.slots
    except AttributeError:
        return []
    return [fn.device for _slot, fn in sorted(slots.items())
            if isinstance(fn, VirtioPciFunction) and isinstance(fn.device, VirtioBlk)]


def _path(dev: VirtioBlk) -> str:
    return os.path.abspath(str(getattr(dev.disk, "path", "")))


def _names(dev: VirtioBlk) -> list[str]:
    return [sn.name for sn in getattr(dev.disk, "snapshots", [])]


def _qcow2(dev: VirtioBlk) -> bool:
    return hasattr(dev.disk, "snapshot_create")


def check_disks_savable(machine: Machine, name: str) -> None:
    """StateError when a disk cannot take snapshot `name` (nothing changed)."""
    for dev in blk_devices(machine):
        if dev.read_only:
            continue
        if not _qcow2(dev):
            raise StateError(f"{dev.name} ({_path(dev)}) is a raw image: its writes cannot "
                             "be undone, so it cannot be snapshotted; use a qcow2 image "
                             "(pyhv img convert -O qcow2) or readonly=on")
        if name in _names(dev):
            raise StateError(f"{dev.name} ({_path(dev)}) has an internal snapshot named "
                             f"{name!r} already (pyhv img snapshot -d {name} to free it)")


def snapshot_disks(machine: Machine, name: str) -> list[dict[str, Any]]:
    """Take each read-write disk's internal snapshot `name`; the manifest's entries."""
    out: list[dict[str, Any]] = []
    made: list[VirtioBlk] = []
    try:
        for i, dev in enumerate(blk_devices(machine)):
            entry: dict[str, Any] = {"index": i, "path": _path(dev),
                                     "format": "qcow2" if _qcow2(dev) else "raw",
                                     "read_only": dev.read_only, "snapshot": None}
            if not dev.read_only:
                dev.disk.flush()
                dev.disk.snapshot_create(name)   # type: ignore[attr-defined]
                made.append(dev)
                entry["snapshot"] = name
            out.append(entry)
    except BaseException:
        for dev in made:
            with contextlib.suppress(PyhvError):
                dev.disk.snapshot_delete(name)   # type: ignore[attr-defined]
        raise
    return out


def keep_throwaway(machine: Machine, machine_info: dict[str, Any], tmp: Path,
                   final: Path) -> tuple[dict[str, Any], Callable[[], None]]:
    """Hard-link each throwaway disk into `tmp` (to become `final`) and name it by its
    final path in the open image and in a copy of `machine_info`; returns that copy and
    what undoes the renaming (for a create that fails)."""
    pci = machine_info.get("pci")
    if not isinstance(pci, list) or not any(
            isinstance(e, dict) and e.get("throwaway") for e in pci):
        return machine_info, lambda: None
    devs = blk_devices(machine)
    renamed: list[tuple[Any, str]] = []

    def undo() -> None:
        for disk, old in renamed:
            disk.path = old
    out: list[Any] = []
    index = 0
    try:
        for e in pci:
            if not isinstance(e, dict) or e.get("kind") != "disk":
                out.append(e)
                continue
            i, index = index, index + 1
            if not e.get("throwaway"):
                out.append(e)
                continue
            if i >= len(devs) or not _same(str(e.get("path")), _path(devs[i])):
                raise StateError(f"throwaway disk {i} ({e.get('path')}) is not this VM's")
            link = f"disk{i}.qcow2"
            try:
                os.link(str(e["path"]), tmp / link)
            except OSError as err:
                raise StateError(f"cannot keep the throwaway disk {e['path']} in the "
                                 f"snapshot ({err.strerror})") from None
            disk = devs[i].disk
            renamed.append((disk, disk.path))        # type: ignore[attr-defined]
            disk.path = str(final / link)            # type: ignore[attr-defined]
            out.append({k: v for k, v in e.items() if k != "throwaway"}
                       | {"path": str(final / link)})
    except BaseException:
        undo()
        raise
    return {**machine_info, "pci": out}, undo


def check_disks(machine: Machine, entries: list[dict[str, Any]], what: str) -> None:
    """StateError unless the machine's disks are the snapshot's, each with its internal
    snapshot (nothing changed)."""
    devs = blk_devices(machine)
    if len(devs) != len(entries):
        raise StateError(f"{what} has {len(entries)} disk(s), this VM {len(devs)}")
    for dev, e in zip(devs, entries, strict=True):
        path = e.get("path")
        if not isinstance(path, str) or not _same(path, _path(dev)):
            raise StateError(f"{what}: disk {e.get('index')} is {path}, this VM's is "
                             f"{_path(dev)}")
        snap = e.get("snapshot")
        if snap is not None and snap not in _names(dev):
            raise StateError(f"{what}: {_path(dev)} has no internal snapshot {snap!r} "
                             "(deleted, or the image was replaced)")
        if snap is None and not dev.read_only:
            raise StateError(f"{what}: disk {_path(dev)} was read-only in the snapshot "
                             "and is writable here")


def apply_disks(machine: Machine, entries: list[dict[str, Any]]) -> None:
    """Put each disk back to its internal snapshot (after `check_disks`)."""
    for dev, e in zip(blk_devices(machine), entries, strict=True):
        if e.get("snapshot") is not None:
            dev.disk.snapshot_apply(str(e["snapshot"]))   # type: ignore[attr-defined]


def delete_disk_snapshots(machine: Machine, entries: list[dict[str, Any]]) -> None:
    """Delete the internal snapshots the entries name from the machine's open disks
    (a disk the machine does not have open is left alone)."""
    devs = {_path(d): d for d in blk_devices(machine)}
    for e in entries:
        dev = devs.get(str(e.get("path")))
        snap = e.get("snapshot")
        if dev is not None and snap is not None and snap in _names(dev):
            dev.disk.snapshot_delete(str(snap))   # type: ignore[attr-defined]


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
