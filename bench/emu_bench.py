"""Benchmark: pyhv's emu engine against QEMU's TCG, like for like, through `pyhv run`.

    .venv/bin/python bench/emu_bench.py [--runs 5] [--quick] [--no-kvm]

Every figure runs the same guest image as whole processes on both sides:
`pyhv run --engine emu --kernel IMG` and `qemu-system-x86_64 -accel tcg -M pc -kernel
IMG` (multiboot v1 ELF images, output on COM1, end through isa-debug-exit), interleaved,
median of `--runs`. Nothing of pyhv runs in this process.

CPU (bench/guests/sieve.S: a prime sieve over 1 MiB, ROUNDS rounds, paging off):
  (a) whole processes, wall time: total = t(large) (start-up included: Python's on
      pyhv, SeaBIOS on QEMU); per round = (t(large) - t(small)) / (large - small)
  (b) in the guest: each round timed with RDTSC and printed by the guest itself (QEMU's
      TCG returns the host's TSC, and so does pyhv's emu with PYHV_EMU_CPU_HELPERS=0, set
      here); per round = the median of rounds 2..N
      of a large run (the first round includes translation), median over runs
  and the same sieve code as a static host program (-DHOST), timed the same way.

Timer interrupts (bench/guests/timer.S: PIT 1 kHz through the 8259, HLT loop, the
handler EOIs): the rate in guest time (ticks per 2 seconds of the guest's RTC), and the
host cost of one interrupt = the process's CPU time (user + system, from wait4) per
tick, (cpu(large) - cpu(small)) / (large - small). pyhv paces an idle guest to host time,
so both run the ticks in real time; the CPU time is what each one spends on them.

kvm: the 1-round sieve on `pyhv run --engine kvm` too (where /dev/kvm is KVM-PVM every
instruction of this CPL 0 guest is emulated by KVM: docs/host.md), whole processes.

Ratios are pyhv / QEMU (lower is better). Absolute times on these shared machines are
noise (docs/host.md): quote the ratios of one run. Every subprocess has a timeout.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "bench" / "guests"
LINK = GUESTS / "bench.ld"
PYHV = [sys.executable, "-m", "pyhv"]
TIMEOUT_S = 300                  # the guest's --timeout and every subprocess's (+ margin)
EXIT_OK = 1                      # isa-debug-exit with 0
PRIMES = "00014069"              # primes below 2^20, in hex
QEMU = ["qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", "64", "-nodefaults",
        "-display", "none", "-no-reboot", "-serial", "stdio",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]


# ---------------------------------------------------------------------- building

def sh(argv: list[str]) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise SystemExit(f"build failed: {shlex.join(argv)}\n{p.stderr}")


def build_guest(src: str, defines: dict[str, int], out: Path) -> Path:
    tag = "_".join(f"{k}{v}" for k, v in defines.items())
    obj, elf = out / f"{Path(src).stem}_{tag}.o", out / f"{Path(src).stem}_{tag}.elf"
    sh(["gcc", "-m32", "-c", *(f"-D{k}={v}" for k, v in defines.items()), "-o", str(obj),
        str(GUESTS / src)])
    sh(["ld", "-m", "elf_i386", "-T", str(LINK), "-z", "max-page-size=0x1000",
        "--build-id=none", "-o", str(elf), str(obj)])
    return elf


def build_host_sieve(rounds: int, out: Path) -> Path:
    obj, exe = out / f"sieve_host{rounds}.o", out / f"sieve_host{rounds}"
    sh(["gcc", "-m32", "-c", "-DHOST", f"-DROUNDS={rounds}", "-o", str(obj),
        str(GUESTS / "sieve.S")])
    sh(["ld", "-m", "elf_i386", "-Ttext", "0x100000", "-Tbss", "0x200000", "-e", "start",
        "-o", str(exe), str(obj)])
    return exe


def tsc_hz(out: Path) -> float | None:
    """The host's TSC rate, measured by bench/guests/tsc_hz.c (None if that fails)."""
    exe = out / "tsc_hz"
    sh(["gcc", "-O2", "-o", str(exe), str(GUESTS / "tsc_hz.c")])
    p = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30)
    try:
        return float(p.stdout.split()[0])
    except (IndexError, ValueError):
        return None


# ---------------------------------------------------------------------- running

@dataclass
class Proc:
    wall: float                  # seconds
    cpu: float                   # user + system seconds of the process
    out: str                     # stdout
    err: str                     # stderr


