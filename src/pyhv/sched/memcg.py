"""A VM's memory limit: its process in a memory cgroup (cgroup v2 `memory.max`, v1
`memory.limit_in_bytes`), detected as the CPU controller is (pyhv.sched.cgroup).

The limit covers the whole VM process: guest RAM that the guest has touched, pyhv's
own Python heap and device buffers. Over it the kernel reclaims the group's pages
(swapping them where the host has swap), and when it cannot, its OOM killer ends a
process of the group: the VM's, and only the VM's (docs/sched.md, "Memory").

Layout: `<memory controller><own cgroup>/<parent>/<name>`, parent "pyhv" (or
$PYHV_CGROUP_PARENT). On pyhv's hosts the memory hierarchy is v1 and this process's own
memory cgroup is not the root (docs/host.md): groups go below it, so the host's limit
on that cgroup still holds over the VMs.

Invariants: a limit below MIN_LIMIT is refused (pyhv alone needs tens of MiB);
`remove()` takes this process out first if it is inside, then removes the group.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pyhv.errors import ConfigError, HostError
from pyhv.sched.cgroup import (
    CgroupUnavailable,
    _base,
    _read,
    _read_mounts,
    _v2_mount,
    _write,
)

MIN_LIMIT = 32 << 20


@dataclass(frozen=True)
class MemoryFs:
    version: int
    base: Path


def detect_memory(mounts: Path = Path("/proc/self/mounts")) -> MemoryFs:
    ms = _read_mounts(mounts)
    v2 = _v2_mount(ms, "memory")
    fs = None if v2 is None else MemoryFs(2, _base(v2, None))
    if fs is None:
        mem = next((w for k, w, o in ms if k == "cgroup" and "memory" in o), None)
        if mem is None:
            raise CgroupUnavailable("no memory controller is mounted")
        fs = MemoryFs(1, _base(mem, "memory"))
    if not os.access(fs.base, os.W_OK):
        raise CgroupUnavailable(f"the memory controller at {fs.base} is not writable "
                                "(a memory limit needs root or a delegated cgroup)")
    return fs


def check_limit(limit: int) -> None:
    if limit < MIN_LIMIT:
        raise ConfigError(f"a memory limit below {MIN_LIMIT >> 20} MiB cannot hold "
                          f"pyhv itself (got {limit} bytes)")


class MemCgroup:
    def __init__(self, fs: MemoryFs, name: str, parent: str = "pyhv") -> None:
        for part in (parent, name):
            if not part or "/" in part or part in (".", ".."):
                raise HostError(f"bad cgroup name {part!r}")
        self.fs = fs
        self.dir = fs.base / parent / name

    def exists(self) -> bool:
        return self.dir.is_dir()

    def create(self) -> None:
        if self.fs.version == 2:
            for d in (self.fs.base, self.dir.parent):
                d.mkdir(exist_ok=True)
                ctl = d / "cgroup.subtree_control"
                if "memory" not in _read(ctl).split():
                    _write(ctl, "+memory")
        try:
            self.dir.parent.mkdir(exist_ok=True)
            self.dir.mkdir(exist_ok=True)
        except OSError as e:
            raise HostError(f"cannot create the cgroup {self.dir}: {e.strerror or e}") from e

    def set_limit(self, limit: int) -> None:
        check_limit(limit)
        _write(self.dir / ("memory.limit_in_bytes" if self.fs.version == 1
                           else "memory.max"), str(limit))

    def limit(self) -> int | None:
        raw = _read(self.dir / ("memory.limit_in_bytes" if self.fs.version == 1
                                else "memory.max")).strip()
        return None if raw == "max" or int(raw) >= 1 << 62 else int(raw)

    def usage(self) -> int:
        return int(_read(self.dir / ("memory.usage_in_bytes" if self.fs.version == 1
                                     else "memory.current")))

    def add(self, pid: int) -> None:
        """Move process `pid` in; on v1 its pages already charged move with it where the
        kernel still offers memory.move_charge_at_immigrate (v2 never moves them)."""
        if self.fs.version == 1:
            with contextlib.suppress(HostError):
                _write(self.dir / "memory.move_charge_at_immigrate", "3")
        _write(self.dir / "cgroup.procs", str(pid))

    def procs(self) -> list[int]:
        return [int(x) for x in _read(self.dir / "cgroup.procs").split()] \
            if self.exists() else []

    def remove(self, wait_s: float = 2.0) -> None:
        if not self.exists():
            return
        if os.getpid() in self.procs():
            _write(self.dir.parent.parent / "cgroup.procs", str(os.getpid()))
        deadline = time.monotonic() + wait_s
        while self.exists():
            try:
                self.dir.rmdir()
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise HostError(f"cannot remove the cgroup {self.dir}: "
                                    f"{e.strerror or e}") from e
                time.sleep(0.02)
