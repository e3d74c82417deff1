"""pyhv.sched on the host's real CPU controller (cgroup v1 here, v2 where mounted):
a group is created, its values written as the kernel reports them, a process placed
in it and counted, and the group removed; `pyhv run --cpu-*` does the same for its own
process and pins its vCPU thread. Skipped, with the reason, where the cgroup fs is not
writable (not root, a read-only container mount) or the tools are missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyhv.engines import engine_class
from pyhv.errors import HostError
from pyhv.sched import CgroupFs, CgroupUnavailable, CpuSettings, HostCpus, VmCpu, detect
from pyhv.sched.placement import Placement
from pyhv.vmclient import VmError, call

try:
    FS: CgroupFs | None = detect()
    WHY = ""
except CgroupUnavailable as e:
    FS, WHY = None, str(e)
pytestmark = pytest.mark.skipif(FS is None, reason=f"no writable CPU controller: {WHY}")
PARENT = f"pyhv-test-{os.getpid()}"


@pytest.fixture
def fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CgroupFs]:
    assert FS is not None
    monkeypatch.setenv("PYHV_SCHED_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PYHV_CGROUP_PARENT", PARENT)
    yield FS
    for base in {FS.cpu_base, FS.acct_base or FS.cpu_base}:
        d = base / PARENT
        if d.is_dir():
            for child in d.iterdir():
                if child.is_dir():
                    child.rmdir()
            d.rmdir()


def test_group_lifecycle(fs: CgroupFs) -> None:
    g = fs.group("vm1", PARENT)
    assert not g.exists()
    g.create()
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        g.apply(2000, 25)
        g.add(sleeper.pid)
        assert g.procs() == [sleeper.pid]
        if fs.version == 1:
            assert g.values() == {"cpu.shares": "2000", "cpu.cfs_period_us": "100000",
                                  "cpu.cfs_quota_us": "25000"}
            assert (fs.acct_base is None or
                    Path(f"/proc/{sleeper.pid}/cgroup").read_text().count(PARENT) >= 2)
        else:
            assert g.values() == {"cpu.weight": "200", "cpu.max": "25000 100000"}
        g.apply(1000, None)
        assert g.values().get("cpu.cfs_quota_us", "-1") == "-1"
        assert g.values().get("cpu.max", "max 100000") == "max 100000"
        assert isinstance(g.usage_ns(), int)
        with pytest.raises(HostError, match="cannot remove"):
            g.remove(wait_s=0.1)                  # a live process is inside
    finally:
        sleeper.kill()
        sleeper.wait(timeout=10)
    g.remove()
    assert not g.exists() and not (fs.acct_base and (fs.acct_base / PARENT / "vm1").exists())


def test_usage_counts_the_groups_cpu_time(fs: CgroupFs) -> None:
    g = fs.group("burn", PARENT)
    g.create()
    try:
        p = subprocess.Popen([sys.executable, "-c", "import time\nt=time.process_time()\n"
                              "while time.process_time() - t < 0.2: pass"])
        g.add(p.pid)
        assert p.wait(timeout=60) == 0
        usage = g.usage_ns()
        assert usage is None or usage >= 100_000_000    # at least half of what it burnt
    finally:
        g.remove()


def test_a_placed_process_never_runs_in_its_group_without_its_limit(
        fs: CgroupFs, monkeypatch: pytest.MonkeyPatch) -> None:
    """The group's limit is written before the process joins it: pyhv run's process
    was seen in its group with no quota yet (cpu.cfs_quota_us -1) on a loaded host."""
    from pyhv.sched.cgroup import CpuCgroup
    seen: list[dict[str, str]] = []
    add = CpuCgroup.add

    def add_and_look(self: CpuCgroup, pid: int) -> None:
        seen.append(self.values())
        add(self, pid)
    monkeypatch.setattr(CpuCgroup, "add", add_and_look)
    a = subprocess.Popen(["sleep", "30"])
    try:
        pa = Placement.open(VmCpu("a", 1, CpuSettings(limit=30)), pid=a.pid, fs=fs)
        quota = [v["cpu.cfs_quota_us"] if fs.version == 1 else v["cpu.max"].split()[0]
                 for v in seen]
        assert quota == ["30000"]
        assert pa.group.procs() == [a.pid]
        a.kill()
        a.wait(timeout=10)
        pa.close()
    finally:
        a.kill()
        a.wait(timeout=10)


def test_placement_admits_rebalances_and_cleans_up(fs: CgroupFs, tmp_path: Path) -> None:
    """Two processes placed as VMs: a reservation raises the reserved VM's weight,
    a second reservation that does not fit is refused and leaves nothing behind, and
    closing removes the group and the registry entry and rebalances the rest."""
    pin = (frozenset({min(HostCpus.detect().cpus)}),)
    a = subprocess.Popen(["sleep", "30"])
    b = subprocess.Popen(["sleep", "30"])
    try:
        pa = Placement.open(VmCpu("a", 1, CpuSettings(reservation=50, pin=pin)),
                            pid=a.pid, fs=fs)
        pb = Placement.open(VmCpu("b", 1, CpuSettings(pin=pin)), pid=b.pid, fs=fs)
        key = "cpu.shares" if fs.version == 1 else "cpu.weight"
        # 50% against one normal VM: 1000 of 2000, exactly its shares
        assert pa.group.values()[key] == ("1000" if fs.version == 1 else "100")
        assert pb.weight == 1000
        assert fs.group("a", PARENT).values()[key] == ("1000" if fs.version == 1 else "100")
        from pyhv.sched.admit import AdmissionError
        with pytest.raises(AdmissionError, match="reservations do not fit"):
            Placement.open(VmCpu("c", 1, CpuSettings(reservation=60, pin=pin)),
                           pid=os.getpid(), fs=fs)
        assert not fs.group("c", PARENT).exists()
        entries = sorted(p.name for p in (tmp_path / "state" / PARENT).iterdir())
        assert entries == ["a.json", "b.json"]
        b.kill()
        b.wait(timeout=10)
        pb.group.remove()          # b "died": its group is empty; a's next look drops it
        a.kill()
        a.wait(timeout=10)
        pa.close()
        assert not pa.group.exists() and not list((tmp_path / "state" / PARENT).iterdir())
    finally:
        for p in (a, b):
            p.kill()
            p.wait(timeout=10)


def test_reservation_raises_weight_of_reserved_vm(fs: CgroupFs) -> None:
    pin = (frozenset({min(HostCpus.detect().cpus)}),)
    procs = [subprocess.Popen(["sleep", "30"]) for _ in range(3)]
    places = []
    try:
        for name, p in zip(("b", "c"), procs[1:], strict=True):
            places.append(Placement.open(VmCpu(name, 1, CpuSettings(pin=pin)), pid=p.pid,
                                         fs=fs))
        places.append(Placement.open(VmCpu("r", 1, CpuSettings(reservation=50, pin=pin)),
                                     pid=procs[0].pid, fs=fs))
        assert places[-1].weight == 2000
        if fs.version == 1:
            assert places[-1].group.values()["cpu.shares"] == "2000"
            assert places[0].group.values()["cpu.shares"] == "1000"
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
        for pl in reversed(places):
            pl.close()


KVM_WHY = engine_class("kvm").probe()
TOOLS = [t for t in ("gcc", "ld") if shutil.which(t) is None]


@pytest.fixture(scope="module")
def spin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if TOOLS:
        pytest.skip(f"missing {TOOLS}")
    from pyhv.schedguest import build_spin
    return build_spin(tmp_path_factory.mktemp("spin"), 200_000)


def pyhv_run(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyhv", "run", *args]


@pytest.mark.skipif(KVM_WHY is not None, reason=f"kvm engine: {KVM_WHY}")
def test_pyhv_run_places_limits_and_pins_itself(fs: CgroupFs, spin: Path,
                                                tmp_path: Path) -> None:
    cpu = max(HostCpus.detect().cpus)
    sock = tmp_path / "vm.sock"
    p = subprocess.Popen(pyhv_run("--api-sock", str(sock), "--engine", "kvm", "--kernel",
                                  str(spin), "--timeout", "20", "--name",
                                  f"schedt{os.getpid()}", "--cpu-limit", "30",
                                  "--cpu-shares", "high", "--pin", str(cpu)),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL)
    g = fs.group(f"schedt{os.getpid()}", PARENT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and p.pid not in g.procs():
            time.sleep(0.05)
        assert g.procs() == [p.pid]
        vals = g.values()
        quota = vals["cpu.cfs_quota_us"] if fs.version == 1 else vals["cpu.max"].split()[0]
        assert quota == "30000"
        entry = json.loads((Path(os.environ["PYHV_SCHED_DIR"]) / PARENT /
                            f"schedt{os.getpid()}.json").read_text())
        assert entry["cpu"] == {"shares": 2000, "reservation": 0.0, "limit": 30.0,
                                "pin": [[cpu]]}
        # every thread of the VM (the vCPU's, the run loop's on kvm with one vCPU, and the
        # helpers) runs on the pinned CPU only, once the guest runs
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if call(sock, "GET", "/state")["state"] == "running":
                    break
            except VmError:
                time.sleep(0.05)
        masks = [next(ln.split(":")[1].strip() for ln in
                      (t / "status").read_text().splitlines()
                      if ln.startswith("Cpus_allowed_list"))
                 for t in Path(f"/proc/{p.pid}/task").iterdir()]
        assert masks and set(masks) == {str(cpu)}, masks
    finally:
        p.terminate()
        _, err = p.communicate(timeout=30)
    assert p.returncode == 143, err
    assert not g.exists()


@pytest.mark.parametrize("opts, msg", [
    (["--cpu-limit", "0"], "at least 1"),
    (["--cpu-reservation", "150"], "more than its 1 vCPU"),
    (["--cpu-shares", "lots"], "expected an integer"),
    (["--pin", "4095"], "does not offer"),
    (["--cpu-limit", "10", "--cpu-reservation", "20"], "below the reservation"),
])
def test_pyhv_run_refuses_bad_cpu_settings(fs: CgroupFs, tmp_path: Path, opts: list[str],
                                           msg: str) -> None:
    p = subprocess.run(pyhv_run("--kernel", str(tmp_path / "none"), *opts),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and msg in p.stderr, p.stderr
    assert not (fs.cpu_base / PARENT).exists() or not list((fs.cpu_base / PARENT).glob(
        "run-*"))


@pytest.mark.skipif(KVM_WHY is not None, reason=f"kvm engine: {KVM_WHY}")
def test_pyhv_run_admission_refuses_a_reservation_that_does_not_fit(
        fs: CgroupFs, spin: Path) -> None:
    cpu = str(min(HostCpus.detect().cpus))
    first = subprocess.Popen(pyhv_run("--engine", "kvm", "--kernel", str(spin),
                                      "--timeout", "20", "--cpu-reservation", "70",
                                      "--cpu-limit", "80", "--pin", cpu),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        g = fs.group(f"run-{first.pid}", PARENT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and first.pid not in g.procs():
            time.sleep(0.05)
        assert g.procs() == [first.pid]
        second = subprocess.run(pyhv_run("--engine", "kvm", "--kernel", str(spin),
                                         "--timeout", "5", "--cpu-reservation", "40",
                                         "--pin", cpu),
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert "CPU reservations do not fit CPU(s)" in second.stderr
        assert "110% reserved" in second.stderr
    finally:
        first.terminate()
        first.communicate(timeout=30)