def run(argv: list[str], what: str, want: int = EXIT_OK) -> Proc:
    """Run a whole process under a timeout; it must end with status `want` (the guests:
    debug-exit with 0). CPU time from wait4's rusage (microseconds)."""
    t0 = time.perf_counter()
    # PYHV_EMU_CPU_HELPERS=0: RDTSC reads the host's TSC on emu, as on QEMU's TCG, so
    # the guest's per-round figure is in host cycles on both (emu's TSC otherwise runs on
    # virtual time, docs/emu.md); the helpers do not take part in the sieve's code
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL,
                         env={**os.environ, "PYHV_EMU_CPU_HELPERS": "0"})
    chunks: dict[str, bytes] = {}

    def drain(name: str, f: IO[bytes]) -> None:
        chunks[name] = f.read()

    readers = [threading.Thread(target=drain, args=(n, f), daemon=True)
               for n, f in (("out", p.stdout), ("err", p.stderr))]
    for t in readers:
        t.start()
    killer = threading.Timer(TIMEOUT_S + 60, p.kill)
    killer.start()
    try:
        _, status, ru = os.wait4(p.pid, 0)
    finally:
        killer.cancel()
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    for t in readers:
        t.join(timeout=60)
    out = chunks.get("out", b"").decode("utf-8", "replace")
    err = chunks.get("err", b"").decode("utf-8", "replace")
    if p.returncode != want:
        raise SystemExit(f"{what}: status {p.returncode} (wanted {want}): "
                         f"{shlex.join(argv)}\n{out[-1000:]}{err[-2000:]}")
    return Proc(wall, ru.ru_utime + ru.ru_stime, out, err)


def pyhv_cmd(img: Path, engine: str = "emu", *extra: str) -> list[str]:
    return [*PYHV, "run", "--engine", engine, "--mem", "64M", "--kernel", str(img),
            "--timeout", str(TIMEOUT_S), *extra]


def qemu_cmd(img: Path) -> list[str]:
    return [*QEMU, "-kernel", str(img)]


def show(argv: list[str]) -> str:
    return shlex.join(argv).replace(f"{sys.executable} -m pyhv", "pyhv")


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def runs_line(xs: list[float], scale: float, unit: str) -> str:
    return ", ".join(f"{x * scale:.2f}" for x in xs) + f" {unit}"


# ---------------------------------------------------------------------- CPU

ROUND = re.compile(r"^round ([0-9a-f]{16})$", re.M)


def rounds_of(out: str, n: int, what: str) -> list[int]:
    got = [int(x, 16) for x in ROUND.findall(out)]
    if len(got) != n or f"primes {PRIMES}" not in out:
        raise SystemExit(f"{what}: unexpected output {out[-500:]!r}")
    return got


