"""Benchmark: SMP on emu against QEMU's TCG (one thread): Linux boot with 1 and 4 vCPUs,
IPI round trip and APIC-timer interrupt cost.

    .venv/bin/python bench/smp_bench.py [--quick] [--runs 3]

1. Debian's kernel and pyhv's initramfs (`pyhv guest path linux`) to /init and to exit
   after power-off, the kernel command line `console=ttyS0 pyhv.cmd=<true>` on every peer
   (emu's TSC is constant-rate on virtual time: no clock workaround since issue 11;
   where pyhv's CPU helpers are off, `pyhv run` adds its own, docs/emu.md):
       pyhv emu   python -m pyhv run --engine emu --cpus N --mem 128M --append ...
       QEMU TCG   qemu-system-x86_64 -accel tcg,thread=single -smp N -M pc -m 128 ...
   for N = 1 and 4; medians of --runs boots (interleaved), host wall time as in
   bench/boot_bench.py (the "Run /init as init process" line on stdout; process exit).
2. The smp test guest (tests/guests/core/smp.c) with `bench=K ticks=K`: after starting
   its APs it runs K IPI round trips between CPU 0 and CPU 1 (fixed IPI, the AP's
   handler answers with an IPI) and then K APIC-timer interrupts (periodic, every
   20 us of guest time, HLT between them). Host CPU time (user + system, os.wait4) of
   a run with K_BIG and one with K_SMALL, divided by the difference, is the cost of one
   round trip plus one timer interrupt; a run with only ticks (bench=1) separates them.
   Peers: pyhv emu --cpus 2, QEMU TCG -smp 2 thread=single. Not measured on kvm here:
   KVM-PVM cannot run this 32-bit guest's IRETD (tests/machine/test_smp_guests.py).
Each figure is printed with its ratio to QEMU's; the date, host and command line come
first, as in every pyhv bench. Every process runs under a timeout.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "machine"))

import boot_bench  # noqa: E402
from guestbuild import build  # noqa: E402

from pyhv import images  # noqa: E402

CMDLINE = "console=ttyS0"
MEM_MIB = 128
TIMEOUT_S = 300
K_SMALL, K_BIG = 200, 2000


def pyhv_boot(cpus: int) -> list[str]:
    return [sys.executable, "-m", "pyhv", "run", "--engine", "emu", "--cpus", str(cpus),
            "--mem", f"{MEM_MIB}M", "--append", CMDLINE, "--command", "true",
            "--timeout", str(TIMEOUT_S - 10)]


def qemu_boot(cpus: int, kernel: Path, initrd: Path) -> list[str]:
    return ["qemu-system-x86_64", "-accel", "tcg,thread=single", "-smp", str(cpus), "-M",
            "pc", "-m", str(MEM_MIB), "-nographic", "-no-reboot", "-kernel", str(kernel),
            "-initrd", str(initrd), "-append",
            f"{CMDLINE} {images.command_param('true')}"]


def cpu_seconds(argv: list[str]) -> tuple[float, str]:
    """Host CPU time (user + system) of one process, and its stdout."""
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        killer = None
        try:
            killer = threading.Timer(TIMEOUT_S, p.kill)
            killer.start()
            _, status, ru = os.wait4(p.pid, 0)
        finally:
            if killer is not None:
                killer.cancel()
        out.seek(0)
        text = out.read().decode("latin-1")
    if os.waitstatus_to_exitcode(status) != 0 or "bench: " not in text:
        raise RuntimeError(f"{argv[0]} failed: {text[-500:]}")
    return ru.ru_utime + ru.ru_stime, text


def guest_argv(peer: str, guest: Path, ipis: int, ticks: int) -> list[str]:
    words = f"bench={ipis} ticks={ticks}"
    if peer == "pyhv":
        return [sys.executable, "-m", "pyhv", "run", "--engine", "emu", "--cpus", "2",
                "--kernel", str(guest), "--append", words, "--timeout", str(TIMEOUT_S - 10)]
    return ["qemu-system-x86_64", "-accel", "tcg,thread=single", "-smp", "2", "-M", "pc",
            "-m", "128", "-display", "none", "-serial", "stdio", "-no-reboot", "-kernel",
            str(guest), "-append", words, "-device", "isa-debug-exit,iobase=0xf4,iosize=1"]


def per_op(peer: str, guest: Path, runs: int) -> tuple[float, float]:
    """(µs of host CPU per IPI round trip, per APIC-timer interrupt), medians."""
    rt, tm = [], []
    for _ in range(runs):
        both_small, _ = cpu_seconds(guest_argv(peer, guest, K_SMALL, K_SMALL))
        both_big, _ = cpu_seconds(guest_argv(peer, guest, K_BIG, K_BIG))
        tick_small, _ = cpu_seconds(guest_argv(peer, guest, 1, K_SMALL))
        tick_big, _ = cpu_seconds(guest_argv(peer, guest, 1, K_BIG))
        timer = (tick_big - tick_small) / (K_BIG - K_SMALL)
        both = (both_big - both_small) / (K_BIG - K_SMALL)
        tm.append(timer * 1e6)
        rt.append((both - timer) * 1e6)
    return statistics.median(rt), statistics.median(tm)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one run of each (a smoke test)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    runs = 1 if args.quick else args.runs
    missing = [t for t in ("gcc", "ld", "qemu-system-x86_64") if shutil.which(t) is None]
    if missing:
        print(f"missing {', '.join(missing)}: nothing to compare against")
        return 1
    print(f"smp_bench {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()} "
          f"({os.cpu_count()} CPUs), runs={runs}")
    print(f"reproduce: {shlex.join(['.venv/bin/python', 'bench/smp_bench.py', *sys.argv[1:]])}")
    qv = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                        text=True).stdout.splitlines()[0]
    print(f"peer: {qv}")

    img = images.ensure_linux_image(quiet=True)
    boots: dict[str, list[boot_bench.Boot]] = {}
    for _ in range(runs):
        for cpus in (1, 4):
            for name, argv in ((f"pyhv emu x{cpus}", pyhv_boot(cpus)),
                               (f"QEMU TCG x{cpus}",
                                qemu_boot(cpus, img.kernel_path, img.initrd_path))):
                b = boot_bench.run_boot(argv, timeout=TIMEOUT_S)
                if b.init_s is None or (name.startswith("pyhv") and b.status != 0):
                    print(f"  {name}: failed (status {b.status}, "
                          f"{b.err.strip().splitlines()[-1:]})")
                    continue
                boots.setdefault(name, []).append(b)
    print("\nLinux boot (host wall seconds, median): to /init / to exit")
    med: dict[str, tuple[float, float]] = {}
    for name, bs in boots.items():
        init = statistics.median(b.init_s for b in bs if b.init_s is not None)
        ex = statistics.median(b.exit_s for b in bs)
        med[name] = (init, ex)
        print(f"  {name:16} {init:7.2f} s  {ex:7.2f} s")
    for cpus in (1, 4):
        p, q = med.get(f"pyhv emu x{cpus}"), med.get(f"QEMU TCG x{cpus}")
        if p and q:
            print(f"  ratio pyhv/QEMU, {cpus} vCPU{'s' if cpus > 1 else ''}: "
                  f"{p[0] / q[0]:.2f}x to /init, {p[1] / q[1]:.2f}x to exit")
    if "pyhv emu x1" in med and "pyhv emu x4" in med:
        print(f"  pyhv 4 vCPUs / 1 vCPU: {med['pyhv emu x4'][0] / med['pyhv emu x1'][0]:.2f}x"
              " to /init")

    with tempfile.TemporaryDirectory() as d:
        guest = build("smp", Path(d))
        print(f"\nIPI round trip and APIC-timer interrupt, host CPU per operation "
              f"(K={K_SMALL} and {K_BIG}, median of {runs}):")
        costs = {peer: per_op(peer, guest, runs) for peer in ("pyhv", "qemu")}
    (prt, ptm), (qrt, qtm) = costs["pyhv"], costs["qemu"]
    print(f"  IPI round trip   pyhv emu {prt:8.1f} us   QEMU TCG {qrt:8.1f} us   "
          f"{prt / qrt if qrt > 0 else float('nan'):.1f}x")
    print(f"  timer interrupt  pyhv emu {ptm:8.1f} us   QEMU TCG {qtm:8.1f} us   "
          f"{ptm / qtm if qtm > 0 else float('nan'):.1f}x")
    print("  kvm: not measured (KVM-PVM cannot run the guest's 32-bit IRETD)")
    return 0


if __name__ == "__main__":
    t0 = time.monotonic()
    rc = main()
    print(f"(took {time.monotonic() - t0:.0f} s)")
    sys.exit(rc)
