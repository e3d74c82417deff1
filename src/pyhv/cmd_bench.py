"""`pyhv bench`: pyhv's built-in benchmarks. Today one: `pyhv bench modes` (issue 13),
the comparison of trap, bt, pv, kvm, emu, QEMU TCG and native on the same small kernels; the
measuring is pyhv.benchmodes, the chart pyhv.benchchart. This file parses and prints.

The benchmark lives in the package (not bench/) so that `pyhv bench modes` is a real
subcommand with one implementation that the tests run; it still needs a checkout (the
guest sources under tests/guests) and gcc/ld.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from pyhv.benchmodes import ENGINES, LOOP_NAMES, build, measure, table
from pyhv.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", choices=("modes",), help="the benchmark")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help=f"comma-separated subset of {','.join(ENGINES)} (default: all)")
    p.add_argument("--loops", default=",".join(LOOP_NAMES),
                   help=f"comma-separated subset of {','.join(LOOP_NAMES)} (default: all)")
    p.add_argument("--repeat", type=int, default=3, help="runs per point (median)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every iteration-count difference (e.g. 0.001 for a "
                        "smoke run; numbers then are noise)")
    p.add_argument("--chart", type=Path, default=Path("modes"), metavar="STEM",
                   help="write STEM.png and STEM.svg (default: ./modes)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="per guest run")


def main(args: argparse.Namespace) -> int:
    engines = [e for e in args.engines.split(",") if e]
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        raise ConfigError(f"--engines: unknown {bad or 'empty'}; choose from {ENGINES}")
    loops = [lp for lp in args.loops.split(",") if lp]
    if not loops or any(lp not in LOOP_NAMES for lp in loops):
        raise ConfigError(f"--loops: choose from {LOOP_NAMES}")
    if args.repeat < 1 or args.scale <= 0:
        raise ConfigError("--repeat must be >= 1 and --scale > 0")
    cmd = (f"pyhv bench modes --engines {','.join(engines)} --repeat {args.repeat}"
           + (f" --loops {','.join(loops)}" if len(loops) < len(LOOP_NAMES) else "")
           + (f" --scale {args.scale:g}" if args.scale != 1 else ""))
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cpu = next((ln.split(":", 1)[1].strip() for ln in
                Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU")
    with tempfile.TemporaryDirectory(prefix="pyhv-modes-") as tmp:
        paths = build(Path(tmp))
        res = measure(engines, args.repeat, args.scale, paths, args.timeout, loops,
                      progress=lambda s: print(f"  measuring {s}", file=sys.stderr,
                                               flush=True))
    print(f"pyhv bench modes: {stamp}, {cpu}, median of {args.repeat}")
    print(f"reproduce: {cmd}")
    print("cost per operation = (wall(n2) - wall(n1)) / (n2 - n1) / ops per iteration;"
          " native runs only cpu (the rest is privileged in a process)\n")
    print(table(res, engines))
    from pyhv.benchchart import write_chart

    files = write_chart(res, engines, args.chart,
                        f"pyhv bench modes, {stamp} (median of {args.repeat}): {cmd}")
    print("\nchart: " + ", ".join(str(f) for f in files))
    return 0