def cpu_bench(tmp: Path, runs: int, small: int, large: int, hz: float | None) -> None:
    imgs = {n: build_guest("sieve.S", {"ROUNDS": n}, tmp) for n in (small, large)}
    hosts = {n: build_host_sieve(n, tmp) for n in (small, large)}
    print(f"\nCPU: bench/guests/sieve.S, ROUNDS={small} and {large}, median of {runs} runs")
    print(f"  pyhv:   {show(pyhv_cmd(imgs[large]))}")
    print(f"  qemu:   {show(qemu_cmd(imgs[large]))}")
    print("  native: the same sieve code as a static Linux i386 program (sieve.S -DHOST)")
    stats = run(pyhv_cmd(imgs[small], "emu", "--stats"), "pyhv --stats").err
    keys = ("blocks executed", "blocks counted in unicorn's TB-start helper",
            "per-access exit checks", "tlb mode switches")
    found = [f"{k} {m.group(1)}" for k in keys
             if (m := re.search(rf"emu: {re.escape(k)}\s*\S\s*(\d+)", stats))]
    print(f"  pyhv --stats (ROUNDS={small}): {', '.join(found)}")
    wall: dict[str, dict[int, list[float]]] = {k: {small: [], large: []}
                                               for k in ("pyhv", "qemu", "native")}
    per_round: dict[str, list[float]] = {k: [] for k in wall}
    first: dict[str, list[float]] = {k: [] for k in wall}
    for _ in range(runs):                 # interleaved: host noise hits all alike
        for n in (small, large):
            for who, argv in (("native", [str(hosts[n])]), ("qemu", qemu_cmd(imgs[n])),
                              ("pyhv", pyhv_cmd(imgs[n]))):
                p = run(argv, who, 0 if who == "native" else EXIT_OK)
                wall[who][n].append(p.wall)
                if n == large:
                    r = rounds_of(p.out, large, who)
                    first[who].append(r[0])
                    per_round[who].append(med([float(x) for x in r[1:]]))
    print("  (a) whole processes, wall time:")
    for who in wall:
        for n in (small, large):
            print(f"      {who:6s} ROUNDS={n:<3d} median {med(wall[who][n]):7.3f} s  "
                  f"({runs_line(wall[who][n], 1, 's')})")
    marg = {w: (med(wall[w][large]) - med(wall[w][small])) / (large - small) for w in wall}
    for who in ("qemu", "native"):
        print(f"      pyhv/{who:6s}: total {med(wall['pyhv'][large]) / med(wall[who][large]):6.2f}x"
              f"   per round {marg['pyhv'] / marg[who]:6.2f}x   (per round: pyhv "
              f"{marg['pyhv'] * 1e3:.2f} ms, {who} {marg[who] * 1e3:.2f} ms)")
    print("  (b) in the guest: TSC cycles per round (median of rounds 2..N, median of runs)"
          + (f", at {hz / 1e9:.3f} GHz" if hz else ""))
    for who in per_round:
        ms = f" = {med(per_round[who]) / hz * 1e3:6.2f} ms" if hz else ""
        print(f"      {who:6s} {med(per_round[who]) / 1e6:8.2f} M cycles{ms}; first round "
              f"{med(first[who]) / 1e6:.2f} M  (runs: "
              f"{runs_line(per_round[who], 1e-6, 'M')})")
    p_q = med(per_round["pyhv"]) / med(per_round["qemu"])
    print(f"      per round pyhv/qemu {p_q:.2f}x   pyhv/native "
          f"{med(per_round['pyhv']) / med(per_round['native']):.2f}x   qemu/native "
          f"{med(per_round['qemu']) / med(per_round['native']):.2f}x")


# ---------------------------------------------------------------------- timer

RATE = re.compile(r"^rate: ([0-9a-f]{8}) ticks in 2 s of RTC time$", re.M)
TICKS = re.compile(r"^ticks: ([0-9a-f]{8}) in ([0-9a-f]{16}) TSC cycles$", re.M)


def timer_bench(tmp: Path, runs: int, small: int, large: int, hz: float | None) -> None:
    rate_img = build_guest("timer.S", {"RATE": 1}, tmp)
    imgs = {n: build_guest("timer.S", {"TICKS": n}, tmp) for n in (small, large)}
    print(f"\nTimer interrupts: bench/guests/timer.S, PIT 1000.2 Hz, {small} and {large} "
          f"ticks, median of {runs} runs")
    print(f"  pyhv: {show(pyhv_cmd(imgs[large]))}")
    print(f"  qemu: {show(qemu_cmd(imgs[large]))}")
    for who, argv in (("pyhv", pyhv_cmd(rate_img)), ("qemu", qemu_cmd(rate_img))):
        m = RATE.search(run(argv, who).out)
        if not m:
            raise SystemExit(f"{who}: no rate line")
        print(f"  rate in guest time, {who}: {int(m.group(1), 16) / 2:.1f} interrupts per "
              "second of the guest's RTC")
    cpu: dict[str, dict[int, list[float]]] = {k: {small: [], large: []} for k in ("pyhv", "qemu")}
    period: dict[str, list[float]] = {k: [] for k in cpu}
    for _ in range(runs):
        for n in (small, large):
            for who, argv in (("qemu", qemu_cmd(imgs[n])), ("pyhv", pyhv_cmd(imgs[n]))):
                p = run(argv, who)
                m = TICKS.search(p.out)
                if not m or int(m.group(1), 16) != n:
                    raise SystemExit(f"{who}: unexpected output {p.out[-300:]!r}")
                cpu[who][n].append(p.cpu)
                if n == large:
                    period[who].append(int(m.group(2), 16) / n)
    cost = {w: (med(cpu[w][large]) - med(cpu[w][small])) / (large - small) for w in cpu}
    for who in cpu:
        per = (f"{med(period[who]) / hz * 1e3:.3f} ms" if hz else
               f"{med(period[who]) / 1e6:.2f} M TSC cycles")
        print(f"  {who}: host CPU per interrupt {cost[who] * 1e6:7.1f} us   (CPU, "
              f"{small} ticks: {runs_line(cpu[who][small], 1e3, 'ms')}; {large} ticks: "
              f"{runs_line(cpu[who][large], 1e3, 'ms')}); tick period seen by the guest's "
              f"TSC {per}")
    print(f"  host CPU per interrupt pyhv/qemu {cost['pyhv'] / cost['qemu']:.2f}x "
          "(wake from HLT, delivery through the IDT, handler, EOI, IRET, and the idle wait)")


