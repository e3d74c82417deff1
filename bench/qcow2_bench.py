"""qcow2 benchmark: pyhv's qcow2 against QEMU's tools on the same files, same run.

Measures, each as the median of --runs runs:
  seq write   pyhv API: fresh image, --size bytes in --block requests, then flush
              qemu-img bench -w -d 1 -s BLOCK on a fresh qemu-img-created image
  seq read    pyhv API and qemu-img bench, both over the image pyhv wrote
              (the read, random and convert figures all use that same file)
  rand read   --ops 4 KiB reads at random aligned offsets (pyhv API); qemu-img bench has
              no random mode, so QEMU's figure is 4 KiB requests with a 1 MiB+4 KiB stride
  rand write  the same for 4 KiB writes into the allocated image
  convert     `pyhv img convert -O qcow2` vs `qemu-img convert -O qcow2` of the written image

Ratios are pyhv / QEMU (throughput), so 1.0 is parity and 0.5 is half of QEMU's speed.
Reproduce:  .venv/bin/python bench/qcow2_bench.py [--size 1G] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from pyhv.disk.qcow2 import Qcow2Image, create
from pyhv.units import parse_size


def timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_time(fn: Callable[[], None], runs: int, setup: Callable[[], None] | None = None
                ) -> float:
    times = []
    for _ in range(runs):
        if setup is not None:
            setup()
        times.append(timed(fn))
    return statistics.median(times)


def sh(*args: str) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="bytes written/read sequentially (1G)")
    ap.add_argument("--block", default="1M", help="request size for sequential I/O (1M)")
    ap.add_argument("--ops", type=int, default=20000, help="random 4 KiB operations")
    ap.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    ap.add_argument("--cluster-size", default="64k")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    a = ap.parse_args()
    size, block = parse_size(a.size), parse_size(a.block)
    cs = parse_size(a.cluster_size)
    count = size // block
    for tool in ("qemu-img",):
        if shutil.which(tool) is None:
            print(f"{tool} not found: install qemu-utils", file=sys.stderr)
            return 2
    work = tempfile.mkdtemp(prefix="qcow2bench-", dir=a.dir)
    mine, theirs = os.path.join(work, "pyhv.qcow2"), os.path.join(work, "qemu.qcow2")
    buf = random.Random(1).randbytes(block)
    results: list[tuple[str, float, float, str]] = []
    mib = size / (1 << 20)

    def fresh_mine() -> None:
        create(mine, size, cluster_size=cs)

    def fresh_theirs() -> None:
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", theirs,
           str(size))

    def seq_write() -> None:
        with Qcow2Image(mine) as img:
            for i in range(count):
                img.write(i * block, buf)
            img.flush()

    def seq_read() -> None:
        with Qcow2Image(mine, read_only=True) as img:
            for i in range(count):
                img.read(i * block, block)

    rng = random.Random(2)
    offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(a.ops)]
    small = random.Random(3).randbytes(4096)

    def rand_read() -> None:
        with Qcow2Image(mine, read_only=True) as img:
            for off in offsets:
                img.read(off, 4096)

    def rand_write() -> None:
        with Qcow2Image(mine) as img:
            for off in offsets:
                img.write(off, small)
            img.flush()

    def qbench(*extra: str, target: str = mine) -> Callable[[], None]:
        return lambda: sh("qemu-img", "bench", "-q", "-f", "qcow2", "-d", "1", *extra, target)

    stride = str((1 << 20) + 4096)
    seqn = ["-c", str(count), "-s", str(block)]
    rnd = ["-c", str(a.ops), "-s", "4096", "-S", stride]

    t_mw = median_time(seq_write, a.runs, fresh_mine)
    t_qw = median_time(qbench("-w", "--pattern=0x5a", *seqn, target=theirs), a.runs,
                       fresh_theirs)
    results.append(("seq write", mib / t_mw, mib / t_qw, "MiB/s"))
    t_mr = median_time(seq_read, a.runs)
    t_qr = median_time(qbench(*seqn), a.runs)
    results.append(("seq read", mib / t_mr, mib / t_qr, "MiB/s"))
    t_mrr = median_time(rand_read, a.runs)
    t_qrr = median_time(qbench(*rnd), a.runs)
    results.append(("4k rand read", a.ops / t_mrr, a.ops / t_qrr, "IOPS"))
    t_mrw = median_time(rand_write, a.runs)
    t_qrw = median_time(qbench("-w", *rnd), a.runs)
    results.append(("4k rand write", a.ops / t_mrw, a.ops / t_qrw, "IOPS"))
    out_m, out_q = os.path.join(work, "conv-pyhv.qcow2"), os.path.join(work, "conv-qemu.qcow2")
    t_mc = median_time(lambda: sh(sys.executable, "-m", "pyhv", "img", "convert", "-O",
                                  "qcow2", mine, out_m), a.runs)
    t_qc = median_time(lambda: sh("qemu-img", "convert", "-O", "qcow2", mine, out_q), a.runs)
    results.append(("convert", mib / t_mc, mib / t_qc, "MiB/s"))
    shutil.rmtree(work)

    print(f"qcow2 benchmark: size {a.size}, block {a.block}, cluster {a.cluster_size}, "
          f"{a.ops} random ops, median of {a.runs} runs")
    print(f"{'test':<15}{'pyhv':>14}{'qemu':>14}{'ratio':>9}")
    for name, mine_v, theirs_v, unit in results:
        print(f"{name:<15}{mine_v:>9.1f} {unit:<5}{theirs_v:>8.1f} {unit:<5}"
              f"{mine_v / theirs_v:>8.2f}x")
    print("reproduce: .venv/bin/python bench/qcow2_bench.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
