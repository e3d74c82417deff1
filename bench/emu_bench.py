"""Benchmark: the same CPU-bound multiboot guest on emu, kvm, QEMU's TCG and the bare host.

    python bench/emu_bench.py [--runs 5] [--small 2] [--large 30]
                              [--kvm-repeat 1] [--kvm-runs 3] [--no-kvm]

The guest (tests/guests/emu/bench_cpu.S) sieves primes below 2^20 REPEAT times and exits
through isa-debug-exit. It is built into ELF32 multiboot images that pyhv's multiboot loader
and `qemu-system-x86_64 -kernel` both boot, and (-DHOST) into a static Linux i386 program
with the same sieve code at the same addresses (text at 1 MiB, array at 2 MiB) for the
bare host. Each configuration runs `--runs` times, interleaved; medians are reported:

    total ratio     X / Y for the large image, start-up included (QEMU, native: whole
                    process; emu: engine creation + load + run, Python already started)
    marginal ratio  X / Y for (large - small): the per-round cost, start-up removed

kvm: `pyhv run --engine kvm` on this host. Where /dev/kvm is KVM-PVM (docs/host.md) every
instruction of this 32-bit CPL 0 guest is emulated by KVM one at a time, thousands of
times slower than hardware, so kvm runs a small image (`--kvm-repeat`, default 1 round)
next to `pyhv run --engine emu`, QEMU and the host program on that same image, each a
whole process, and the ratios of that table are whole-process wall times.

Ratios only: absolute times on these shared machines are noise (docs/host.md). The timer
figure comes last: a guest sleeping in HLT woken by a 1 kHz virtual timer for 5 s of
guest time: delivered interrupts per guest and per host second, host cost per interrupt.
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


def build(repeat: int, tmp: Path, variant: str = "") -> Path:
    """variant "": multiboot image printing on 0xE9; "serial": on COM1 (what `pyhv run`
    shows); "host": the Linux i386 program (tests/guests/emu/bench_cpu.S, -DHOST)."""
    name = f"bench{repeat}{variant}"
    obj, elf = tmp / f"{name}.o", tmp / f"{name}.elf"
    defs = {"": [], "serial": ["-DOUTPORT=0x3f8"], "host": ["-DHOST"]}[variant]
    subprocess.run(["gcc", "-m32", "-c", f"-DREPEAT={repeat}", *defs, "-o", str(obj),
                    str(SRC)], check=True)
    link = (["-Ttext", "0x100000", "-Tbss", "0x200000"] if variant == "host" else
            ["-N", "-Ttext", "0x100000"])
    subprocess.run(["ld", "-m", "elf_i386", *link, "-e", "start", "--no-warn-rwx-segments",
                    "-o", str(elf), str(obj)], check=True)
    return elf


def qemu_cmd(elf: Path, serial: bool = False) -> list[str]:
    out = ["-serial", "stdio"] if serial else ["-debugcon", "stdio"]
    return ["qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", "64", "-nodefaults",
            "-display", "none", "-no-reboot", *out, "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", str(elf)]


def run_process(what: str, cmd: list[str], timeout: float = 600) -> float:
    """Wall time of a whole process that must print the expected count."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    dt = time.perf_counter() - t0
    if EXPECT not in p.stdout:
        raise SystemExit(f"{what}: unexpected output {p.stdout[-300:]!r} {p.stderr[-300:]!r}")
    return dt


def run_qemu(elf: Path, serial: bool = False) -> float:
    return run_process("qemu", qemu_cmd(elf, serial))


def run_native(prog: Path) -> float:
    return run_process("native", [str(prog)])


def pyhv_cmd(engine: str, elf: Path, timeout: float) -> list[str]:
    return [sys.executable, "-m", "pyhv", "run", "--engine", engine, "--kernel", str(elf),
            "--mem", "64M", "--timeout", f"{timeout:g}"]


def run_pyhv(engine: str, elf: Path, timeout: float) -> float:
    env_cmd = pyhv_cmd(engine, elf, timeout)
    return run_process(f"pyhv run --engine {engine}", env_cmd, timeout=timeout + 60)


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

    vcpu.attach_io(pio, None)
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


def med_line(name: str, runs: list[float]) -> str:
    return (f"  {name:16s} median {statistics.median(runs):8.3f} s   "
            f"(runs: {', '.join(f'{x:.3f}' for x in runs)})")


