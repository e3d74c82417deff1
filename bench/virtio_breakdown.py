"""Where pyhv's time goes per virtio-blk request (emu engine): a diagnostic, not a benchmark.

    .venv/bin/python bench/virtio_breakdown.py [--ops 4000] [--mode randread]

Boots the same guest as bench/virtio_bench.py (same kernel, initramfs plus `diskio`,
command line, fresh 256 MiB qcow2) once, in this process, with `diskio MODE` doing OPS
requests (4 KiB for rand*, 1 MiB for seq*), and wraps the emu vCPU's hooks, the run
loop's device poll and its idle wait (the guest halted, waiting for the I/O thread)
with wall-clock accumulators. The window runs from the driver's 10%-th
notify to its 90%-th (boot's and the tail's own I/O left out), so figures are per request
of the steady state. Printed: the window, requests in it, translated blocks the guest ran
(unicorn's block counter), and for each wrapped call its total, count and time per
request. Hooks run inside `emu_start`, so "guest code" is emu_start's time minus theirs.

The wrappers cost a little each (a few percent of a request); compare figures of one
run with each other, not with virtio_bench.py's.
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import virtio_bench  # noqa: E402

from pyhv import cli, images  # noqa: E402
from pyhv import machine as M  # noqa: E402
from pyhv import runner as R  # noqa: E402
from pyhv.devices.virtio import transport as T  # noqa: E402
from pyhv.engines.emu import vcpu as V  # noqa: E402

HOOKS = ("_emu_start", "_inject", "_on_intr", "_fast_system_call", "_on_in", "_on_out",
         "_mmio_read", "_mmio_write")


class Window:
    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.notifies = 0
        self.on = False
        self.t0 = self.t1 = 0.0
        self.total: defaultdict[str, float] = defaultdict(float)
        self.count: Counter[str] = Counter()
        self.blocks = 0

    def wrap(self, cls: Any, name: str) -> None:
        fn: Callable[..., Any] = getattr(cls, name)
        label = f"{cls.__name__}.{name}"
        win = self

        @functools.wraps(fn)
        def timed(*a: Any, **k: Any) -> Any:
            if not win.on:
                return fn(*a, **k)
            blocks = a[0].ctl.blocks if name == "_emu_start" else 0
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if win.on:
                    win.total[label] += time.perf_counter() - t
                    win.count[label] += 1
                    if name == "_emu_start":
                        win.blocks += a[0].ctl.blocks - blocks
        setattr(cls, name, timed)

    def wrap_notify(self) -> None:
        fn = T.VirtioPciFunction.notify
        win = self

        def counted(t: T.VirtioPciFunction, index: int) -> None:
            win.notifies += 1
            if win.notifies == win.first:
                win.on, win.t0 = True, time.perf_counter()
            elif win.notifies == win.last:
                win.on, win.t1 = False, time.perf_counter()
            fn(t, index)
        T.VirtioPciFunction.notify = counted  # type: ignore[method-assign]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=4000, help="requests diskio makes")
    ap.add_argument("--mode", default="randread",
                    choices=("randread", "randwrite", "seqread", "seqwrite"))
    a = ap.parse_args()
    img = images.ensure_linux_image(quiet=True)
    span = 32 << 20
    bs = 4096 if a.mode.startswith("rand") else 1 << 20
    win = Window(max(1, a.ops // 10), max(2, a.ops * 9 // 10))
    for h in HOOKS:
        win.wrap(V.EmuVcpu, h)
    win.wrap(M.Machine, "poll_devices")
    win.wrap(R.Runner, "_idle")
    win.wrap_notify()
    with tempfile.TemporaryDirectory(prefix="virtio-breakdown-") as tmp:
        work = Path(tmp)
        initrd = virtio_bench.build_initrd(img.initrd_path, work)
        disk = work / "d.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk),
                        virtio_bench.DISK], check=True, timeout=60)
        if a.mode.endswith("read"):      # reads of written clusters, as in the bench
            pre = f"/bin/diskio seqwrite /dev/vda 32 1048576 {span}; "
            win.first += 32
            win.last += 32
        else:
            pre = ""
        cmd = f"{pre}/bin/diskio {a.mode} /dev/vda {a.ops} {bs} {span}; echo done"
        status = cli.main(["run", "--engine", "emu", "--mem", f"{virtio_bench.MEM_MIB}M",
                           "--append", virtio_bench.CMDLINE, "--initrd", str(initrd),
                           "--disk", str(disk), "--timeout", "600", "--command", cmd])
    if not win.t1:
        print(f"the window did not close (status {status}, {win.notifies} notifies)")
        return 1
    n = win.last - win.first
    el = win.t1 - win.t0
    print(f"\nvirtio_breakdown {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
          f"{a.mode}, {n} requests in {el:.3f} s, {el / n * 1e6:.0f} us a request, "
          f"{win.blocks / n:.0f} guest blocks a request")
    inside = sum(v for k, v in win.total.items()
                 if k.split(".")[1] in HOOKS[2:])
    es = win.total["EmuVcpu._emu_start"]
    print(f"{'guest code (emu_start minus its hooks)':<40} {(es - inside) / n * 1e6:9.1f} us")
    for k, v in sorted(win.total.items(), key=lambda kv: -kv[1]):
        print(f"{k:<40} {v / n * 1e6:9.1f} us  ({win.count[k] / n:.2f} calls, "
              f"{v / win.count[k] * 1e6:.1f} us each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
