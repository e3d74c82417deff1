"""qcow2 benchmark: pyhv's qcow2 against QEMU's tools on the same files, in the same run.

Each figure is the median of --runs runs; the ratio is pyhv / QEMU throughput (1.00x is
parity, above 1 pyhv is faster). What each row measures, exactly:

  seq write    --size bytes in --block requests at offsets 0, BLOCK, 2*BLOCK... into a
               fresh image: pyhv's Qcow2Image.write loop against `qemu-img bench -w -d 1
               -s BLOCK` (whose default step is BLOCK: the same offsets)
  seq read     the same requests read back from the image pyhv wrote
  4k stride read / write
               --ops 4 KiB requests at offsets i * STEP mod --size, STEP = --step
               (1 MiB + 4 KiB): `qemu-img bench -d 1 -s 4096 -S STEP` on QEMU's side and
               the same offset sequence on pyhv's (qemu-img bench has no random mode, so
               both sides use its strided pattern), over the image pyhv wrote
  I/O timing   QEMU: the "Run completed in" time qemu-img bench prints (the requests
               only, the image already open); pyhv: the request loop only, the image
               already open. Neither side flushes inside the timed part.
  convert qcow2 <- seq   whole processes: `pyhv img convert -O qcow2 SEQ out` against
               `qemu-img convert -O qcow2 SEQ out`, SEQ the fully allocated image above
  convert raw <- half    whole processes: `... convert -O raw HALF out`, HALF a 256 MiB
               qcow2 with every other 64 KiB cluster allocated (random data)
  start-up     whole processes: `pyhv img info` against `qemu-img info` on a small
               image; part of both convert figures

Everything runs from the page cache: the figures are per-request CPU cost, not storage.
The run prints the date, the machine and qemu-img's version; docs quote the latest run.
Reproduce:  .venv/bin/python bench/qcow2_bench.py [--size 1G] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from pyhv.disk.qcow2 import Qcow2Image, create
from pyhv.units import parse_size

HALF_SIZE = 256 << 20
HALF_CLUSTER = 64 << 10


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median(fn: Callable[[], float], runs: int,
           setup: Callable[[], None] | None = None) -> float:
    """Median of `fn()` (which returns the seconds it measured) over `runs` runs."""
    times = []
    for _ in range(runs):
        if setup is not None:
            setup()
        times.append(fn())
    return statistics.median(times)


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def qemu_bench(*args: str) -> float:
    """Run qemu-img bench; return the time it reports for its requests."""
    out = sh("qemu-img", "bench", "-f", "qcow2", "-d", "1", *args)
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if not m:
        raise RuntimeError(f"unexpected qemu-img bench output: {out!r}")
    return float(m.group(1))


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    qemu = sh("qemu-img", "--version").splitlines()[0]
    return f"{os.cpu_count()} CPUs ({cpu}), {qemu}, Python {platform.python_version()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", default="1G", help="bytes written/read sequentially (1G)")
    ap.add_argument("--block", default="1M", help="request size for sequential I/O (1M)")
    ap.add_argument("--ops", type=int, default=20000, help="strided 4 KiB requests")
    ap.add_argument("--step", default=str((1 << 20) + 4096),
                    help="stride of the 4 KiB requests (qemu-img bench -S)")
    ap.add_argument("--runs", type=int, default=5, help="runs per figure (median)")
    ap.add_argument("--cluster-size", default="64k")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    a = ap.parse_args()
    size, block, step = parse_size(a.size), parse_size(a.block), parse_size(a.step)
    cs = parse_size(a.cluster_size)
    count = size // block
    if shutil.which("qemu-img") is None:
        print("qemu-img not found: install qemu-utils", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="qcow2bench-", dir=a.dir)
    mine, theirs = os.path.join(work, "pyhv.qcow2"), os.path.join(work, "qemu.qcow2")
    half, small = os.path.join(work, "half.qcow2"), os.path.join(work, "small.qcow2")
    buf = random.Random(1).randbytes(block)
    four_k = random.Random(3).randbytes(4096)
    stride = [(i * step) % size for i in range(a.ops)]  # qemu-img bench's offsets
    results: list[tuple[str, float, float, str]] = []
    mib = size / (1 << 20)

    def fresh_mine() -> None:
        create(mine, size, cluster_size=cs)

    def fresh_theirs() -> None:
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", theirs,
           str(size))

    def seq_write() -> float:
        with Qcow2Image(mine) as img:
            t = timed(lambda: [img.write(i * block, buf) for i in range(count)])
            img.flush()  # outside the timed part, as qemu-img bench's final close
        return t

    def seq_read() -> float:
        with Qcow2Image(mine, read_only=True) as img:
            return timed(lambda: [img.read(i * block, block) for i in range(count)])

    def stride_read() -> float:
        with Qcow2Image(mine, read_only=True) as img:
            return timed(lambda: [img.read(off, 4096) for off in stride])

    def stride_write() -> float:
        with Qcow2Image(mine) as img:
            t = timed(lambda: [img.write(off, four_k) for off in stride])
            img.flush()
        return t

    def process(*args: str) -> Callable[[], float]:
        return lambda: timed(lambda: sh(*args))

    seqn = ["-c", str(count), "-s", str(block)]
    strd = ["-c", str(a.ops), "-s", "4096", "-S", str(step)]
    t_mw = median(seq_write, a.runs, fresh_mine)
    t_qw = median(lambda: qemu_bench("-w", "--pattern=0x5a", *seqn, theirs), a.runs,
                  fresh_theirs)
    results.append(("seq write", mib / t_mw, mib / t_qw, "MiB/s"))
    t_mr = median(seq_read, a.runs)
    t_qr = median(lambda: qemu_bench(*seqn, mine), a.runs)
    results.append(("seq read", mib / t_mr, mib / t_qr, "MiB/s"))
    t_msr = median(stride_read, a.runs)
    t_qsr = median(lambda: qemu_bench(*strd, mine), a.runs)
    results.append(("4k stride read", a.ops / t_msr, a.ops / t_qsr, "IOPS"))
    t_msw = median(stride_write, a.runs)
    t_qsw = median(lambda: qemu_bench("-w", *strd, mine), a.runs)
    results.append(("4k stride write", a.ops / t_msw, a.ops / t_qsw, "IOPS"))

    pyhv = [sys.executable, "-m", "pyhv", "img"]
    out_m, out_q = os.path.join(work, "conv-pyhv"), os.path.join(work, "conv-qemu")
    t_mc = median(process(*pyhv, "convert", "-O", "qcow2", mine, out_m), a.runs)
    t_qc = median(process("qemu-img", "convert", "-O", "qcow2", mine, out_q), a.runs)
    results.append(("convert qcow2 <- seq", mib / t_mc, mib / t_qc, "MiB/s"))
    create(half, HALF_SIZE)
    rng = random.Random(5)
    with Qcow2Image(half) as img:
        for c in range(0, HALF_SIZE // HALF_CLUSTER, 2):
            img.write(c * HALF_CLUSTER, rng.randbytes(HALF_CLUSTER))
    hmib = HALF_SIZE / (1 << 20)
    t_mh = median(process(*pyhv, "convert", "-O", "raw", half, out_m), a.runs)
    t_qh = median(process("qemu-img", "convert", "-O", "raw", half, out_q), a.runs)
    results.append(("convert raw <- half", hmib / t_mh, hmib / t_qh, "MiB/s"))
    create(small, 1 << 20)
    t_ms = median(process(*pyhv, "info", small), a.runs)
    t_qs = median(process("qemu-img", "info", small), a.runs)
    results.append(("start-up", 1 / t_ms, 1 / t_qs, "runs/s"))
    desc = machine()
    shutil.rmtree(work)

    print(f"qcow2 benchmark, {time.strftime('%Y-%m-%d', time.gmtime())}: size {a.size}, "
          f"block {a.block}, cluster {a.cluster_size}, {a.ops} 4 KiB requests at stride "
          f"{step}, median of {a.runs} runs")
    print(f"machine: {desc}")
    print(f"{'test':<22}{'pyhv':>15}{'qemu':>15}{'ratio':>9}")
    for name, mine_v, theirs_v, unit in results:
        print(f"{name:<22}{mine_v:>9.1f} {unit:<6}{theirs_v:>8.1f} {unit:<6}"
              f"{mine_v / theirs_v:>8.2f}x")
    print("reproduce: .venv/bin/python bench/qcow2_bench.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
