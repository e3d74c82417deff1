"""A VM's cgroup for the kernel's CPU controller, on cgroup v2 or v1 (docs/sched.md).

Detection (`detect`): cgroup v2 when a cgroup2 mount offers the `cpu` controller (its
cgroup.controllers lists it); otherwise v1's `cpu` hierarchy, with `cpuacct` beside it
(mounted together as cpu,cpuacct or apart; docs/host.md: apart on pyhv's hosts, and a
cgroup2 mount with no controllers at /sys/fs/cgroup/unified). Neither, or not writable
(not root, a read-only container mount): `CgroupUnavailable`, one line saying why.

Layout: `<controller root><own cgroup>/<parent>/<name>`: the VM's group under a parent
group ("pyhv" by default) below the cgroup of the process that detects, created on
demand (the parent is left in place: other VMs share it).

Values (one unit for both versions: the weight in shares' units, 1000 = ESX normal):
    v1: cpu.shares = weight (2..262144); cpu.cfs_period_us = 100000,
        cpu.cfs_quota_us = limit% x period / 100, or -1 (no limit)
    v2: cpu.weight = weight / 10 (1..10000; 1000 -> 100, v2's default);
        cpu.max = "<quota> 100000" or "max 100000"
Usage: v1 cpuacct.usage (ns); v2 cpu.stat usage_usec x 1000.

Invariants: nothing is written before `create()`; `remove()` moves this process out
first if it is inside, waits briefly for exiting tasks, and leaves no empty group behind
unless the kernel refuses (then it says so). Every write error is a HostError naming
the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pyhv.errors import HostError
from pyhv.sched.settings import SHARES_MAX, SHARES_MIN

PERIOD_US = 100_000
DEFAULT_PARENT = "pyhv"
V2_WEIGHT_MAX = 10_000


class CgroupUnavailable(HostError):
    """No writable CPU controller: the caller skips CPU control (or refuses it)."""


def _mounts(path: Path = Path("/proc/self/mounts")) -> list[tuple[str, str, set[str]]]:
    out = []
    for line in path.read_text().splitlines():
        f = line.split()
        if len(f) >= 4 and f[2] in ("cgroup", "cgroup2"):
            out.append((f[2], f[1].replace("\\040", " "), set(f[3].split(","))))
    return out


def _read_mounts(mounts: Path) -> list[tuple[str, str, set[str]]]:
    """The cgroup mounts; CgroupUnavailable if `mounts` cannot be read."""
    try:
        return _mounts(mounts)
    except OSError as e:
        raise CgroupUnavailable(f"cannot read {mounts}: {e.strerror}") from e


def _v2_mount(ms: list[tuple[str, str, set[str]]], controller: str) -> str | None:
    """The first cgroup2 mount whose cgroup.controllers offers `controller`, or None."""
    for kind, where, _opts in ms:
        if kind == "cgroup2":
            try:
                ctrls = (Path(where) / "cgroup.controllers").read_text().split()
            except OSError:
                continue
            if controller in ctrls:
                return where
    return None


def _own_path(controller: str | None) -> str:
    """This process's cgroup in a v1 hierarchy (`controller`) or in v2 (None)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hid, ctrls, path = line.split(":", 2)
            if (controller is None and hid == "0" and ctrls == "") or \
                    (controller is not None and controller in ctrls.split(",")):
                return path
    return "/"


def _base(mount: str, controller: str | None) -> Path:
    """Where this process's cgroup lies in a mount (the mount root if it is not there,
    as in a container whose cgroup fs is its own subtree)."""
    p = Path(mount) / _own_path(controller).lstrip("/")
    return p if p.is_dir() else Path(mount)


@dataclass(frozen=True)
class CgroupFs:
    version: int                 # 1 or 2
    cpu_base: Path               # where VM groups' parents go (cpu controller)
    acct_base: Path | None       # v1's cpuacct (None: usage unknown, or v2)

    def group(self, name: str, parent: str = DEFAULT_PARENT) -> CpuCgroup:
        return CpuCgroup(self, parent, name)

    def describe(self) -> str:
        if self.version == 2:
            return f"cgroup v2 at {self.cpu_base}"
        return f"cgroup v1: cpu at {self.cpu_base}, cpuacct at {self.acct_base or '-'}"


def detect(mounts: Path = Path("/proc/self/mounts")) -> CgroupFs:
    """The host's CPU controller (see the docstring); CgroupUnavailable if none usable."""
    ms = _read_mounts(mounts)
    v2 = _v2_mount(ms, "cpu")
    fs = None if v2 is None else CgroupFs(2, _base(v2, None), None)
    if fs is None:
        cpu = next((w for k, w, o in ms if k == "cgroup" and "cpu" in o), None)
        acct = next((w for k, w, o in ms if k == "cgroup" and "cpuacct" in o), None)
        if cpu is None:
            raise CgroupUnavailable("no CPU controller is mounted (neither a cgroup2 "
                                    "mount offering 'cpu' nor a v1 'cpu' hierarchy)")
        fs = CgroupFs(1, _base(cpu, "cpu"), None if acct is None else _base(acct, "cpuacct"))
    if not os.access(fs.cpu_base, os.W_OK):
        raise CgroupUnavailable(f"the CPU controller at {fs.cpu_base} is not writable "
                                "(CPU shares, reservations and limits need root or a "
                                "delegated cgroup)")
    return fs


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise HostError(f"cannot write {value!r} to {path}: {e.strerror or e}") from e


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise HostError(f"cannot read {path}: {e.strerror or e}") from e


