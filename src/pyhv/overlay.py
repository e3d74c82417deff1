"""A throwaway qcow2 overlay over a cached disk image: what `pyhv run --image debian`
gives the guest as /dev/vda, so the cached disk is never written.

    <temporary directory>/overlay.qcow2  --backing (qcow2, absolute path)-->  disk.qcow2

The overlay is created empty by pyhv's block layer (pyhv.disk.qcow2.create), with the
base's virtual size; every guest write lands in it and it is deleted, with its directory,
when the run ends (QEMU's `-snapshot`). The base is opened read-only through the chain,
with QEMU's shared read locks, so any number of runs can share it while nothing writes
it.

Snapshots (`pyhv snapshot-create` of a VM started with `--image debian` and a control
API): the overlay is then created in the VM's snapshot directory (a hidden
`.pyhv-overlay-PID-*` directory there, swept by the next snapshot-create of that VM if
its run died without removing it), so that a snapshot can keep it with a hard link on
the same filesystem (snapshot/disks.py `keep_throwaway`): the run's end removes only
the overlay's own name, a snapshot's link stays.

Invariants: the base is named by its absolute path (the overlay lives elsewhere);
`Overlay.close()` is idempotent and removes only what `create_overlay` made.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pyhv.disk.qcow2.create import create
from pyhv.disk.qcow2.image import Qcow2Image
from pyhv.errors import ImageError


class Overlay:
    """An overlay file in its own temporary directory; close() removes both."""

    def __init__(self, base: Path, directory: Path | None = None) -> None:
        base = base.resolve()
        try:
            img = Qcow2Image(str(base), read_only=True)
        except OSError as e:
            raise ImageError(f"cannot open {base}: {e.strerror}") from e
        try:
            size = img.size
        finally:
            img.close()
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._dir: Path | None = Path(tempfile.mkdtemp(
            prefix=f".pyhv-overlay-{os.getpid()}-" if directory is not None
            else "pyhv-overlay-",
            dir=directory))
        self.path = self._dir / "overlay.qcow2"
        try:
            create(str(self.path), size, backing_file=str(base), backing_format="qcow2")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Overlay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def disk_option(path: Path) -> str:
    """`--disk` syntax for `path` (a comma in a path is written twice, as QEMU's)."""
    return str(path).replace(",", ",,") + ",format=qcow2"
