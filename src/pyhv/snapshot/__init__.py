"""Snapshots of a running VM on disk: a directory per snapshot, a store per VM.

    manifest.py   the manifest (format, versions, machine shape, device set, checksums)
    ramfile.py    guest RAM as a sparse file, its content checksum, reading it back
    store.py      where a VM's snapshots live; the tree (parents); delete
    ops.py        create / revert / open a snapshot for `pyhv run --restore`

The VM's state itself is pyhv.vmstate's; the control API (pyhv.vmcontrol, pyhv.vmapi)
and the CLI (pyhv.cmd_snapshot) drive these operations on a running VM.
"""

from pyhv.snapshot.manifest import FORMAT_VERSION, Manifest, check_name
from pyhv.snapshot.ops import Created, create_snapshot, open_snapshot, revert_snapshot
from pyhv.snapshot.store import SnapshotStore, default_root

__all__ = ["FORMAT_VERSION", "Created", "Manifest", "SnapshotStore", "check_name",
           "create_snapshot", "default_root", "open_snapshot", "revert_snapshot"]
