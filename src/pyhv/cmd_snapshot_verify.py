"""`pyhv snapshot-verify DIR`: check a snapshot directory in full, without running it.

The checks of `pyhv run --restore DIR --verify`, alone: the manifest (format, fields),
vmstate.json's checksum and records (the envelope and every vCPU record), the state
against the manifest, and the RAM file's full content checksum (every non-zero page
hashed: it costs the guest's used memory). `pyhv run --restore` checks the RAM file
only quickly by default (its size and sparse map: docs/snapshots.md says what that
misses); this is the check to run on a snapshot that was copied, archived or is
suspect. A good snapshot prints one line and exits 0; a damaged one is one `pyhv:`
line (what differs) and status 2. Nothing is changed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pyhv.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, metavar="DIR", help="a snapshot directory (as for "
                                                         "pyhv run --restore DIR)")


def main(args: argparse.Namespace) -> int:
    from pyhv.snapshot import open_snapshot
    if not args.dir.is_dir():
        raise ConfigError(f"{args.dir}: not a directory")
    m, state = open_snapshot(args.dir, ram="full")
    print(f"snapshot {m.name} of {m.vm} ({m.engine}, {m.cpus} vCPU(s), "
          f"{m.mem_size >> 20} MiB): every file matches its checksum")
    return 0
