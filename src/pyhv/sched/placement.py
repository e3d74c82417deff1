"""A standalone VM's place in the host's CPU scheduling (`pyhv run --cpu-*`).

Without the host daemon, VMs started by separate `pyhv run` commands still share one
parent cgroup and one admission control: each VM registers its CPU settings as a JSON
file in a state directory (`$PYHV_SCHED_DIR`, default /run/pyhv-sched, one
subdirectory per parent group), under an exclusive `flock` on `<parent>.lock`. The
parent group is `$PYHV_CGROUP_PARENT`, default "pyhv".

`Placement.open`: under the lock, drop stale entries (their cgroup is gone or empty: a
VM that died without cleaning up; an empty leftover group is removed), run `admit`
against the live ones, create the VM's group, move this process into it, write the entry,
then rebalance: recompute `weights` for every member and write each group's weight
and limit (a new reservation can raise another VM's weight, a leaving one lowers it).
`close`: under the lock, remove the entry and the group, rebalance the rest.

Invariants: admission, creation and rebalancing happen under the one lock, so two runs
starting together cannot both take the last reserved CPU; a failure after the group was
created removes it again (nothing half-made); the host daemon uses the same functions
with its own inventory instead of these files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from pyhv.errors import HostError
from pyhv.sched.admit import HostCpus, admit, weights
from pyhv.sched.cgroup import DEFAULT_PARENT, CgroupFs, CpuCgroup, detect
from pyhv.sched.settings import CpuSettings, VmCpu


def state_dir() -> Path:
    return Path(os.environ.get("PYHV_SCHED_DIR", "/run/pyhv-sched"))


def default_parent() -> str:
    """The parent group: `$PYHV_CGROUP_PARENT` (tests use their own), else "pyhv"."""
    return os.environ.get("PYHV_CGROUP_PARENT", DEFAULT_PARENT)


@contextlib.contextmanager
def _locked(parent: str) -> Iterator[Path]:
    d = state_dir() / parent
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(state_dir() / f"{parent}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise HostError(f"cannot use the scheduling state directory {d}: "
                        f"{e.strerror or e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield d
    finally:
        os.close(fd)


def _members(fs: CgroupFs, parent: str, d: Path) -> list[VmCpu]:
    """The live VMs of `parent`; stale entries (and empty leftover groups) removed."""
    out = []
    for f in sorted(d.glob("*.json")):
        try:
            raw = json.loads(f.read_text())
            vm = VmCpu(raw["name"], int(raw["vcpus"]), CpuSettings.from_json(raw["cpu"]))
        except (OSError, ValueError, KeyError, TypeError):
            f.unlink(missing_ok=True)          # unreadable: not a member
            continue
        group = fs.group(vm.name, parent)
        if group.procs():
            out.append(vm)
            continue
        f.unlink(missing_ok=True)
        if group.exists():
            with contextlib.suppress(HostError):
                group.remove(wait_s=0)
    return out


def _rebalance(fs: CgroupFs, parent: str, vms: list[VmCpu], host: HostCpus
               ) -> dict[str, int]:
    ws = weights(vms, host)
    for vm in vms:
        fs.group(vm.name, parent).apply(ws[vm.name], vm.settings.limit)
    return ws


class Placement:
    def __init__(self, fs: CgroupFs, parent: str, vm: VmCpu, group: CpuCgroup,
                 weight: int) -> None:
        self.fs, self.parent, self.vm, self.group, self.weight = fs, parent, vm, group, weight
        self._closed = False

    @classmethod
    def open(cls, vm: VmCpu, parent: str | None = None, pid: int | None = None,
             fs: CgroupFs | None = None) -> Placement:
        """Admit `vm`, create its group and put process `pid` (default: this one) in it.
        Raises AdmissionError, CgroupUnavailable or HostError; leaves nothing behind."""
        fs = fs or detect()
        parent = parent or default_parent()
        host = HostCpus.detect()
        with _locked(parent) as d:
            members = _members(fs, parent, d)
            admit(members, vm, host)
            group = fs.group(vm.name, parent)
            entry = d / f"{vm.name}.json"
            try:
                group.create()
                entry.write_text(json.dumps({"name": vm.name, "vcpus": vm.vcpus,
                                             "cpu": vm.settings.to_json()}))
                ws = _rebalance(fs, parent, [*members, vm], host)
                # last: the process never runs in its group without the group's weight
                # and limit (one who sees it there sees them too)
                group.add(os.getpid() if pid is None else pid)
            except BaseException:
                entry.unlink(missing_ok=True)
                with contextlib.suppress(HostError):
                    group.remove()
                raise
        return cls(fs, parent, vm, group, ws[vm.name])

    def close(self) -> None:
        """Leave: remove the entry and the group, rebalance the others. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with _locked(self.parent) as d:
            (d / f"{self.vm.name}.json").unlink(missing_ok=True)
            try:
                self.group.remove()
            finally:
                rest = _members(self.fs, self.parent, d)
                if rest:
                    _rebalance(self.fs, self.parent, rest, HostCpus.detect())
