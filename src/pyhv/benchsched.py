"""`pyhv bench sched`: the article's CPU scheduling exercise, measured from the guests.

Design. Every VM is a real `python -m pyhv run --engine kvm` process running the spin
guest (pyhv.schedguest: a work loop at CPL 3 that reports each chunk of work at port
0x80), with its own cgroup (`--cpu-shares/--cpu-reservation/--cpu-limit`) and its vCPU
thread pinned to one physical CPU (`--pin`), every VM of a scenario on the same CPU.
The VMs run in their own parent group and registry (PYHV_CGROUP_PARENT,
PYHV_SCHED_DIR), so admission control and the reservation weights see only them.
After a warm-up, each VM's progress counter (control API `GET /stats`,
io_ports["0x0080"]) and its cgroup's CPU time (cpuacct) are read, again after the
window; rates are per second over each VM's own interval. A scenario's VMs start
together and are stopped (SIGTERM) after the second reading.

Figures per VM, each the median over `repeat` rounds (every round runs every
scenario, the solo baseline first):
- guest share: its chunks over all the scenario's VMs' chunks: the split among the
  VMs, as the guests counted it, whatever other load the host had (docs/sched.md: the
  guarantees hold inside pyhv's group; the host is shared);
- guest cpu: its chunks per second over the solo VM's chunks per CPU-second in the same
  round (the solo VM's rate over its cgroup's CPU time): the CPU, in % of one, that the
  guest's own counter says it got;
- host cpu: its cgroup's CPU time over the interval (% of one CPU), host accounting.
Expected values are the article's: shares 50/50 and 67/33, a 50% reservation holding
against two others (who then split the rest, 25/25; without the reservation, 33 each),
all as guest shares; a limit of 25% of one CPU, as guest cpu, for a VM alone on its CPU
(a limit is absolute: it caps a VM that could have more; the share of the periods in
which the kernel throttled its group, from cpu.stat, shows the cap at work).

Invariants: no figure is assumed: a VM whose counter does not move, or a run that
fails, is an error naming the VM (BenchError), never a number; every subprocess has a
timeout and is killed on every path; the cgroups are removed by the VMs themselves
(checked: a leftover group is an error).
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyhv.errors import HostError
from pyhv.sched.cgroup import CgroupFs, CpuCgroup, detect
from pyhv.schedguest import PROGRESS_PORT, build_spin
from pyhv.vmclient import VmError, call


class BenchError(HostError):
    pass


@dataclass(frozen=True)
class VmSpec:
    name: str
    # what the article's exercise expects, in % (None: nothing, "the rest"), of `by`:
    # "share" (of the scenario's work) or "cpu" (of one CPU: a limit is absolute)
    expect: float | None
    shares: int = 1000
    reservation: float = 0.0
    limit: float | None = None
    by: str = "share"

    def options(self) -> list[str]:
        out = ["--cpu-shares", str(self.shares)]
        if self.reservation:
            out += ["--cpu-reservation", f"{self.reservation:g}"]
        if self.limit is not None:
            out += ["--cpu-limit", f"{self.limit:g}"]
        return out

    def label(self) -> str:
        out = [f"shares {self.shares}"]
        if self.reservation:
            out.append(f"reservation {self.reservation:g}%")
        if self.limit is not None:
            out.append(f"limit {self.limit:g}%")
        return ", ".join(out)


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    vms: tuple[VmSpec, ...]


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("solo", "one VM alone: the 100% baseline", (VmSpec("A", 100),)),
    Scenario("equal", "two VMs, equal shares", (VmSpec("A", 50), VmSpec("B", 50))),
    Scenario("shares", "shares 2:1", (VmSpec("A", 200 / 3, shares=2000),
                                      VmSpec("B", 100 / 3))),
    Scenario("limit", "one VM limited to 25% of a CPU, alone on it",
             (VmSpec("A", 25, limit=25, by="cpu"),)),
    Scenario("three", "three VMs, equal shares", (VmSpec("A", 100 / 3), VmSpec("B", 100 / 3),
                                                  VmSpec("C", 100 / 3))),
    Scenario("reserve", "A reserves 50% against two others",
             (VmSpec("A", 50, reservation=50), VmSpec("B", 25), VmSpec("C", 25))),
)
SCENARIO_KEYS = tuple(s.key for s in SCENARIOS)


@dataclass
class Sample:
    """One VM in one round: the readings at both ends of its interval."""
    chunks: int                   # progress reports in the interval
    seconds: float                # the interval (host monotonic)
    cpu_ns: int | None            # its cgroup's CPU time in the interval
    values: dict[str, str]        # its cgroup's controller files, as the kernel says
    throttled: float | None = None   # share of CFS periods its group was throttled in

    @property
    def rate(self) -> float:
        return self.chunks / self.seconds


@dataclass
class Results:
    # (scenario, vm) -> one Sample per round
    samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)

    def add(self, scenario: str, vm: str, s: Sample) -> None:
        self.samples.setdefault((scenario, vm), []).append(s)

    def calibration(self, i: int) -> float:
        """Round i's chunks per CPU-second: the solo VM's rate over the CPU its cgroup
        got (the host's other load does not change it); the solo rate alone when the
        host has no CPU accounting."""
        solo = self.samples[("solo", "A")][i]
        if solo.cpu_ns is None or solo.cpu_ns <= 0:
            return solo.rate
        return solo.chunks / (solo.cpu_ns / 1e9)

    def guest_pct(self, scenario: str, vm: str) -> float:
        """Median over rounds of the CPU the VM's guest says it got, % of one CPU: its
        chunks per second over that round's chunks per CPU-second."""
        ss = self.samples[(scenario, vm)]
        return statistics.median(100 * s.rate / self.calibration(i) for i, s in enumerate(ss))

    def share_pct(self, scenario: str, vm: str, names: Sequence[str]) -> float:
        rounds = len(self.samples[(scenario, vm)])
        vals = []
        for i in range(rounds):
            total = sum(self.samples[(scenario, n)][i].rate for n in names)
            vals.append(100 * self.samples[(scenario, vm)][i].rate / total)
        return statistics.median(vals)

    def throttled_pct(self, scenario: str, vm: str) -> float | None:
        vals = [100 * s.throttled for s in self.samples[(scenario, vm)]
                if s.throttled is not None]
        return statistics.median(vals) if vals else None

    def host_pct(self, scenario: str, vm: str) -> float | None:
        vals = [100 * s.cpu_ns / 1e9 / s.seconds for s in self.samples[(scenario, vm)]
                if s.cpu_ns is not None]
        return statistics.median(vals) if vals else None


@dataclass
class Setup:
    kernel: Path
    cpu: int
    parent: str
    state: Path
    socks: Path
    fs: CgroupFs
    timeout: float = 120.0


def _argv(setup: Setup, vm: VmSpec, sock: Path) -> list[str]:
    return [sys.executable, "-m", "pyhv", "run", "--engine", "kvm", "--kernel",
            str(setup.kernel), "--timeout", f"{setup.timeout:g}", "--api-sock", str(sock),
            "--pin", str(setup.cpu), *vm.options()]


def _count(sock: Path) -> int:
    st = call(sock, "GET", "/stats")
    return int(st.get("io_ports", {}).get(f"{PROGRESS_PORT:#06x}", 0))


def _reading(sock: Path, group: CpuCgroup) -> tuple[float, int, int | None]:
    t0 = time.monotonic()
    n = _count(sock)
    usage = group.usage_ns()
    return (t0 + time.monotonic()) / 2, n, usage


def run_scenario(setup: Setup, sc: Scenario, warmup: float, window: float
                 ) -> dict[str, Sample]:
    """Start the scenario's VMs together, measure them over `window`, stop them."""
    env = dict(os.environ, PYHV_CGROUP_PARENT=setup.parent, PYHV_SCHED_DIR=str(setup.state))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    socks = {vm.name: setup.socks / f"{sc.key}-{vm.name}.sock" for vm in sc.vms}
    try:
        for vm in sc.vms:
            procs[vm.name] = subprocess.Popen(
                _argv(setup, vm, socks[vm.name]), env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        groups = {n: setup.fs.group(f"run-{p.pid}", setup.parent) for n, p in procs.items()}
        deadline = time.monotonic() + 60
        for n, p in procs.items():
            while True:
                if p.poll() is not None:
                    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
                    raise BenchError(f"{sc.key}: VM {n} ended with status {p.returncode}: "
                                     f"{err.strip().splitlines()[-1:] or 'no message'}")
                try:
                    if p.pid in groups[n].procs():
                        _count(socks[n])
                        break
                except (VmError, HostError):
                    pass
                if time.monotonic() > deadline:
                    raise BenchError(f"{sc.key}: VM {n} did not start within 60 s")
                time.sleep(0.05)
        time.sleep(warmup)
        first = {n: _reading(socks[n], groups[n]) for n in procs}
        thr1 = {n: groups[n].throttled() for n in procs}
        values = {n: groups[n].values() for n in procs}
        time.sleep(window)
        last = {n: _reading(socks[n], groups[n]) for n in procs}
        thr2 = {n: groups[n].throttled() for n in procs}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate(timeout=10)
    out = {}
    for n in procs:
        (t1, c1, u1), (t2, c2, u2) = first[n], last[n]
        if c2 <= c1:
            raise BenchError(f"{sc.key}: VM {n}'s progress counter did not move "
                             f"({c1} -> {c2})")
        periods = thr2[n][1] - thr1[n][1]
        out[n] = Sample(c2 - c1, t2 - t1, None if u1 is None or u2 is None else u2 - u1,
                        values[n], (thr2[n][0] - thr1[n][0]) / periods if periods else None)
    for n, g in groups.items():
        if g.exists():
            raise BenchError(f"{sc.key}: VM {n} left its cgroup {g.cpu_dir} behind")
    return out


def measure(scenarios: Sequence[str], repeat: int, window: float, cpu: int,
            warmup: float = 1.0, iters: int = 2_000_000,
            progress: Callable[[str], None] | None = None) -> Results:
    """`repeat` rounds of the solo baseline and each chosen scenario."""
    fs = detect()
    res = Results()
    chosen = [s for s in SCENARIOS if s.key in scenarios or s.key == "solo"]
    with tempfile.TemporaryDirectory(prefix="pyhv-sched-") as tmp:
        t = Path(tmp)
        setup = Setup(build_spin(t, iters), cpu, f"pyhv-bench-{os.getpid()}", t / "state",
                      t, fs, timeout=warmup + window + 120)
        try:
            for r in range(repeat):
                for sc in chosen:
                    if progress is not None:
                        progress(f"round {r + 1}/{repeat}: {sc.key} ({sc.title})")
                    for n, s in run_scenario(setup, sc, warmup, window).items():
                        res.add(sc.key, n, s)
        finally:
            for base in {fs.cpu_base, fs.acct_base or fs.cpu_base}:
                d = base / setup.parent
                if d.is_dir():
                    with contextlib.suppress(OSError):   # a VM's leftover: reported above
                        d.rmdir()
    return res


def table(res: Results, scenarios: Sequence[str]) -> str:
    lines = [f"{'scenario':9} {'VM':2} {'settings':30} {'expected':>14} {'guest share':>11} "
             f"{'guest cpu':>9} {'host cpu':>8} {'throttled':>9}"]
    worst = 0.0
    for sc in SCENARIOS:
        if sc.key not in scenarios and sc.key != "solo":
            continue
        names = [vm.name for vm in sc.vms]
        for vm in sc.vms:
            if (sc.key, vm.name) not in res.samples:
                continue
            host = res.host_pct(sc.key, vm.name)
            share = res.share_pct(sc.key, vm.name, names)
            guest = res.guest_pct(sc.key, vm.name)
            if vm.expect is None:
                want = "the rest"
            else:
                want = f"{vm.expect:.1f}% {vm.by}"
                if sc.key != "solo":
                    worst = max(worst, abs((share if vm.by == "share" else guest)
                                           - vm.expect))
            thr = res.throttled_pct(sc.key, vm.name) if vm.limit is not None else None
            lines.append(
                f"{sc.key:9} {vm.name:2} {vm.label():30} {want:>14} {share:10.1f}% "
                f"{guest:8.1f}% " + (f"{host:7.1f}%" if host is not None else f"{'-':>8}")
                + (f" {thr:8.1f}%" if thr is not None else f" {'-':>9}"))
    lines.append(f"\nlargest distance from the expected value: {worst:.1f} points")
    return "\n".join(lines)
