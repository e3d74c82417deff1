"""Benchmark: the issue's command on the Debian root disk, pyhv (emu) against QEMU's TCG.

    .venv/bin/python bench/debian_bench.py [--runs 3]

    pyhv       python -m pyhv run --engine emu --image debian --command CMD
    qemu-tcg   qemu-system-x86_64 -accel tcg -M pc -m 128 -nographic -no-reboot
               -kernel vmlinuz -initrd initramfs.cpio.gz
               -drive file=disk.qcow2,if=virtio,snapshot=on
               -append "console=ttyS0 loglevel=1 pyhv.root=/dev/vda pyhv.cmd=<CMD>"

with CMD = `echo "scale=100; 4*a(1)" | bc -l`: boot Debian's kernel and pyhv's initramfs,
load virtio_pci/virtio_blk, mount the Debian disk, run Debian's bc, power off. The same
kernel, initramfs and disk (the cached `pyhv guest fetch debian` image; built first when
missing); both write to a throwaway overlay. Measured: host wall time from process start
to exit, the median of --runs runs each (interleaved), and pyhv / QEMU. Every process
runs under a timeout, and every run's output must hold pi, or the run counts as failed.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from pyhv import debian, images  # noqa: E402

CMD = 'echo "scale=100; 4*a(1)" | bc -l'
PI_HEAD = b"3.14159265358979323846264338327950288419716939937510582097494459230"
TIMEOUT = 300


def _timed(argv: list[str]) -> float:
    t0 = time.monotonic()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=TIMEOUT)
    secs = time.monotonic() - t0
    if PI_HEAD not in proc.stdout:
        raise SystemExit(f"{argv[0]}: no pi in the output (status {proc.returncode}): "
                         f"{proc.stdout[-500:]!r} {proc.stderr[-500:]!r}")
    return secs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    disk = debian.ensure_debian_disk(quiet=True)
    qemu = shutil.which("qemu-system-x86_64")
    pyhv_argv = [sys.executable, "-m", "pyhv", "run", "--engine", "emu", "--image", "debian",
                 "--timeout", str(TIMEOUT), "--command", CMD]
    peers: dict[str, list[str]] = {"pyhv emu": pyhv_argv}
    if qemu is not None:
        append = " ".join(["console=ttyS0", "loglevel=1", *disk.cmdline_words,
                           images.command_param(CMD)])
        peers["qemu-tcg pc"] = [
            qemu, "-accel", "tcg", "-M", "pc", "-m", "128", "-nographic", "-no-reboot",
            "-monitor", "none", "-serial", "stdio", "-nic", "none",
            "-kernel", str(disk.linux.kernel_path), "-initrd", str(disk.linux.initrd_path),
            "-drive", f"file={disk.disk_path},if=virtio,format=qcow2,snapshot=on",
            "-append", append]
    times: dict[str, list[float]] = {name: [] for name in peers}
    for _ in range(args.runs):
        for name, argv in peers.items():
            times[name].append(_timed(argv))
    print(f"debian_bench {time.strftime('%Y-%m-%d')} on {platform.node()}: "
          f"{' '.join(['bench/debian_bench.py', '--runs', str(args.runs)])}")
    print(f"{CMD!r} on Debian {disk.suite} ({disk.linux.version}), median of {args.runs}:")
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"  {name:12} {med[name]:6.2f} s   (runs: {', '.join(f'{x:.2f}' for x in t)})")
    if "qemu-tcg pc" in med:
        print(f"  pyhv / QEMU TCG: {med['pyhv emu'] / med['qemu-tcg pc']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
