"""The consolidation planner on the article's example, from measured loads (issue 14).

Two real host daemons (temporary state directories, ports picked by the kernel); ten
counter VMs (tests/guests/core/counter.S on emu, 8 MiB: a busy loop printing counts)
on the first, each capped by --cpu-limit at 10-15 % of one CPU (the cgroup quota,
pyhv.sched), idling as the article's servers do. `pyhv host plan --host A,cpus=1
--host B,cpus=1 --window 5` measures them through the daemons and plans them onto two
one-CPU hosts at an 80 % target; --apply carries the moves out by live migration.
Prints the plan's table (and, with --apply, each move). Every VM is killed at the end.

    .venv/bin/python bench/host_plan.py [--apply] [--window 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests" / "machine"))
sys.path.insert(0, str(ROOT / "tests" / "host"))

LIMITS = [10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 10.0, 12.0, 14.0, 15.0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--apply", action="store_true")
    ap.add_argument("--window", type=float, default=5.0)
    args = ap.parse_args()
    from guestbuild import GuestBuilder
    from hostkit import Daemon
    with tempfile.TemporaryDirectory(prefix="pyhv-plan-") as tmp:
        (Path(tmp) / "g").mkdir()
        counter = GuestBuilder(Path(tmp) / "g")("counter")
        a, b = Daemon(Path(tmp) / "a"), Daemon(Path(tmp) / "b")
        try:
            a.start()
            b.start()
            for i, limit in enumerate(LIMITS):
                a.ok("POST", "/v1/vms", {"name": f"srv{i}", "kernel": str(counter),
                                         "engine": "emu", "memory_mib": 8,
                                         "cpu_limit": limit})
                a.ok("POST", f"/v1/vms/srv{i}/start")
            time.sleep(2)
            print(f"# {time.strftime('%Y-%m-%d', time.gmtime())}: 10 VMs capped at "
                  f"{', '.join(f'{x:g}' for x in LIMITS)} % on daemon A; hosts A and B "
                  "given one CPU each", flush=True)
            cmd = [sys.executable, "-m", "pyhv", "host", "plan", "--host",
                   f"{a.state},cpus=1", "--host", f"{b.state},cpus=1", "--window",
                   f"{args.window:g}"] + (["--apply"] if args.apply else [])
            return subprocess.run(cmd, timeout=900).returncode
        finally:
            for d in (a, b):
                d.reap()


if __name__ == "__main__":
    sys.exit(main())
