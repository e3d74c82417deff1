"""`pyhv bench`: pyhv's built-in benchmarks. `pyhv bench modes` (issue 13), the comparison
of trap, bt, pv, kvm, emu, QEMU TCG and native on the same small kernels (the measuring is
pyhv.benchmodes, the chart pyhv.benchchart); `pyhv bench sched` (issue 14), the article's
CPU scheduling exercise (shares, a limit, a reservation) measured from the guests' own
work counters (pyhv.benchsched, chart pyhv.schedchart). This file parses and prints.

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
    p.add_argument("which", choices=("modes", "sched"), help="the benchmark")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help=f"comma-separated subset of {','.join(ENGINES)} (default: all)")
    p.add_argument("--loops", default=",".join(LOOP_NAMES),
                   help=f"comma-separated subset of {','.join(LOOP_NAMES)} (default: all)")
    p.add_argument("--repeat", type=int, default=3, help="runs per point (median)")
    p.add_argument("--scenarios", default=None,
                   help="sched: comma-separated subset of "
                        "solo,equal,shares,limit,three,reserve (default: all)")
    p.add_argument("--window", type=float, default=5.0, metavar="S",
                   help="sched: seconds each scenario is measured (after a 1 s warm-up)")
    p.add_argument("--cpu", type=int, default=None, metavar="N",
                   help="sched: the physical CPU every VM is pinned to (default: the "
                        "highest this process may use)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every iteration-count difference (e.g. 0.001 for a "
                        "smoke run; numbers then are noise)")
    p.add_argument("--chart", type=Path, default=None, metavar="STEM",
                   help="write STEM.png and STEM.svg (default: ./modes or ./sched)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="per guest run")


def main(args: argparse.Namespace) -> int:
    if args.which == "sched":
        return _sched(args)
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

    files = write_chart(res, engines, args.chart or Path("modes"),
                        f"pyhv bench modes, {stamp} (median of {args.repeat}): {cmd}")
    print("\nchart: " + ", ".join(str(f) for f in files))
    return 0


def _stamp() -> tuple[str, str]:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cpu = next((ln.split(":", 1)[1].strip() for ln in
                Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU")
    return stamp, cpu


def _sched(args: argparse.Namespace) -> int:
    import os

    from pyhv.benchsched import SCENARIO_KEYS, measure
    from pyhv.benchsched import table as sched_table
    keys = [k for k in (args.scenarios or ",".join(SCENARIO_KEYS)).split(",") if k]
    if not keys or any(k not in SCENARIO_KEYS for k in keys):
        raise ConfigError(f"--scenarios: choose from {','.join(SCENARIO_KEYS)}")
    if args.repeat < 1 or not args.window > 0:
        raise ConfigError("--repeat must be >= 1 and --window > 0")
    mine = sorted(os.sched_getaffinity(0))
    cpu = mine[-1] if args.cpu is None else args.cpu
    if cpu not in mine:
        raise ConfigError(f"--cpu {cpu}: this process may use CPU(s) {mine}")
    cmd = (f"pyhv bench sched --repeat {args.repeat} --window {args.window:g}"
           + (f" --scenarios {','.join(keys)}" if args.scenarios else ""))
    stamp, model = _stamp()
    res = measure(keys, args.repeat, args.window, cpu,
                  progress=lambda s: print(f"  measuring {s}", file=sys.stderr, flush=True))
    print(f"pyhv bench sched: {stamp}, {model}, {len(mine)} CPUs, every VM pinned to "
          f"CPU {cpu}, median of {args.repeat}, {args.window:g} s windows")
    print(f"reproduce: {cmd}")
    print("guest share: each guest's own work counter (chunks/s) over the sum of the "
          "scenario's VMs';\nguest cpu: its chunks/s over the solo VM's chunks per "
          "CPU-second, % of one CPU;\nhost cpu: its cgroup's cpuacct, % of one CPU\n")
    print(sched_table(res, keys))
    from pyhv.schedchart import write_chart as sched_chart
    files = sched_chart(res, keys, args.chart or Path("sched"),
                        f"pyhv bench sched, {stamp} (median of {args.repeat}): {cmd}")
    print("\nchart: " + ", ".join(str(f) for f in files))
    return 0
