"""Where a VM's snapshots live, and the tree they form.

Design: each VM has one directory holding one subdirectory per snapshot, named after
it: `<root>/<VM>/<NAME>/` (root: $PYHV_SNAPSHOT_DIR, else $XDG_DATA_HOME/pyhv/snapshots,
else ~/.local/share/pyhv/snapshots; `pyhv run --snapshot-dir DIR` gives a VM's own
directory instead). The tree is in the manifests: each snapshot names its `parent`, the
snapshot the VM was created from or last reverted to when it was taken. Deleting a
snapshot gives its children its parent.

A snapshot is built in a hidden directory `.NAME.partial-PID` next to the final one and
renamed into place when whole; `list()` ignores hidden entries, so a crash while
writing leaves no half snapshot behind a name (`sweep()` removes such leftovers of dead
writers).

Invariants: names are checked (manifest.check_name) before any path is built from
them, so a name can never leave the VM's directory; the directory is created 0700.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pyhv.errors import StateError
from pyhv.snapshot.manifest import MANIFEST, Manifest, check_name, load_manifest


def default_root() -> Path:
    env = os.environ.get("PYHV_SNAPSHOT_DIR")
    if env:
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "pyhv" / "snapshots"


class SnapshotStore:
    """The snapshots of one VM: `<dir>/<NAME>/`."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @classmethod
    def for_vm(cls, vm: str, directory: Path | None = None) -> SnapshotStore:
        return cls(directory if directory is not None else default_root() / vm)

    def path(self, name: str) -> Path:
        return self.dir / check_name(name)

    def exists(self, name: str) -> bool:
        return self.path(name).is_dir()

    def get(self, name: str) -> Manifest:
        if not self.exists(name):
            raise StateError(f"no snapshot named {name!r} (in {self.dir})")
        return load_manifest(self.path(name))

    def list(self) -> list[tuple[str, Manifest | None, str]]:
        """(name, manifest or None, problem) for every snapshot, oldest first."""
        out: list[tuple[str, Manifest | None, str]] = []
        if not self.dir.is_dir():
            return out
        for entry in sorted(self.dir.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                out.append((entry.name, load_manifest(entry), ""))
            except StateError as e:
                out.append((entry.name, None, str(e)))
        out.sort(key=lambda t: (t[1].created if t[1] is not None else "", t[0]))
        return out

    def partial(self, name: str) -> Path:
        """A fresh hidden directory to build snapshot `name` in."""
        check_name(name)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.dir / f".{name}.partial-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(mode=0o700)
        return tmp

    def commit(self, tmp: Path, name: str) -> Path:
        final = self.path(name)
        try:
            os.rename(tmp, final)
        except OSError as e:
            raise StateError(f"cannot put snapshot {name!r} in place: {e.strerror}") from None
        return final

    def delete(self, name: str) -> Manifest | None:
        """Remove snapshot `name` (its children get its parent); returns its manifest
        (None if it was unreadable)."""
        path = self.path(name)
        if not path.is_dir():
            raise StateError(f"no snapshot named {name!r} (in {self.dir})")
        try:
            gone: Manifest | None = load_manifest(path)
        except StateError:
            gone = None
        for child, m, _ in self.list():
            if m is not None and m.parent == name:
                m.parent = gone.parent if gone is not None else None
                _rewrite_manifest(self.path(child), m)
        shutil.rmtree(path)
        return gone

    def sweep(self) -> None:
        """Remove `.NAME.partial-PID` directories whose writer is gone, and
        `.pyhv-overlay-PID-*` ones (pyhv.overlay) whose run is gone."""
        if not self.dir.is_dir():
            return
        for entry in self.dir.iterdir():
            pid = ""
            if entry.name.startswith(".") and ".partial-" in entry.name:
                pid = entry.name.rsplit("-", 1)[-1]
            elif entry.name.startswith(".pyhv-overlay-"):
                pid = entry.name.split("-")[2]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)


def _rewrite_manifest(snapdir: Path, m: Manifest) -> None:
    tmp = snapdir / (MANIFEST + ".new")
    tmp.write_text(json.dumps(m.to_json(), indent=1) + "\n")
    os.replace(tmp, snapdir / MANIFEST)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