# ---------------------------------------------------------------------- kvm

def kvm_bench(tmp: Path, runs: int) -> None:
    from pyhv.host import probe_host
    r = probe_host()
    print(f"\nkvm: /dev/kvm is {r.kind} ({r.kind_reason})")
    if not r.kvm_usable:
        print("  skipped")
        return
    img = build_guest("sieve.S", {"ROUNDS": 1}, tmp)
    print(f"  the 1-round sieve as whole processes: {show(pyhv_cmd(img, 'kvm'))}")
    wall: dict[str, list[float]] = {k: [] for k in ("kvm", "emu", "qemu")}
    for _ in range(runs):
        wall["qemu"].append(run(qemu_cmd(img), "qemu").wall)
        wall["emu"].append(run(pyhv_cmd(img, "emu"), "pyhv emu").wall)
        wall["kvm"].append(run(pyhv_cmd(img, "kvm"), "pyhv kvm").wall)
    for k, xs in wall.items():
        print(f"      {k:5s} median {med(xs):7.3f} s  ({runs_line(xs, 1, 's')})")
    print(f"  kvm/qemu-tcg {med(wall['kvm']) / med(wall['qemu']):.1f}x   kvm/emu "
          f"{med(wall['kvm']) / med(wall['emu']):.1f}x   (start-up included)")


# ---------------------------------------------------------------------- main

def versions() -> str:
    q = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True,
                       timeout=30).stdout.split("\n")[0]
    try:
        uc = importlib.metadata.version("unicorn")
    except importlib.metadata.PackageNotFoundError:
        uc = "not installed"
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"host CPU {cpu}, {os.cpu_count()} CPUs; {q.strip()}; unicorn {uc}"


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=None, help="runs per figure (default 5)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 run, small sizes")
    ap.add_argument("--small", type=int, default=2, help="sieve rounds, short run")
    ap.add_argument("--large", type=int, default=None, help="sieve rounds, long run (30)")
    ap.add_argument("--ticks-small", type=int, default=None, help="(200)")
    ap.add_argument("--ticks-large", type=int, default=None, help="(2000)")
    ap.add_argument("--no-kvm", action="store_true", help="skip the kvm figure")
    ap.add_argument("--kvm-runs", type=int, default=None, help="(3)")
    ap.add_argument("--only", choices=("cpu", "timer", "kvm"), default=None)
    a = ap.parse_args()
    runs = a.runs or (1 if a.quick else 5)
    large = a.large or (4 if a.quick else 30)
    tsmall = a.ticks_small or (20 if a.quick else 200)
    tlarge = a.ticks_large or (100 if a.quick else 2000)
    missing = [t for t in ("gcc", "ld", "qemu-system-x86_64") if shutil.which(t) is None]
    if missing:
        print(f"missing tools: {', '.join(missing)}")
        return 2
    if large <= a.small or tlarge <= tsmall:
        raise SystemExit("the large sizes must be above the small ones")
    os.environ["PYTHONPATH"] = str(ROOT / "src")
    sys.path.insert(0, str(ROOT / "src"))
    print(f"emu_bench: {time.strftime('%Y-%m-%d %H:%M %Z')}; {versions()}")
    print(f"reproduce: {shlex.join(['.venv/bin/python', 'bench/emu_bench.py', *sys.argv[1:]])}")
    with tempfile.TemporaryDirectory(prefix="emu-bench-") as d:
        tmp = Path(d)
        hz = tsc_hz(tmp)
        if a.only in (None, "cpu"):
            cpu_bench(tmp, runs, a.small, large, hz)
        if a.only in (None, "timer"):
            timer_bench(tmp, runs, tsmall, tlarge, hz)
        if a.only in (None, "kvm") and not a.no_kvm:
            kvm_bench(tmp, a.kvm_runs or (1 if a.quick else 3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
