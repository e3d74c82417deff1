"""Benchmark: guest-side virtio-blk throughput, pyhv (emu) against QEMU's TCG.

    .venv/bin/python bench/virtio_bench.py [--quick] [--runs 3]

Both peers boot the same kernel and initramfs (pyhv's cached image plus a small cpio
holding bench/guests/diskio.c, built static here), with the same kernel command line
(`console=ttyS0 tsc=unstable no_timer_check pyhv.cmd=<script>`: the words `pyhv run`
adds on emu, which `--append` replaces; without no_timer_check about one boot in three
panicked in the I/O APIC timer check on this loaded host), 256 MiB of RAM, and one fresh
qcow2 image each (created identically with qemu-img, 256 MiB):

    pyhv       python -m pyhv run --engine emu --mem 256M --append CMDLINE --initrd I
               --disk d.qcow2 --command SCRIPT
    qemu-tcg   qemu-system-x86_64 -accel tcg -M pc -m 256 -nographic -no-reboot
               -kernel K -initrd I -append "CMDLINE pyhv.cmd=SCRIPT"
               -drive file=d.qcow2,if=none,id=d0,format=qcow2
               -device virtio-blk-pci,drive=d0,disable-legacy=on

(both with the host page cache, QEMU's default cache=writeback). The guest runs, with
O_DIRECT on /dev/vda so every request reaches the device:

    seqwrite   SEQ_MIB requests of 1 MiB from offset 0, then fsync
    seqread    the same range read back
    randread   RAND_OPS reads of 4 KiB at xorshift offsets over that range
    randwrite  RAND_OPS writes of 4 KiB likewise, then fsync

each preceded by a line `PH <name>` on the serial console (and `PH end` at the end).
The time of a phase is measured on the host: from the arrival of its `PH` line on the
process's stdout to the arrival of the next one (guest time on emu is virtual, so an
in-guest clock would not compare with QEMU's). Reported: MB/s (sequential, 10^6 bytes)
and IOPS (random), the median of --runs boots per peer (runs interleaved), and the ratio
pyhv / QEMU (higher is better for pyhv; the issue's first target is >= 0.5). Prints the
date, host, versions and the command that reproduces it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from pyhv import images  # noqa: E402
from pyhv.loader.initramfs import Initramfs  # noqa: E402

CMDLINE = "console=ttyS0 tsc=unstable no_timer_check"   # pyhv run's emu workarounds
MEM_MIB = 256
DISK = "256M"
TIMEOUT_S = 600
PHASES = ("seqwrite", "seqread", "randread", "randwrite")


def script(seq_mib: int, rand_ops: int) -> str:
    span = seq_mib << 20
    d = "/bin/diskio"
    fail = "|| echo PH failed"
    return (f"echo PH seqwrite; {d} seqwrite /dev/vda {seq_mib} 1048576 {span} {fail}; "
            f"echo PH seqread; {d} seqread /dev/vda {seq_mib} 1048576 {span} {fail}; "
            f"echo PH randread; {d} randread /dev/vda {rand_ops} 4096 {span} {fail}; "
            f"echo PH randwrite; {d} randwrite /dev/vda {rand_ops} 4096 {span} {fail}; "
            "echo PH end")


def build_initrd(base: Path, work: Path) -> Path:
    exe = work / "diskio"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(exe),
                    str(ROOT / "bench" / "guests" / "diskio.c")], check=True, timeout=120)
    extra = Initramfs()
    extra.add_file("bin/diskio", exe.read_bytes(), 0o755)
    out = work / "initrd"
    # The kernel takes a following cpio archive only at a 4-byte aligned offset (zero
    # bytes between archives are skipped): without the padding, a compressed base
    # whose length is not a multiple of 4 hides diskio ("invalid magic").
    head = base.read_bytes()
    out.write_bytes(head + bytes(-len(head) % 4) + extra.to_bytes(compress="none"))
    return out


def run(argv: list[str]) -> tuple[dict[str, float], int, bytes]:
    """Run argv; the host time at which each `PH name` line arrived."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env=env)
    out = bytearray()
    seen: dict[str, float] = {}

    def reader() -> None:
        assert p.stdout is not None
        fd = p.stdout.fileno()
        line = bytearray()
        while chunk := os.read(fd, 65536):
            now = time.perf_counter() - t0
            out.extend(chunk)
            for byte in chunk:
                if byte == 10:
                    text = line.decode("latin-1").strip()
                    if text.startswith("PH ") and text[3:] not in seen:
                        seen[text[3:]] = now
                    line.clear()
                else:
                    line.append(byte)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        status = p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        p.kill()
        status = p.wait()
    th.join(10)
    return seen, status, bytes(out)


