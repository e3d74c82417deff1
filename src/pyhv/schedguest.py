"""The work-loop guest of `pyhv bench sched` and the scheduling tests.

bench/guests/user64.S built with -DSPIN: a multiboot image that enters long mode, drops
to CPL 3 (where KVM-PVM runs guest code natively, docs/host.md) and loops forever: a
chunk of `iters` iterations of bench/guests/cpuloop.inc, then its chunk counter to port
0x80 (`out 0x80, eax`). Each chunk is one port exit, so the VM's count of port 0x80
writes (`GET /stats` of the control API: io_ports["0x0080"]) is the guest's own
progress counter, read while the guest runs.

Invariants: built with gcc/ld from the checkout's sources (HostError if either is
missing); the image never ends by itself (the caller's --timeout or stop ends it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from pyhv.errors import HostError

ROOT = Path(__file__).resolve().parents[2]
GUESTS = ROOT / "bench" / "guests"
PROGRESS_PORT = 0x80
DEFAULT_ITERS = 2_000_000     # a few ms of native work per chunk on pyhv's hosts


def build_spin(out: Path, iters: int = DEFAULT_ITERS) -> Path:
    """Build the spin guest into `out`; returns the image's path."""
    for tool in ("gcc", "ld"):
        if shutil.which(tool) is None:
            raise HostError(f"the scheduling guest needs {tool} (scripts/setup.sh)")
    src = GUESTS / "user64.S"
    if not src.is_file():
        raise HostError(f"{src} not found: the scheduling guest needs a pyhv checkout")
    if not 1 <= iters < 1 << 31:
        raise HostError(f"bad chunk size {iters}")
    obj, img = out / f"spin{iters}.o", out / f"spin{iters}.elf"
    for cmd in (["gcc", "-m32", "-c", f"-I{GUESTS}", "-DSPIN=1", f"-DITERS={iters}",
                 "-o", str(obj), str(src)],
                ["ld", "-m", "elf_i386", "-T", str(GUESTS / "bench.ld"), "-z",
                 "max-page-size=0x1000", "--build-id=none", "-o", str(img), str(obj)]):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            raise HostError(f"{' '.join(cmd)} failed: {p.stderr.strip()}")
    return img
