"""The host daemon's CPU scheduling: each VM definition's CPU settings through pyhv.sched.

A definition's `cpu_shares`, `cpu_reservation` and `cpu_limit` (percent of one host CPU,
as pyhv.sched counts them) and `pin` (one CPU list for every vCPU, or one per vCPU)
become a `pyhv.sched.CpuSettings`; the checks are pyhv.sched's:
- define: the settings on their own (ranges, limit >= reservation, reservation and
  limit within 100% x vCPUs, pins naming CPUs this host offers): 422 when not;
- start: admission next to the VMs that run (`sched.admit`: their reservations must fit
  the host's CPUs and every pinned set; vCPUs may be overcommitted): 409 when not.
Every VM the daemon starts is placed in its own cgroup, `<daemon's cgroup>/<parent>/
<name>`, with `parent` = pyhv-hostd-<hash of the state directory> (two daemons never
share groups), right after its process is spawned; then every running VM's weight is
recomputed (`sched.weights`: reservations become minimum weights) and written with its
limit. A VM that ends has its group removed and the others are reweighed. Adoption
after a restart puts an adopted VM back in its group (creating it if needed) and
reweighs. Pinning is the VM process's own (`pyhv run --pin`, per vCPU thread).

Without a usable CPU controller (no cgroup mounted, not root), VMs without CPU
settings run unplaced, and a start of a VM that has some is refused (409) with the
reason: settings are never silently ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

from pyhv import sched
from pyhv.errors import HostError as PyhvHostError
from pyhv.hostd.models import VmDefinition
from pyhv.sched.settings import SHARES_DEFAULT


def settings(d: VmDefinition) -> sched.CpuSettings:
    """The definition's CpuSettings (ConfigError when they are not valid)."""
    pin = None if d.pin is None else tuple(sched.parse_cpulist(p) for p in d.pin)
    shares = d.cpu_shares if d.cpu_shares is not None else SHARES_DEFAULT * d.vcpus
    return sched.CpuSettings(shares=shares, reservation=float(d.cpu_reservation or 0.0),
                             limit=None if d.cpu_limit is None else float(d.cpu_limit),
                             pin=pin)


def vm_cpu(d: VmDefinition) -> sched.VmCpu:
    return sched.VmCpu(d.name, d.vcpus, settings(d))


def wants_cgroup(d: VmDefinition) -> bool:
    return (d.cpu_shares, d.cpu_reservation, d.cpu_limit) != (None, None, None)


def pin_args(d: VmDefinition) -> list[str]:
    """`pyhv run --pin` words for the definition's pin."""
    if d.pin is None:
        return []
    if len(d.pin) == 1:
        return ["--pin", d.pin[0]]
    out: list[str] = []
    for i, cpus in enumerate(d.pin):
        out += ["--pin", f"{i}={cpus}"]
    return out


class CpuPlacer:
    def __init__(self, state_dir: Path) -> None:
        self.host = sched.HostCpus.detect()
        self.fs: sched.CgroupFs | None = None
        self.unavailable: str | None = None
        try:
            self.fs = sched.detect()
        except sched.CgroupUnavailable as e:
            self.unavailable = str(e)
        digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]
        self.parent = f"pyhv-hostd-{digest}"

    def describe(self) -> str:
        return self.fs.describe() if self.fs is not None else \
            f"unavailable: {self.unavailable}"

    def check(self, d: VmDefinition) -> None:
        """The settings on their own (ConfigError / AdmissionError)."""
        sched.admit([], vm_cpu(d), self.host)

    def admit(self, running: list[VmDefinition], d: VmDefinition) -> None:
        sched.admit([vm_cpu(x) for x in running], vm_cpu(d), self.host)

    def group(self, name: str) -> sched.CpuCgroup | None:
        return None if self.fs is None else self.fs.group(name, parent=self.parent)

    def place(self, d: VmDefinition, pid: int) -> None:
        """Put the VM's process in its group (pyhv.errors.HostError on failure)."""
        g = self.group(d.name)
        if g is None:
            if wants_cgroup(d):
                raise PyhvHostError(f"the VM has CPU settings but the CPU controller is "
                                    f"{self.describe()}")
            return
        g.create()
        g.add(pid)

    def reweigh(self, running: list[VmDefinition]) -> None:
        if self.fs is None or not running:
            return
        w = sched.weights([vm_cpu(x) for x in running], self.host)
        for x in running:
            g = self.group(x.name)
            if g is not None and g.exists():
                g.apply(w[x.name], None if x.cpu_limit is None else float(x.cpu_limit))

    def remove(self, name: str) -> None:
        g = self.group(name)
        if g is None or not g.exists():
            return
        g.remove()
        with contextlib.suppress(OSError):      # the parent goes with its last VM
            g.cpu_dir.parent.rmdir()
        if g.acct_dir is not None:
            with contextlib.suppress(OSError):
                g.acct_dir.parent.rmdir()

    def info(self, d: VmDefinition) -> dict[str, Any]:
        """The settings, and the kernel's view of the VM's group when it has one."""
        s = settings(d)
        out: dict[str, Any] = {
            "cpu_shares": s.shares, "cpu_reservation": s.reservation,
            "cpu_limit": s.limit, "pin": d.pin, "controller": self.describe(),
            "cgroup": None, "cgroup_values": None, "usage_ns": None,
        }
        g = self.group(d.name)
        if g is not None and g.exists():
            with contextlib.suppress(PyhvHostError):
                out["cgroup"] = str(g.cpu_dir)
                out["cgroup_values"] = g.values()
                out["usage_ns"] = g.usage_ns()
        return out
