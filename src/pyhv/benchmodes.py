"""`pyhv bench modes`: trap-and-emulate, binary translation, paravirtualization, hardware
assist and a software CPU, measured on the same small kernels (issue 13's comparison).

Design. The kernel is tests/guests/trap/modes.S, built two ways from one source through
pvops.h: the native build runs on trap, bt, kvm and emu, the PV build (-DPV) on pv. Its
command line picks a loop and an iteration count N (see LOOPS); it prints
"modes: <loop> <N> <checksum>" and exits with status 75. Every run is a real
`python -m pyhv run` subprocess with a timeout. The compute loop also runs as a Linux
process (tests/guests/trap/modes_native.S: the "native" column); the other loops are
privileged and cannot run in a process. QEMU's TCG ("qemu") runs the native build behind
a 32-bit multiboot shim (tests/guests/trap/modes_qemu.S, converted to ELF32 with
objcopy), as QEMU's -kernel does not load a long-mode ELF64.

Invariants:
- A cost is host-measured: for counts n1 < n2, (wall(n2) - wall(n1)) / (n2 - n1) /
  ops-per-iteration, so process start, machine build and boot cancel out. The median
  over `repeat` pairs is reported. The in-guest count is checked: a run whose output
  does not echo the requested N with status 75 is a failure, never a number.
- A failed (engine, loop) is reported with pyhv's own reason (its last stderr line),
  never silently dropped and never retried with other settings.
- No number is assumed: targets are evaluated from what this run measured.
- The guest sources live in the repository (tests/guests): without them, or without
  gcc/ld, the command fails with a clear message (HostError).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyhv.errors import HostError

ROOT = Path(__file__).resolve().parents[2]
GUESTS = ROOT / "tests" / "guests"
ENGINES = ("trap", "bt", "pv", "kvm", "emu", "qemu", "native")
QEMU = ["qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", "128", "-nodefaults",
        "-display", "none", "-no-reboot", "-serial", "stdio",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]
STATUS_OK = 75


@dataclass(frozen=True)
class Loop:
    name: str
    ops: int            # operations per iteration
    op: str             # what one operation is
    counts: dict[str, tuple[int, int]]   # engine -> (n1, n2)


# Counts: each difference a fraction of a second to ~2 s on this host (docs/host.md),
# well above Python's start-up noise (~50 ms).
LOOPS: tuple[Loop, ...] = (
    Loop("priv", 4, "CLI, STI, IN or OUT",
         {"trap": (10, 510), "bt": (10, 1010), "pv": (10, 1010), "kvm": (10, 3010),
          "emu": (10, 50_010), "qemu": (10, 10_000_010)}),
    Loop("pt", 32, "page-table update (native: store + INVLPG; pv: 1/32 of a batch)",
         {"trap": (1, 101), "bt": (1, 201), "pv": (1, 3001), "kvm": (1, 3001),
          "emu": (1, 20_001), "qemu": (1, 200_001)}),
    Loop("sys", 1, "INT 0x2f + IRETQ round trip, kernel to kernel",
         {"trap": (10, 1010), "bt": (1000, 5_000_000), "pv": (10, 1010), "kvm": (1, 11),
          "emu": (10, 10_010), "qemu": (10, 5_000_010)}),
    Loop("usys", 1, "INT 0x2e from user mode (CPL 3) + IRETQ back",
         {"trap": (10, 1010), "bt": (10, 1010), "pv": (10, 1010), "kvm": (1, 11),
          "emu": (10, 5010), "qemu": (10, 5_000_010)}),
    Loop("cpu", 1000, "imul/add/xor/dec/jnz round",
         {"trap": (1000, 1_500_000), "bt": (1000, 1_500_000), "pv": (1000, 1_500_000),
          "kvm": (5, 45), "emu": (1000, 300_000), "qemu": (1, 300_001),
          "native": (1000, 1_500_000)}),
)

LOOP_NAMES = tuple(lp.name for lp in LOOPS)


@dataclass
class Results:
    """Per-operation seconds by (loop, engine); failures by (loop, engine) -> reason."""
    cost: dict[tuple[str, str], float] = field(default_factory=dict)
    failed: dict[tuple[str, str], str] = field(default_factory=dict)
    counts: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)


def _run(cmd: list[str], timeout: float) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise HostError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")


def build(out: Path) -> dict[str, Path]:
    """Build the native and PV kernels, QEMU's multiboot kernel and the native program
    into `out`: {"native-kernel", "pv-kernel", "qemu-kernel", "native-program"}."""
    for tool in ("gcc", "ld", "objcopy"):
        if shutil.which(tool) is None:
            raise HostError(f"bench modes: {tool} is not installed (scripts/setup.sh)")
    src = GUESTS / "trap" / "modes.S"
    if not src.is_file():
        raise HostError(f"bench modes: {src} not found: run it from a pyhv checkout")
    paths: dict[str, Path] = {}
    for key, defs, name, entry in (("native-kernel", [], "modes.S", "start"),
                                   ("pv-kernel", ["-DPV"], "modes.S", "start"),
                                   ("qemu-kernel", [], "modes_qemu.S", "qemu_start")):
        obj, img = out / f"{key}.o", out / f"{key}.elf"
        _run(["gcc", "-c", *defs, f"-I{GUESTS / 'trap'}", f"-I{GUESTS / 'core'}", "-o",
              str(obj), str(GUESTS / "trap" / name)], 60)
        _run(["ld", "-m", "elf_x86_64", "-T", str(GUESTS / "core" / "guest.ld"), "-e",
              entry, "-z", "max-page-size=0x1000", "-z", "noexecstack", "--build-id=none",
              "-o", str(img), str(obj)], 60)
        paths[key] = img
    _run(["objcopy", "-O", "elf32-i386", str(paths["qemu-kernel"]),
          str(out / "qemu-kernel32.elf")], 60)
    paths["qemu-kernel"] = out / "qemu-kernel32.elf"
    prog = out / "modes_native"
    _run(["gcc", "-o", str(prog), str(GUESTS / "trap" / "modes_native.S")], 60)
    paths["native-program"] = prog
    return paths


def argv_for(engine: str, loop: str, n: int, paths: dict[str, Path],
             timeout: float) -> list[str]:
    """The command line of one run (what a person types to reproduce one point)."""
    if engine == "native":
        return [str(paths["native-program"]), str(n)]
    if engine == "qemu":
        return [*QEMU, "-kernel", str(paths["qemu-kernel"]), "-append", f"{loop} {n}"]
    kernel = paths["pv-kernel" if engine == "pv" else "native-kernel"]
    return [sys.executable, "-m", "pyhv", "run", "--engine", engine, "--kernel",
            str(kernel), "--append", f"{loop} {n}", "--timeout", str(timeout)]


class RunFailed(Exception):
    pass


def run_once(engine: str, loop: str, n: int, paths: dict[str, Path],
             timeout: float) -> float:
    """Wall seconds of one run; RunFailed with pyhv's reason unless it echoes N."""
    argv = argv_for(engine, loop, n, paths, timeout)
    if shutil.which(argv[0]) is None and not Path(argv[0]).is_file():
        raise RunFailed(f"{argv[0]} is not installed")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(argv, capture_output=True, timeout=timeout + 30,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise RunFailed(f"no answer in {timeout + 30:.0f} s") from e
    dt = time.perf_counter() - t0
    out = p.stdout.decode("latin-1")
    want_rc = 0 if engine == "native" else STATUS_OK
    if p.returncode != want_rc or not out.startswith(f"modes: {loop} {n} "):
        err = (p.stderr.decode("latin-1", "replace").strip().splitlines()
               or out.strip().splitlines() or ["no output"])
        raise RunFailed(f"status {p.returncode}: "
                        + err[-1].removeprefix("pyhv: ")[:200])
    return dt


def measure(engines: Sequence[str], repeat: int, scale: float, paths: dict[str, Path],
            timeout: float = 120.0, loops: Sequence[str] = LOOP_NAMES,
            progress: Callable[[str], None] | None = None) -> Results:
    """Every (loop, engine) pair the engines and loops ask for; `scale` multiplies each
    count difference (at least 1 iteration more)."""
    res = Results()
    for lp in LOOPS:
        if lp.name not in loops:
            continue
        for e in engines:
            if e not in lp.counts:
                continue
            n1, n2 = lp.counts[e]
            n2 = n1 + max(1, round((n2 - n1) * scale))
            res.counts[(lp.name, e)] = (n1, n2)
            if progress is not None:
                progress(f"{lp.name} on {e} ({n1}/{n2} x{repeat})")
            samples = []
            try:
                for _ in range(repeat):
                    t1 = run_once(e, lp.name, n1, paths, timeout)
                    t2 = run_once(e, lp.name, n2, paths, timeout)
                    samples.append((t2 - t1) / (n2 - n1) / lp.ops)
            except RunFailed as err:
                res.failed[(lp.name, e)] = str(err)
                continue
            res.cost[(lp.name, e)] = statistics.median(samples)
    return res


def fmt(seconds: float) -> str:
    """A cost with a unit a person reads at a glance (may be negative at tiny counts)."""
    a = abs(seconds)
    if a >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    if a >= 1e-6:
        return f"{seconds * 1e6:.2f} us"
    return f"{seconds * 1e9:.1f} ns"


def targets(res: Results) -> list[tuple[str, str]]:
    """The issue's three targets, each (statement, verdict) from this run's numbers."""
    out: list[tuple[str, str]] = []

    def ratio(a: tuple[str, str], b: tuple[str, str]) -> float | None:
        x, y = res.cost.get(a), res.cost.get(b)
        return None if x is None or y is None or y <= 0 else x / y

    r = ratio(("priv", "trap"), ("priv", "bt"))
    out.append(("bt >= 10x faster than trap on priv",
                "not measured" if r is None else
                f"{'met' if r >= 10 else 'NOT met'}: {r:.2f}x"))
    r = ratio(("pt", "bt"), ("pt", "pv"))
    out.append(("pv faster than bt on pt",
                "not measured" if r is None else
                f"{'met' if r > 1 else 'NOT met'}: pv {r:.1f}x faster"))
    r = ratio(("cpu", "bt"), ("cpu", "trap"))
    out.append(("bt's cpu within 10% of trap's",
                "not measured" if r is None else
                f"{'met' if abs(r - 1) <= 0.10 else 'NOT met'}: bt/trap {r:.3f}"))
    return out


def table(res: Results, engines: Sequence[str]) -> str:
    """One text table: per-operation cost per engine and, per loop, trap's cost over
    each engine's (how many times faster than trap); then failures and targets."""
    cols = [e for e in engines]
    w = 11
    lines = [f"{'loop':5} {'':9}" + "".join(f"{e:>{w}}" for e in cols)]
    for lp in LOOPS:
        cells, ratios = [], []
        base = res.cost.get((lp.name, "trap"))
        for e in cols:
            c = res.cost.get((lp.name, e))
            if c is None:
                cells.append("-" if (lp.name, e) not in res.failed else "failed")
                ratios.append("")
            else:
                cells.append(fmt(c))
                ratios.append(f"{base / c:.3g}x" if base and c > 0 else "")
        lines.append(f"{lp.name:5} {'per op':9}" + "".join(f"{c:>{w}}" for c in cells))
        lines.append(f"{'':5} {'trap/this':9}" + "".join(f"{r:>{w}}" for r in ratios))
    lines.append("")
    for lp in LOOPS:
        lines.append(f"  {lp.name}: one op = {lp.op}; {lp.ops} per iteration")
    if res.failed:
        lines.append("")
        lines.append("could not run:")
        for (loop, e), why in res.failed.items():
            lines.append(f"  {loop} on {e}: {why}")
    lines.append("")
    lines.append("targets (issue 13):")
    for what, verdict in targets(res):
        lines.append(f"  {what}: {verdict}")
    return "\n".join(lines)
