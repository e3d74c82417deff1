"""Trap-and-emulate vs binary translation vs hardware assist vs software CPU, on the
same guest kernel.

Runs tests/guests/trap/bench.S (an ELF64 kernel entered at CPL 0) through the real
`pyhv run` on the trap, bt, kvm and emu engines, in one run:

    priv   a loop of CLI; STI; IN; OUT: four privileged instructions per iteration,
           four traps under the trap engine, two call-outs under bt (IN, OUT)
    flags  a loop of CLI; PUSHFQ; STI; POPFQ: two traps under trap, none under bt
    sys    a loop of INT 0x2f to a handler that returns with IRETQ: two traps under
           trap, none under bt (not on kvm: KVM-PVM does not emulate INT n at CPL 0)
    cpu    a loop of 1000 multiply/add/xor rounds per iteration: no privileged
           instruction (native CPL 3 under trap, KVM-PVM's instruction emulator at
           CPL 0 under kvm, unicorn under emu)

Each (engine, loop) runs at two iteration counts; the time per iteration is the
difference of the two wall times over the difference of the counts, so process start,
machine build and guest boot cancel out. Each pair is repeated (--repeat, default 3)
and the median is reported, with the ratios against trap. Numbers are only comparable
within one run (docs/host.md: shared, noisy machines).

    python bench/trap_bench.py [--repeat N] [--engines trap,bt,kvm,emu] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "tests" / "guests"
ENGINES = ("trap", "bt", "kvm", "emu")
# (n1, n2) iteration counts per loop and engine: each run a fraction of a second to a
# few seconds on this host (kvm's CPL 0 code is emulated, ~2,500x slower than native);
# the difference must be well above Python's start-up noise (~50 ms): emu's priv loop
# (~5 us an iteration) needs 100,000 more iterations for that.
COUNTS: dict[str, dict[str, tuple[int, int]]] = {
    "priv": {"trap": (200, 2200), "bt": (200, 4200), "kvm": (200, 4200),
             "emu": (200, 100_200)},
    "flags": {"trap": (200, 4200), "bt": (1000, 20_000_000), "kvm": (200, 4200),
              "emu": (200, 200_200)},
    "sys": {"trap": (200, 4200), "bt": (1000, 4_000_000), "emu": (200, 100_200)},
    "cpu": {"trap": (1000, 200_000), "bt": (1000, 200_000), "kvm": (5, 45),
            "emu": (1000, 30_000)},
}
LOOPS = ("priv", "flags", "sys", "cpu")
STATUS_OK = 75
TIMEOUT_S = 120.0


def build(out: Path) -> Path:
    """Assemble and link the bench kernel (ELF64 at 1 MiB)."""
    for tool in ("gcc", "ld"):
        if shutil.which(tool) is None:
            sys.exit(f"trap_bench: {tool} is not installed")
    obj, img = out / "bench.o", out / "bench.elf"
    subprocess.run(["gcc", "-c", f"-I{GUESTS / 'trap'}", f"-I{GUESTS / 'core'}", "-o",
                    str(obj), str(GUESTS / "trap" / "bench.S")], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-T", str(GUESTS / "core" / "guest.ld"),
                    "-z", "max-page-size=0x1000", "-z", "noexecstack", "--build-id=none",
                    "-o", str(img), str(obj)], check=True)
    return img


def run_once(img: Path, engine: str, loop: str, n: int) -> float:
    """Wall seconds of one `pyhv run` of the bench kernel."""
    argv = [sys.executable, "-m", "pyhv", "run", "--engine", engine, "--kernel", str(img),
            "--append", f"{loop} {n}", "--timeout", str(TIMEOUT_S)]
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, timeout=TIMEOUT_S + 30,
                       stdin=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    expected = f"bench: {loop} {n} "
    if p.returncode != STATUS_OK or not p.stdout.decode("latin-1").startswith(expected):
        raise RuntimeError(f"{' '.join(argv)}: status {p.returncode}\n"
                           f"{p.stdout.decode('latin-1')}{p.stderr.decode('latin-1')}")
    return dt


def per_iteration(img: Path, engine: str, loop: str, repeat: int) -> float:
    n1, n2 = COUNTS[loop][engine]
    samples = []
    for _ in range(repeat):
        t1 = run_once(img, engine, loop, n1)
        t2 = run_once(img, engine, loop, n2)
        samples.append((t2 - t1) / (n2 - n1))
    return statistics.median(samples)


def fmt(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us / 1000:9.3f} ms" if us >= 1000 else f"{us:9.3f} us"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help="comma-separated subset of trap,kvm,emu")
    ap.add_argument("--quick", action="store_true", help="smaller counts, one repeat")
    args = ap.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    for e in engines:
        if e not in ENGINES:
            ap.error(f"unknown engine {e!r}")
    if args.quick:
        args.repeat = 1
        for loop in COUNTS.values():
            for e, (n1, n2) in loop.items():
                loop[e] = (n1, n1 + max(1, (n2 - n1) // 5))
    cmd = " ".join(["python", "bench/trap_bench.py", "--repeat", str(args.repeat),
                    "--engines", ",".join(engines)] + (["--quick"] if args.quick else []))
    cpu = next((ln.split(":", 1)[1].strip() for ln in
                Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown")
    print(f"trap_bench: {time.strftime('%Y-%m-%d %H:%M')}, host CPU {cpu}, "
          f"median of {args.repeat}")
    print(f"reproduce: {cmd}")
    with tempfile.TemporaryDirectory(prefix="trap-bench-") as tmp:
        img = build(Path(tmp))
        results: dict[tuple[str, str], float] = {}
        for loop in LOOPS:
            for e in engines:
                if e in COUNTS[loop]:
                    results[(loop, e)] = per_iteration(img, e, loop, args.repeat)
    print(f"\n{'loop':6} {'engine':6} {'per iteration':>14} {'vs trap':>9}   counts")
    for loop in LOOPS:
        base = results.get((loop, "trap"))
        for e in engines:
            if (loop, e) not in results:
                continue
            t = results[(loop, e)]
            ratio = f"{t / base:8.2f}x" if base else "        -"
            n1, n2 = COUNTS[loop][e]
            print(f"{loop:6} {e:6} {fmt(t):>14} {ratio:>9}   {n1}/{n2}")
    if ("priv", "trap") in results:
        print(f"\ntrap: {fmt(results[('priv', 'trap')] / 4).strip()} per trapped "
              "instruction (4 per priv iteration)")
    print("\nper iteration = (wall(n2) - wall(n1)) / (n2 - n1), median of "
          f"{args.repeat}; cpu iteration = 1000 rounds of imul/add/xor/dec/jnz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