def kvm_kind() -> tuple[bool, str]:
    """(usable, a one-line description) of /dev/kvm on this host."""
    from pyhv.host import probe_host
    r = probe_host()
    if not r.kvm_usable:
        return False, f"/dev/kvm not usable ({r.kvm_error or 'no device'})"
    return True, f"{r.kind}: {r.kind_reason}"


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--small", type=int, default=2)
    ap.add_argument("--large", type=int, default=30)
    ap.add_argument("--kvm-repeat", type=int, default=1, help="sieve rounds for the kvm table")
    ap.add_argument("--kvm-runs", type=int, default=3)
    ap.add_argument("--kvm-timeout", type=float, default=300)
    ap.add_argument("--no-kvm", action="store_true", help="skip the kvm table")
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
        nsmall, nlarge = build(args.small, tmp, "host"), build(args.large, tmp, "host")
        print(f"guest: {SRC.relative_to(ROOT)}, REPEAT={args.small} and {args.large}, "
              f"median of {args.runs}, interleaved")
        print(f"qemu:   {' '.join(qemu_cmd(large))}")
        print("native: the same sieve code as a static Linux i386 program (-DHOST): CPL 3 "
              "with the host's paging, write(2)/exit(2) instead of port I/O, no firmware")
        res: dict[str, list[float]] = {k: [] for k in (
            "emu small", "emu large", "qemu small", "qemu large", "native small",
            "native large")}
        stats: dict[str, int | float] = {}
        for _ in range(args.runs):   # interleaved, so host noise hits all alike
            res["native small"].append(run_native(nsmall))
            res["native large"].append(run_native(nlarge))
            res["qemu small"].append(run_qemu(small))
            res["qemu large"].append(run_qemu(large))
            res["emu small"].append(run_emu(small)[0])
            t, stats = run_emu(large)
            res["emu large"].append(t)
        med = {k: statistics.median(v) for k, v in res.items()}
        for k in res:
            print(med_line(k, res[k]))

        def ratio(a: str, b: str) -> str:
            total = med[f"{a} large"] / med[f"{b} large"]
            marginal = ((med[f"{a} large"] - med[f"{a} small"])
                        / max(1e-9, med[f"{b} large"] - med[f"{b} small"]))
            return f"total {total:7.2f}x   marginal (per round) {marginal:7.2f}x"

        print(f"emu/qemu-tcg   {ratio('emu', 'qemu')}")
        print(f"emu/native     {ratio('emu', 'native')}")
        print(f"qemu-tcg/native {ratio('qemu', 'native')}")
        print(f"emu large-run stats: blocks {stats.get('blocks executed')}, "
              f"emu_start calls {stats.get('emu_start calls')}, "
              f"port writes {stats.get('port writes')}")

        if not args.no_kvm:
            kvm_table(tmp, args)

    n, dt = irq_cost()
    if n:
        print(f"timer interrupts (1 kHz PIT-style virtual timer, HLT loop, emu): {n} delivered "
              f"in 5 s of guest time = {n / 5:.0f}/s of guest time; host {dt:.3f} s = "
              f"{n / dt:.0f} delivered/s of host time, {dt / n * 1e6:.1f} us of host time per "
              f"delivered interrupt (wake, IDT delivery, handler, EOI, IRETQ)")
    return 0


def kvm_table(tmp: Path, args: argparse.Namespace) -> None:
    ok, kind = kvm_kind()
    rep = args.kvm_repeat
    print(f"kvm ({kind})")
    if not ok:
        print("  skipped")
        return
    if kind.startswith("pvm"):
        print(f"  KVM-PVM emulates this 32-bit CPL 0 guest one instruction at a time: "
              f"REPEAT={rep} only, every engine as a whole process on the same image")
    serial = build(rep, tmp, "serial")
    host = build(rep, tmp, "host")
    print(f"  kvm: {' '.join(pyhv_cmd('kvm', serial, args.kvm_timeout))}")
    res: dict[str, list[float]] = {k: [] for k in ("kvm", "emu", "qemu", "native")}
    for _ in range(args.kvm_runs):
        res["native"].append(run_native(host))
        res["qemu"].append(run_qemu(serial, serial=True))
        res["emu"].append(run_pyhv("emu", serial, args.kvm_timeout))
        res["kvm"].append(run_pyhv("kvm", serial, args.kvm_timeout))
    med = {k: statistics.median(v) for k, v in res.items()}
    for k in res:
        print(med_line(f"{k} (REPEAT={rep})", res[k]))
    print(f"  kvm/emu {med['kvm'] / med['emu']:.1f}x   kvm/qemu-tcg "
          f"{med['kvm'] / med['qemu']:.1f}x   kvm/native {med['kvm'] / med['native']:.0f}x   "
          f"emu/qemu-tcg {med['emu'] / med['qemu']:.2f}x   (whole processes, start-up "
          f"included: pyhv's Python start-up weighs on emu and kvm alike)")


if __name__ == "__main__":
    raise SystemExit(main())
