"""Benchmark: the emu engine against QEMU's TCG on the same CPU-bound multiboot guest.

    python bench/emu_bench.py [--runs 5] [--small 2] [--large 30]

The guest (tests/guests/emu/bench_cpu.S) sieves primes below 2^20 REPEAT times and exits
through isa-debug-exit. It is built twice (REPEAT=small and REPEAT=large) into ELF32
multiboot images that pyhv's multiboot loader and `qemu-system-x86_64 -kernel` both boot.
Each configuration runs `--runs` times; the median wall time is reported, and:

    total ratio     emu / QEMU for the large image, start-up included (QEMU: whole
                    process; emu: engine creation + load + run, Python already started)
    marginal ratio  emu / QEMU for (large - small): the per-round cost, start-up removed

Ratios only: absolute times on these shared machines are noise (HOST.md). An
interrupt-delivery figure comes last: a guest sleeping in HLT woken by a 1 kHz virtual
timer for 5 s of guest time, reported as the host cost per delivered interrupt.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests" / "emu"))

from pyhv.arch.x86.cpustate import CR0_ET, CR0_PE, CpuState, Segment  # noqa: E402
from pyhv.engines.emu import EmuEngine  # noqa: E402
from pyhv.exits import Halt, InternalError, Interrupted, Shutdown  # noqa: E402
from pyhv.memory import GuestMemory  # noqa: E402

SRC = ROOT / "tests" / "guests" / "emu" / "bench_cpu.S"
EXPECT = "00014069"


def build(repeat: int, tmp: Path) -> Path:
    obj, elf = tmp / f"bench{repeat}.o", tmp / f"bench{repeat}.elf"
    subprocess.run(["gcc", "-m32", "-c", f"-DREPEAT={repeat}", "-o", str(obj), str(SRC)],
                   check=True)
    subprocess.run(["ld", "-N", "-m", "elf_i386", "-Ttext", "0x100000", "-e", "start", "-o",
                    str(elf), str(obj)], check=True)
    return elf


def qemu_cmd(elf: Path) -> list[str]:
    return ["qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", "64", "-nodefaults",
            "-display", "none", "-no-reboot", "-debugcon", "stdio", "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", str(elf)]


def run_qemu(elf: Path) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(qemu_cmd(elf), capture_output=True, text=True, timeout=600,
                       check=False)
    dt = time.perf_counter() - t0
    if EXPECT not in p.stdout:
        raise SystemExit(f"qemu: unexpected output {p.stdout!r} {p.stderr!r}")
    return dt


def load_multiboot(mem: GuestMemory, elf: Path) -> CpuState:
    """What a multiboot loader does for this guest: PT_LOAD segments at their physical
    addresses, entry in flat 32-bit protected mode with EAX = 0x2BADB002."""
    data = elf.read_bytes()
    entry, phoff = struct.unpack_from("<I", data, 24)[0], struct.unpack_from("<I", data, 28)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 42)
    for i in range(phnum):
        p_type, off, _va, pa, filesz, memsz = struct.unpack_from("<6I", data, phoff + i * phentsize)
        if p_type == 1:
            mem.write(pa, data[off:off + filesz] + bytes(memsz - filesz))
    st = CpuState(rip=entry, rax=0x2BADB002, cr0=CR0_PE | CR0_ET)
    st.cs = Segment.flat(0x08, code=True, bits=32)
    st.ds = st.es = st.fs = st.gs = st.ss = Segment.flat(0x10, code=False, bits=32)
    return st


def run_emu(elf: Path) -> tuple[float, dict[str, int | float]]:
    t0 = time.perf_counter()
    mem = GuestMemory.with_layout([(0, 64 << 20)])
    entry = load_multiboot(mem, elf)
    engine = EmuEngine(mem)
    vcpu = engine.create_vcpu(0)
    out = bytearray()
    done: list[int] = []

    def pio(port: int, size: int, value: int | None) -> int:
        if value is None:
            return (1 << (8 * size)) - 1
        if port == 0xE9:
            out.append(value & 0xFF)
        elif port == 0xF4:
            done.append(value)
            vcpu.kick()
        return 0

    vcpu.attach_io(pio, None)  # type: ignore[attr-defined]
    vcpu.set_state(entry)
    while not done:
        ex = vcpu.run()
        if isinstance(ex, (Shutdown, InternalError, Halt)):
            raise SystemExit(f"emu: guest stopped early: {ex}")
        assert isinstance(ex, Interrupted)
    dt = time.perf_counter() - t0
    if EXPECT not in out.decode():
        raise SystemExit(f"emu: unexpected output {out!r}")
    stats = vcpu.stats()
    engine.close()
    mem.close()
    return dt, stats


def irq_cost(virtual_s: int = 5) -> tuple[int, float]:
    """(interrupts delivered, host seconds) for a HLT loop woken by a 1 kHz timer."""
    from emu_harness import Machine
    from emu_harness import build as build_guest
    with tempfile.TemporaryDirectory() as d:
        image = build_guest("bench_irq", Path(d))
    m = Machine(image, mode="long", regs={"rdi": virtual_s * 1000})
    t0 = time.perf_counter()
    r = m.run(virtual_ms=virtual_s * 1000 + 100, max_exits=10_000_000)
    dt = time.perf_counter() - t0
    return int(r.stats["interrupts"]), dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--small", type=int, default=2)
    ap.add_argument("--large", type=int, default=30)
    args = ap.parse_args()
    if shutil.which("qemu-system-x86_64") is None:
        print("qemu-system-x86_64 not installed: nothing to compare against")
        return 1
    why = EmuEngine.probe()
    if why:
        print(f"emu engine unavailable: {why}")
        return 1
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        small, large = build(args.small, tmp), build(args.large, tmp)
        print(f"guest: {SRC.relative_to(ROOT)}, REPEAT={args.small} and {args.large}, "
              f"median of {args.runs}")
        print(f"qemu command: {' '.join(qemu_cmd(large))}")
        res: dict[str, list[float]] = {"emu small": [], "emu large": [], "qemu small": [],
                                       "qemu large": []}
        stats: dict[str, int | float] = {}
        for _ in range(args.runs):   # interleaved, so host noise hits both alike
            res["qemu small"].append(run_qemu(small))
            res["qemu large"].append(run_qemu(large))
            res["emu small"].append(run_emu(small)[0])
            t, stats = run_emu(large)
            res["emu large"].append(t)
    med = {k: statistics.median(v) for k, v in res.items()}
    for k, v in med.items():
        print(f"  {k:11s} median {v:7.3f} s   (runs: {', '.join(f'{x:.3f}' for x in res[k])})")
    total = med["emu large"] / med["qemu large"]
    marginal = ((med["emu large"] - med["emu small"])
                / max(1e-9, med["qemu large"] - med["qemu small"]))
    print(f"total ratio    emu/qemu-tcg = {total:.2f}x")
    print(f"marginal ratio emu/qemu-tcg = {marginal:.2f}x  (per sieve round, start-up removed)")
    print(f"emu large-run stats: blocks {stats.get('blocks executed')}, "
          f"emu_start calls {stats.get('emu_start calls')}, "
          f"port writes {stats.get('port writes')}")
    n, dt = irq_cost()
    if n:
        print(f"timer interrupts: {n} delivered in 5 s of guest time, host {dt:.3f} s, "
              f"{dt / n * 1e6:.1f} us per delivered interrupt (HLT, wake, IRQ handler, EOI)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
