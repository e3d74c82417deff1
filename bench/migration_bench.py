"""Benchmark: live migration of a 256 MiB Linux guest, pyhv (emu) against QEMU's TCG.

    .venv/bin/python bench/migration_bench.py [--quick] [--runs 3]

The guest: Debian's kernel with pyhv's initramfs (pyhv's cached image; fetched first
when missing), 256 MiB, the same kernel command line for both peers,

    console=ttyS0 tsc=unstable no_timer_check loglevel=1 pyhv.cmd=<base64 of WORKLOAD>

where WORKLOAD prints "mig-ready" once set up and then runs forever:

    idle       sleep 1 in a loop
    dirty-1M   every 0.1 s of guest time, copy a 1 MiB file of random bytes over another
               in the initramfs' RAM file system (page cache: ~10 MiB/s of guest RAM
               rewritten while the guest keeps up)
    dirty-4M   the same with 4 MiB (~40 MiB/s)

Each run boots a source and a destination on the same host, waits for "mig-ready" and
SETTLE_S more, then migrates over 127.0.0.1 (the same path for both peers) with a
50 ms downtime target and no bandwidth limit:

    pyhv       pyhv run --engine emu --mem 256M --append CMDLINE [--api-sock S |
               --incoming tcp:127.0.0.1:0]; pyhv migrate S URI --max-downtime 50 --json
    qemu-tcg   qemu-system-x86_64 -accel tcg -M pc -m 256 -nographic -kernel -initrd
               -append CMDLINE -qmp unix:Q [-incoming tcp:127.0.0.1:PORT]; over QMP:
               migrate-set-parameters downtime-limit=50 max-bandwidth=10 GB/s, migrate,
               query-migrate until completed

Reported per peer and workload, medians of --runs (interleaved): total time, downtime,
bytes on the wire, rounds. Definitions differ: pyhv's downtime runs from the source's
pause to the destination's first guest instruction (both on one CLOCK_MONOTONIC);
QEMU's query-migrate "downtime" is the source's own measure from stopping the VM to the
end of the migration (its destination's start is not in it). QEMU's rounds are its
dirty-sync-count. Every process runs under a timeout and is killed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from pyhv import images  # noqa: E402

MEM_MIB = 256
BASE_CMDLINE = "console=ttyS0 tsc=unstable no_timer_check loglevel=1"
READY = b"mig-ready"
SETTLE_S = 2.0
BOOT_TIMEOUT_S = 180.0
MIGRATE_TIMEOUT_S = 300.0
DOWNTIME_MS = 50
SETUP = "head -c 4194304 /dev/urandom > /tmp/src4; head -c 1048576 /tmp/src4 > /tmp/src1; "
WORKLOADS = {
    "idle": SETUP + "echo mig-ready; while true; do sleep 1; done",
    "dirty-1M": SETUP + "echo mig-ready; while true; do cat /tmp/src1 > /tmp/dst; "
                        "sleep 0.1; done",
    "dirty-4M": SETUP + "echo mig-ready; while true; do cat /tmp/src4 > /tmp/dst; "
                        "sleep 0.1; done",
}


@dataclass
class Result:
    total_s: float
    downtime_ms: float
    bytes: int
    rounds: int
    detail: str = ""        # pyhv: where the downtime went (the report's switchover_ms)


class Proc:
    """A process whose stdout is collected by a thread; killed by `close()`."""

    def __init__(self, argv: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        # a session of its own: close() kills the whole group (timeout + qemu, or pyhv)
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env, start_new_session=True)
        self.out = bytearray()
        self.err = bytearray()
        for stream, buf in ((self.p.stdout, self.out), (self.p.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, buf), daemon=True).start()

    @staticmethod
    def _pump(stream: object, buf: bytearray) -> None:
        fd = stream.fileno()  # type: ignore[attr-defined]
        while chunk := os.read(fd, 65536):
            buf += chunk

    def wait_for(self, text: bytes, where: str = "out", timeout: float = BOOT_TIMEOUT_S
                 ) -> None:
        deadline = time.monotonic() + timeout
        buf = self.out if where == "out" else self.err
        while text not in buf:
            if self.p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no {text!r} (status {self.p.poll()}); stderr "
                                   f"{bytes(self.err)[-300:]!r}")
            time.sleep(0.05)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_pyhv(img: images.LinuxImage, cmdline: str, tmp: Path) -> Result:
    base = [sys.executable, "-m", "pyhv", "run", "--engine", "emu", "--mem", f"{MEM_MIB}M",
            "--kernel", str(img.kernel_path), "--initrd", str(img.initrd_path),
            "--append", cmdline, "--timeout", str(BOOT_TIMEOUT_S + MIGRATE_TIMEOUT_S)]
    sock = Path(tempfile.mktemp(prefix="src-", suffix=".sock", dir=tmp))
    dst = Proc([*base, "--incoming", "tcp:127.0.0.1:0"])
    src = Proc([*base, "--api-sock", str(sock)])
    try:
        dst.wait_for(b"waiting for a migration on", "err")
        uri = bytes(dst.err).split(b"waiting for a migration on ")[1].split()[0].decode()
        src.wait_for(READY)
        time.sleep(SETTLE_S)
        r = subprocess.run([sys.executable, "-m", "pyhv", "migrate", str(sock), uri,
                            "--max-downtime", str(DOWNTIME_MS), "--json"],
                           capture_output=True, text=True, timeout=MIGRATE_TIMEOUT_S,
                           env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        if r.returncode != 0:
            raise RuntimeError(f"pyhv migrate: {r.stderr.strip()}")
        rep = json.loads(r.stdout)
        parts = rep.get("switchover_ms") or {}
        return Result(rep["total_s"], rep["downtime_ms"], rep["bytes"], rep["rounds"],
                      " ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    finally:
        src.close()
        dst.close()


class Qmp:
    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.settimeout(timeout)
                self.s.connect(str(path))
                break
            except OSError:
                self.s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.f = self.s.makefile("rwb")
        self._read()                                     # the greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, object]:
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError("QMP closed")
            obj: dict[str, object] = json.loads(line)
            if "event" not in obj:
                return obj

    def cmd(self, name: str, **args: object) -> dict[str, object]:
        self.f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.f.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"QMP {name}: {reply['error']}")
        ret = reply.get("return", {})
        return ret if isinstance(ret, dict) else {}

    def close(self) -> None:
        self.s.close()


def run_qemu(img: images.LinuxImage, cmdline: str, tmp: Path) -> Result:
    def argv(qmp: Path) -> list[str]:
        return ["timeout", str(int(BOOT_TIMEOUT_S + MIGRATE_TIMEOUT_S)),
                "qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", str(MEM_MIB),
                "-nographic", "-no-reboot", "-kernel", str(img.kernel_path), "-initrd",
                str(img.initrd_path), "-append", cmdline, "-qmp",
                f"unix:{qmp},server=on,wait=off"]
    port = free_port()
    dq, sq = tmp / "qemu-dst.qmp", tmp / "qemu-src.qmp"
    dst = Proc([*argv(dq), "-incoming", f"tcp:127.0.0.1:{port}"])
    src = Proc(argv(sq))
    try:
        src.wait_for(READY)
        time.sleep(SETTLE_S)
        q = Qmp(sq)
        q.cmd("migrate-set-parameters", **{"downtime-limit": DOWNTIME_MS,
                                           "max-bandwidth": 10 * 10**9})
        q.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        deadline = time.monotonic() + MIGRATE_TIMEOUT_S
        while True:
            info = q.cmd("query-migrate")
            if info.get("status") == "completed":
                break
            if info.get("status") in ("failed", "cancelled") or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU migration: {info}")
            time.sleep(0.02)
        q.close()
        ram = info["ram"]
        assert isinstance(ram, dict)
        return Result(float(info["total-time"]) / 1000, float(info["downtime"]),
                      int(ram["transferred"]), int(ram.get("dirty-sync-count", 0)))
    finally:
        src.close()
        dst.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 run, idle and dirty-1M only")
    ap.add_argument("--workload", action="append", choices=sorted(WORKLOADS))
    a = ap.parse_args()
    runs = 1 if a.quick else a.runs
    loads = a.workload or (["idle", "dirty-1M"] if a.quick else list(WORKLOADS))
    img = images.fetch_linux(quiet=True)
    print(f"# migration_bench {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.uname().nodename}, {os.cpu_count()} CPUs; {MEM_MIB} MiB Linux guest, "
          f"downtime target {DOWNTIME_MS} ms, 127.0.0.1; medians of {runs}")
    results: dict[tuple[str, str], list[Result]] = {}
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pyhv-migbench-") as d:
        for i in range(runs):
            for load in loads:
                cmdline = f"{BASE_CMDLINE} {images.command_param(WORKLOADS[load])}"
                for peer, fn in (("pyhv", run_pyhv), ("qemu-tcg", run_qemu)):
                    try:
                        r = fn(img, cmdline, Path(d))
                    except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                        failures.append(f"{peer} {load} run {i + 1}: {e}")
                        continue
                    results.setdefault((peer, load), []).append(r)
                    print(f"  run {i + 1} {load:9} {peer:9} total {r.total_s:7.3f} s  "
                          f"downtime {r.downtime_ms:7.1f} ms  {r.bytes / 2**20:7.1f} MiB  "
                          f"{r.rounds} rounds  {r.detail}", flush=True)
    print()
    print(f"reproduce: .venv/bin/python bench/migration_bench.py {' '.join(sys.argv[1:])}")
    print(f"{'workload':10} {'peer':9} {'total s':>8} {'downtime ms':>12} {'MiB':>8} "
          f"{'rounds':>6}")
    for load in loads:
        for peer in ("pyhv", "qemu-tcg"):
            rs = results.get((peer, load))
            if not rs:
                print(f"{load:10} {peer:9} {'(failed)':>8}")
                continue
            print(f"{load:10} {peer:9} {statistics.median(r.total_s for r in rs):8.3f} "
                  f"{statistics.median(r.downtime_ms for r in rs):12.1f} "
                  f"{statistics.median(r.bytes for r in rs) / 2**20:8.1f} "
                  f"{statistics.median(r.rounds for r in rs):6.0f}")
        p, q = results.get(("pyhv", load)), results.get(("qemu-tcg", load))
        if p and q:
            def med(rs: list[Result], f: str) -> float:
                return float(statistics.median(getattr(r, f) for r in rs))
            print(f"{load:10} {'pyhv/qemu':9} {med(p, 'total_s') / med(q, 'total_s'):7.2f}x "
                  f"{med(p, 'downtime_ms') / max(med(q, 'downtime_ms'), 1e-9):11.2f}x "
                  f"{med(p, 'bytes') / med(q, 'bytes'):7.2f}x")
    for f in failures:
        print(f"FAILED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
