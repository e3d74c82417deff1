"""Load on the host daemon: N small bare-metal VMs started and stopped, round after
round, through its REST API; no failure allowed; the API's latency under that load.

    .venv/bin/python bench/host_load.py                 # 20 VMs, 3 rounds
    .venv/bin/python bench/host_load.py --vms 5 --rounds 1

A real `pyhv host serve` (its own session, a temporary state directory) manages N VMs of
tests/guests/core/counter.S (a multiboot guest that counts and powers off on the ACPI
power button) on the emu engine with --mem 8M. Each round: every VM is started at once
(N concurrent POST /start, each returning once its VM's control API answers), the list
must show all N running, then half are shut down (ACPI power button: the guest powers
off, the monitor sees status 0) and half destroyed, concurrently, and all must end
"stopped" with the expected last_exit. Meanwhile a poller thread sends GET /v1/vms and
GET /v1/host back to back over the UNIX socket; their latencies are the API's latency
under load (p50, p99, max printed). Lifecycle calls' latencies are printed apart (a
start waits for a VM process to boot, by design). A failure is any non-2xx answer or a
VM not in the expected state; the script exits 1 if there was one.

Every wait is bounded; at the end the daemon's and every VM's process group are killed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests" / "machine"))

from pyhv import rundir  # noqa: E402
from pyhv.hostd.client import Client, DaemonError  # noqa: E402

WAIT_S = 180.0


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Load:
    def __init__(self, state: Path, kernel: Path, n: int, mem: int) -> None:
        self.state, self.kernel, self.n, self.mem = state, kernel, n, mem
        self.failures: list[str] = []
        self.read_lat: list[float] = []
        self.op_lat: dict[str, list[float]] = {"start": [], "shutdown": [], "destroy": []}
        self.stop_polling = threading.Event()
        self.daemon: subprocess.Popen[bytes] | None = None
        self.client: Client | None = None

    def start_daemon(self) -> None:
        err = open(self.state.parent / "daemon.err", "wb")  # noqa: SIM115 - kept open
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "pyhv", "host", "serve", "--state-dir", str(self.state),
             "--listen", "none"], stdin=subprocess.DEVNULL, stdout=err, stderr=err,
            start_new_session=True)
        deadline = time.monotonic() + 60
        while not (self.state / "daemon.json").exists():
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the daemon did not start: "
                                 f"{(self.state.parent / 'daemon.err').read_text()}")
            time.sleep(0.05)
        self.client = Client.find(self.state, None, None, None)

    def call(self, method: str, path: str, body: object = None) -> object:
        assert self.client is not None
        return self.client.call(method, path, body, timeout=WAIT_S)

    def poll(self) -> None:
        paths = ("/v1/vms", "/v1/host")
        i = 0
        while not self.stop_polling.is_set():
            t = time.perf_counter()
            try:
                self.call("GET", paths[i % 2])
            except DaemonError as e:
                self.failures.append(f"GET {paths[i % 2]}: {e}")
            self.read_lat.append(time.perf_counter() - t)
            i += 1

    def op(self, name: str, verb: str) -> None:
        t = time.perf_counter()
        try:
            vm = self.call("POST", f"/v1/vms/{name}/{verb}")
        except DaemonError as e:
            self.failures.append(f"{verb} {name}: {e}")
            return
        self.op_lat[verb].append(time.perf_counter() - t)
        want = {"start": "running", "destroy": "stopped", "shutdown": "running"}[verb]
        if not isinstance(vm, dict) or vm.get("state") not in (want, "stopped"):
            self.failures.append(f"{verb} {name}: state {vm!r}")

    def wait_states(self, want: dict[str, str]) -> dict[str, dict[str, object]]:
        deadline = time.monotonic() + WAIT_S
        while True:
            vms = {v["name"]: v for v in self.call("GET", "/v1/vms")["vms"]}  # type: ignore[index]
            if all(vms[n]["state"] == s for n, s in want.items()):
                return vms
            if time.monotonic() > deadline:
                bad = {n: vms[n]["state"] for n, s in want.items() if vms[n]["state"] != s}
                self.failures.append(f"gave up waiting for states: {bad}")
                return vms
            time.sleep(0.1)

    def run(self, rounds: int) -> None:
        names = [f"load{i:02d}" for i in range(self.n)]
        for name in names:
            self.call("POST", "/v1/vms", {"name": name, "kernel": str(self.kernel),
                                          "engine": "emu", "memory_mib": self.mem})
        poller = threading.Thread(target=self.poll, daemon=True)
        poller.start()
        try:
            with ThreadPoolExecutor(self.n) as pool:
                for r in range(rounds):
                    t0 = time.perf_counter()
                    list(pool.map(lambda n: self.op(n, "start"), names))
                    self.wait_states({n: "running" for n in names})
                    half = self.n // 2
                    list(pool.map(lambda n: self.op(n, "shutdown"), names[:half]))
                    list(pool.map(lambda n: self.op(n, "destroy"), names[half:]))
                    vms = self.wait_states({n: "stopped" for n in names})
                    for n in names:
                        want = "shut down" if n in names[:half] else "destroyed"
                        if vms[n]["last_exit"] != want:
                            self.failures.append(f"round {r}: {n} ended "
                                                 f"{vms[n]['last_exit']!r}, not {want!r}")
                    print(f"round {r + 1}/{rounds}: {self.n} VMs started and stopped in "
                          f"{time.perf_counter() - t0:.1f} s, failures so far "
                          f"{len(self.failures)}", flush=True)
        finally:
            self.stop_polling.set()
            poller.join(timeout=WAIT_S)
        events = self.call("GET", "/v1/events?limit=1000")["events"]  # type: ignore[index]
        crashed = [e for e in events if e["kind"] in ("crashed", "start-failed", "lost")]
        self.failures += [f"event: {e['vm']} {e['kind']}: {e['message']}" for e in crashed]

    def reap(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.daemon.pid, signal.SIGKILL)
            self.daemon.wait(timeout=30)
        for lock in (self.state / "vms").glob("*.lock"):
            pid = rundir.holder(lock)
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)


def build_counter(out: Path) -> Path:
    from guestbuild import GuestBuilder
    out.mkdir(parents=True, exist_ok=True)
    return GuestBuilder(out)("counter")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vms", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mem", type=int, default=8, metavar="MIB")
    ap.add_argument("--kernel", type=Path, default=None,
                    help="the guest (default: tests/guests/core/counter.S, built here)")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pyhv-load-") as tmp:
        kernel = args.kernel or build_counter(Path(tmp) / "guests")
        load = Load(Path(tmp) / "s", kernel.absolute(), args.vms, args.mem)
        t0 = time.perf_counter()
        try:
            load.start_daemon()
            load.run(args.rounds)
        finally:
            load.reap()
        wall = time.perf_counter() - t0
    ms = [x * 1000 for x in load.read_lat]
    figures = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "vms": args.vms, "rounds": args.rounds, "failures": len(load.failures),
        "wall_s": round(wall, 1), "api_requests": len(ms),
        "api_p50_ms": round(pct(ms, 50), 2), "api_p99_ms": round(pct(ms, 99), 2),
        "api_max_ms": round(max(ms, default=float("nan")), 2),
    }
    for verb, lat in load.op_lat.items():
        figures[f"{verb}_p50_s"] = round(pct(lat, 50), 2)
        figures[f"{verb}_p99_s"] = round(pct(lat, 99), 2)
    print(f"host daemon under load: {args.vms} VMs (emu, {args.mem} MiB, counter guest), "
          f"{args.rounds} round(s) of start-all / stop-all, {figures['wall_s']} s, "
          f"{os.cpu_count()} host CPUs, {figures['date']}")
    print(f"  API reads (GET /v1/vms, /v1/host) under load: {len(ms)} requests, p50 "
          f"{figures['api_p50_ms']} ms, p99 {figures['api_p99_ms']} ms, max "
          f"{figures['api_max_ms']} ms")
    for verb in load.op_lat:
        print(f"  POST {verb}: p50 {figures[f'{verb}_p50_s']} s, p99 "
              f"{figures[f'{verb}_p99_s']} s")
    print(f"  failures: {len(load.failures)}")
    for f in load.failures[:20]:
        print(f"    {f}")
    if args.json:
        print(json.dumps(figures))
    return 1 if load.failures else 0


if __name__ == "__main__":
    sys.exit(main())