def figures(seen: dict[str, float], seq_mib: int, rand_ops: int) -> dict[str, float] | None:
    order = [*PHASES, "end"]
    if "failed" in seen or not all(k in seen for k in order):
        return None
    out = {}
    for a, b in zip(order, order[1:], strict=False):
        dt = seen[b] - seen[a]
        out[a] = (seq_mib * 1048576 / 1e6 / dt) if a.startswith("seq") else rand_ops / dt
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="boots per peer (median; default 3)")
    ap.add_argument("--quick", action="store_true", help="1 boot per peer, less I/O")
    a = ap.parse_args()
    runs = 1 if a.quick else a.runs
    seq_mib, rand_ops = (8, 200) if a.quick else (32, 1000)
    for tool in ("qemu-system-x86_64", "qemu-img", "gcc"):
        if shutil.which(tool) is None:
            print(f"{tool} not installed: cannot run the comparison")
            return 2
    img = images.ensure_linux_image(quiet=True)
    cmd = script(seq_mib, rand_ops)
    qver = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                          text=True, timeout=30).stdout.splitlines()[0]
    print(f"virtio_bench {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
          f"{platform.node()} ({os.cpu_count()} CPUs), {qver}, kernel {img.version}")
    print(f"reproduce: {' '.join([sys.executable, *sys.argv])}")
    print(f"I/O: {seq_mib} MiB sequential in 1 MiB requests, {rand_ops} random 4 KiB "
          f"requests, O_DIRECT; {runs} run(s) per peer, median")
    results: dict[str, list[dict[str, float]]] = {"pyhv": [], "qemu": []}
    with tempfile.TemporaryDirectory(prefix="virtio-bench-") as tmp:
        work = Path(tmp)
        initrd = build_initrd(img.initrd_path, work)
        for i in range(runs):
            for peer in ("pyhv", "qemu"):
                disk = work / f"{peer}-{i}.qcow2"
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), DISK],
                               check=True, timeout=60)
                if peer == "pyhv":
                    argv = [sys.executable, "-m", "pyhv", "run", "--engine", "emu", "--mem",
                            f"{MEM_MIB}M", "--append", CMDLINE, "--initrd", str(initrd),
                            "--disk", str(disk), "--timeout", str(TIMEOUT_S - 10),
                            "--command", cmd]
                else:
                    argv = ["qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m",
                            str(MEM_MIB), "-nographic", "-no-reboot", "-kernel",
                            str(img.kernel_path), "-initrd", str(initrd), "-append",
                            f"{CMDLINE} {images.command_param(cmd)}", "-drive",
                            f"file={disk},if=none,id=d0,format=qcow2", "-device",
                            "virtio-blk-pci,drive=d0,disable-legacy=on"]
                seen, status, out = run(argv)
                f = figures(seen, seq_mib, rand_ops)
                if f is None:
                    tail = out.decode("latin-1").strip().splitlines()[-3:]
                    print(f"{peer} run {i + 1}: incomplete (status {status}): {tail}")
                    continue
                results[peer].append(f)
                print(f"{peer} run {i + 1}: " + ", ".join(
                    f"{k} {v:.1f} {'MB/s' if k.startswith('seq') else 'IOPS'}"
                    for k, v in f.items()))
    if not results["pyhv"] or not results["qemu"]:
        print("no comparison: a peer completed no run")
        return 1
    print(f"\n{'phase':<10} {'pyhv emu':>12} {'QEMU TCG':>12} {'pyhv/QEMU':>10}")
    for k in PHASES:
        mp = statistics.median(r[k] for r in results["pyhv"])
        mq = statistics.median(r[k] for r in results["qemu"])
        unit = "MB/s" if k.startswith("seq") else "IOPS"
        print(f"{k:<10} {mp:>7.1f} {unit:<4} {mq:>7.1f} {unit:<4} {mp / mq:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