def cgroup_value(fs: CgroupFs, weight: int) -> int:
    """The weight in the controller's own unit."""
    w = max(SHARES_MIN, min(SHARES_MAX, weight))
    return w if fs.version == 1 else max(1, min(V2_WEIGHT_MAX, round(w / 10)))


class CpuCgroup:
    """One VM's group in the CPU controller (and v1's cpuacct)."""

    def __init__(self, fs: CgroupFs, parent: str, name: str) -> None:
        for part in (parent, name):
            if not part or "/" in part or part in (".", ".."):
                raise HostError(f"bad cgroup name {part!r}")
        self.fs, self.parent, self.name = fs, parent, name
        self.cpu_dir = fs.cpu_base / parent / name
        self.acct_dir = None if fs.acct_base is None else fs.acct_base / parent / name

    def _dirs(self) -> list[Path]:
        dirs = [self.cpu_dir]
        if self.acct_dir is not None and self.acct_dir != self.cpu_dir:
            dirs.append(self.acct_dir)
        return dirs

    def exists(self) -> bool:
        return self.cpu_dir.is_dir()

    def create(self) -> None:
        """Make the parent (if missing) and this group; v2: enable `cpu` below both."""
        if self.fs.version == 2:
            for d in (self.fs.cpu_base, self.fs.cpu_base / self.parent):
                d.mkdir(exist_ok=True)
                ctl = d / "cgroup.subtree_control"
                if "cpu" not in _read(ctl).split():
                    _write(ctl, "+cpu")
        for d in self._dirs():
            try:
                d.parent.mkdir(exist_ok=True)
                d.mkdir(exist_ok=True)
            except OSError as e:
                raise HostError(f"cannot create the cgroup {d}: {e.strerror or e}") from e
        if self.fs.version == 2 and "cpu" not in _read(self.cpu_dir /
                                                       "cgroup.controllers").split():
            raise HostError(f"{self.cpu_dir} has no cpu controller after enabling it")

    def add(self, pid: int) -> None:
        """Move process `pid` (all its threads) into the group."""
        for d in self._dirs():
            _write(d / "cgroup.procs", str(pid))

    def procs(self) -> list[int]:
        if not self.exists():
            return []
        return [int(x) for x in _read(self.cpu_dir / "cgroup.procs").split()]

    def apply(self, weight: int, limit_pct: float | None) -> None:
        """Write the effective weight (shares' units) and the limit (% of one CPU)."""
        quota = None if limit_pct is None else max(1000, round(limit_pct * PERIOD_US / 100))
        if self.fs.version == 1:
            _write(self.cpu_dir / "cpu.shares", str(cgroup_value(self.fs, weight)))
            _write(self.cpu_dir / "cpu.cfs_period_us", str(PERIOD_US))
            _write(self.cpu_dir / "cpu.cfs_quota_us", "-1" if quota is None else str(quota))
        else:
            _write(self.cpu_dir / "cpu.weight", str(cgroup_value(self.fs, weight)))
            _write(self.cpu_dir / "cpu.max",
                   f"{'max' if quota is None else quota} {PERIOD_US}")

    def values(self) -> dict[str, str]:
        """The controller files as the kernel reports them (for `schedinfo` and tests)."""
        names = ("cpu.shares", "cpu.cfs_period_us", "cpu.cfs_quota_us") \
            if self.fs.version == 1 else ("cpu.weight", "cpu.max")
        return {n: _read(self.cpu_dir / n).strip() for n in names}

    def usage_ns(self) -> int | None:
        """CPU time used by the group's tasks since it was created (None: unknown)."""
        if self.fs.version == 2:
            for line in _read(self.cpu_dir / "cpu.stat").splitlines():
                key, _, val = line.partition(" ")
                if key == "usage_usec":
                    return int(val) * 1000
            return None
        if self.acct_dir is None:
            return None
        return int(_read(self.acct_dir / "cpuacct.usage"))

    def throttled(self) -> tuple[int, int]:
        """(periods throttled, periods) from cpu.stat: how often the limit bit."""
        stat = dict(line.split(" ", 1) for line in
                    _read(self.cpu_dir / "cpu.stat").splitlines() if " " in line)
        return int(stat.get("nr_throttled", 0)), int(stat.get("nr_periods", 0))

    def remove(self, wait_s: float = 2.0) -> None:
        """Take this process out if inside (back to the parent's parent, where it was
        placed from), wait up to `wait_s` for exiting tasks, then remove the group."""
        me = os.getpid()
        for d in self._dirs():
            if not d.is_dir():
                continue
            if me in (int(x) for x in _read(d / "cgroup.procs").split()):
                _write(d.parent.parent / "cgroup.procs", str(me))
        deadline = time.monotonic() + wait_s
        for d in self._dirs():
            while d.is_dir():
                try:
                    d.rmdir()
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise HostError(f"cannot remove the cgroup {d}: "
                                        f"{e.strerror or e}") from e
                    time.sleep(0.02)
