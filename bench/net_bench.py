"""Benchmark: guest-to-host TCP throughput over `--net user`, pyhv (emu) against QEMU TCG
with the same passt back end.

    .venv/bin/python bench/net_bench.py [--quick] [--runs 3] [--mib 16]

Both peers boot the same kernel and initramfs (pyhv's cached image) with a virtio-net NIC
on passt; the guest takes a DHCP lease at boot (`pyhv.net=dhcp`: MTU 65520 from passt)
and runs

    dd if=/dev/zero bs=65536 count=16*MIB | nc -w 2 <gateway> <port>

to a TCP sink this script runs on the host's 127.0.0.1 (passt maps the gateway address
to the host). Peers:

    pyhv      python -m pyhv run --engine emu --net user --command CMD
    qemu-tcg  qemu-system-x86_64 -accel tcg -M pc -m 128 -nic none
              -netdev stream,id=n0,server=off,addr.type=fd,addr.str=FD
              -device virtio-net-pci,netdev=n0,romfile=  (passt -f -q -1 --fd on the
              other end of a socketpair: how pyhv connects passt)

Measured on the host, at the sink: bytes received / time from the connection's first
byte to its last (so neither boot time nor nc's closing wait is counted, only the
transfer). The median of --runs
transfers each, runs interleaved, and the ratio pyhv / QEMU (higher is better; the
issue's first target is >= 0.5x). Every process runs under a timeout.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from pyhv import images  # noqa: E402
from pyhv.exitmarker import ExitMarker  # noqa: E402
from pyhv.net.passt import passt_path  # noqa: E402

TIMEOUT_S = 600
MEM_MIB = 128


class Sink:
    """Counts each connection's bytes and times them from the first byte to the last
    (not to EOF: nc -w waits before it closes)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.results: list[tuple[int, float]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        buf = bytearray(1 << 20)
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                c.settimeout(TIMEOUT_S)
                n, t0, t1 = 0, 0.0, 0.0
                try:
                    while k := c.recv_into(buf):
                        t1 = time.perf_counter()
                        if n == 0:
                            t0 = t1
                        n += k
                except OSError:
                    pass
                self.results.append((n, t1 - t0))


def gateway() -> str:
    out = subprocess.run(["ip", "-4", "route", "show", "default"], capture_output=True,
                         text=True, timeout=10).stdout.split()
    if "via" not in out:
        raise SystemExit("net_bench: the host has no IPv4 default route (passt needs one)")
    return out[out.index("via") + 1]


def guest_command(port: int, mib: int) -> str:
    return (f"dd if=/dev/zero bs=65536 count={16 * mib} 2>/dev/null | "
            f"nc -w 2 {gateway()} {port}; echo sent")


def run_pyhv(cmd: str) -> None:
    argv = [sys.executable, "-m", "pyhv", "run", "--engine", "emu", "--mem", f"{MEM_MIB}M",
            "--net", "user", "--timeout", str(TIMEOUT_S), "--command", cmd]
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=TIMEOUT_S + 30,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if r.returncode != 0 or b"sent" not in r.stdout:
        raise SystemExit(f"pyhv failed ({r.returncode}):\n{r.stdout[-1500:]!r}\n"
                         f"{r.stderr[-1500:]!r}")


def qemu_argv(img: images.LinuxImage, fd: int, cmd: str, marker: ExitMarker) -> list[str]:
    return ["qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", str(MEM_MIB),
            "-nographic", "-no-reboot", "-monitor", "none", "-serial", "stdio", "-nic", "none",
            "-kernel", str(img.kernel_path), "-initrd", str(img.initrd_path), "-append",
            f"{img.cmdline_default} quiet pyhv.net=dhcp " + images.command_param(cmd, marker),
            "-netdev", f"stream,id=n0,server=off,addr.type=fd,addr.str={fd}",
            "-device", "virtio-net-pci,netdev=n0,romfile="]


def run_qemu(img: images.LinuxImage, cmd: str) -> None:
    ours, theirs = socket.socketpair()
    passt = subprocess.Popen([passt_path() or "passt", "-f", "-q", "-1", "--fd",
                              str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    theirs.close()
    marker = ExitMarker.fresh()
    try:
        r = subprocess.run(qemu_argv(img, ours.fileno(), cmd, marker),
                           pass_fds=(ours.fileno(),), stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=TIMEOUT_S)
    finally:
        ours.close()
        passt.terminate()
        passt.wait(10)
    if marker.parse(r.stdout) != 0:
        raise SystemExit(f"qemu failed:\n{r.stdout[-1500:]!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="transfers per peer (median)")
    ap.add_argument("--mib", type=int, default=16, help="MiB per transfer (default 16)")
    ap.add_argument("--quick", action="store_true", help="1 run of 4 MiB per peer")
    a = ap.parse_args()
    runs, mib = (1, 4) if a.quick else (a.runs, a.mib)
    if shutil.which("qemu-system-x86_64") is None or passt_path() is None:
        print("net_bench: needs qemu-system-x86_64 and passt")
        return 2
    img = images.ensure_linux_image(quiet=True)
    sink = Sink()
    cmd = guest_command(sink.port, mib)
    cpu = next((ln.split(":", 1)[1].strip() for ln in
                Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown")
    print(f"net_bench: {time.strftime('%Y-%m-%d %H:%M')}, host CPU {cpu}, "
          f"{os.cpu_count()} CPUs, median of {runs}, {mib} MiB per transfer")
    print(f"reproduce: {shlex.join([sys.executable, 'bench/net_bench.py', *sys.argv[1:]])}")
    print(f"guest command: {cmd}")
    rates: dict[str, list[float]] = {"pyhv emu": [], "qemu-tcg pc": []}
    for _ in range(runs):
        for name in rates:
            before = len(sink.results)
            if name == "pyhv emu":
                run_pyhv(cmd)
            else:
                run_qemu(img, cmd)
            time.sleep(0.2)
            got = sink.results[before:]
            if len(got) != 1 or got[0][0] != mib << 20:
                raise SystemExit(f"{name}: the sink got {got} (expected one {mib} MiB "
                                 "transfer)")
            n, secs = got[0]
            rates[name].append(n / secs / 1e6)
    print(f"\n  {'peer':12s} {'MB/s':>8s}   per run")
    med = {}
    for name, rs in rates.items():
        med[name] = statistics.median(rs)
        print(f"  {name:12s} {med[name]:8.2f}   {', '.join(f'{r:.2f}' for r in rs)}")
    print(f"\n  ratio pyhv/QEMU (higher is better; first target >= 0.5x): "
          f"{med['pyhv emu'] / med['qemu-tcg pc']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
