"""Memory: a VM's memory cgroup (`--mem-limit`) and KSM opt-in (`--ksm`).

The limit is written as the kernel reports it, the VM process is placed in the group
and the group removed when the run ends; a limit too small for pyhv is refused. KSM:
guest RAM is madvised MADV_MERGEABLE (the kernel shows the `mg` flag on exactly the
guest RAM mapping in /proc/PID/smaps) and the run reports KSM's counters. Whether ksmd
merges anything is the host's setting (off here, docs/host.md) and is not tested."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyhv.engines import engine_class
from pyhv.memory import GuestMemory
from pyhv.sched import CgroupUnavailable
from pyhv.sched.ksm import host_stats, mark_mergeable, report
from pyhv.sched.memcg import MemCgroup, MemoryFs, detect_memory

try:
    MFS: MemoryFs | None = detect_memory()
    WHY = ""
except CgroupUnavailable as e:
    MFS, WHY = None, str(e)
KVM = engine_class("kvm").probe()
TOOLS = [t for t in ("gcc", "ld") if shutil.which(t) is None]
PARENT = f"pyhv-memtest-{os.getpid()}"


def mergeable_mappings(pid: int | str) -> list[tuple[int, int]]:
    """(start, size) of the mappings whose VmFlags carry `mg` (MADV_MERGEABLE)."""
    out = []
    for blk in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path(f"/proc/{pid}/smaps").read_text()):
        lo, hi = (int(x, 16) for x in blk.split(" ", 1)[0].split("-"))
        flags = next((ln for ln in blk.splitlines() if ln.startswith("VmFlags:")), "")
        if " mg" in flags:
            out.append((lo, hi - lo))
    return out


def test_ksm_marks_exactly_guest_ram() -> None:
    mem = GuestMemory.with_layout([(0, 8 << 20), (16 << 20, 4 << 20)])
    try:
        before = mergeable_mappings("self")
        mark_mergeable(mem.regions)
        after = set(mergeable_mappings("self")) - set(before)
        # adjacent mergeable mappings may become one VMA: compare what they cover
        assert sum(size for _, size in after) == sum(r.size for r in mem.regions)
        for r in mem.regions:
            assert any(lo <= r.host_addr and r.host_addr + r.size <= lo + size
                       for lo, size in after)
    finally:
        mem.close()
    line = report()
    assert line.startswith("KSM: ")
    if host_stats() is None:
        assert "no KSM" in line
    else:
        assert "pages shared" in line and "ksmd" in line


@pytest.mark.skipif(MFS is None, reason=f"no writable memory controller: {WHY}")
def test_memory_group_lifecycle() -> None:
    assert MFS is not None
    g = MemCgroup(MFS, "vm1", PARENT)
    g.create()
    p = subprocess.Popen(["sleep", "30"])
    try:
        g.set_limit(64 << 20)
        assert g.limit() == 64 << 20
        g.add(p.pid)
        assert g.procs() == [p.pid] and g.usage() >= 0
        from pyhv.errors import ConfigError
        with pytest.raises(ConfigError, match="below 32 MiB"):
            g.set_limit(1 << 20)
    finally:
        p.kill()
        p.wait(timeout=10)
        g.remove()
        (MFS.base / PARENT).rmdir()
    assert not g.exists()


@pytest.mark.skipif(bool(MFS is None or KVM or TOOLS),
                    reason=f"needs a memory cgroup ({WHY or 'ok'}), kvm ({KVM or 'ok'}), "
                           f"gcc/ld ({TOOLS})")
def test_pyhv_run_mem_limit_and_ksm(tmp_path: Path) -> None:
    assert MFS is not None
    from pyhv.schedguest import build_spin
    img = build_spin(tmp_path, 100_000)
    name = f"memt{os.getpid()}"
    env = dict(os.environ, PYHV_CGROUP_PARENT=PARENT, PYHV_RUN_DIR=str(tmp_path / "run"))
    p = subprocess.Popen([sys.executable, "-m", "pyhv", "run", "--engine", "kvm", "--kernel",
                          str(img), "--mem", "48M", "--mem-limit", "256M", "--ksm", "--name",
                          name, "--timeout", "20"], env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    g = MemCgroup(MFS, name, PARENT)
    try:
        deadline = time.monotonic() + 30
        merge: list[tuple[int, int]] = []
        while time.monotonic() < deadline and not any(s == 48 << 20 for _, s in merge):
            time.sleep(0.05)
            if p.pid in g.procs():
                merge = mergeable_mappings(p.pid)
        assert g.procs() == [p.pid] and g.limit() == 256 << 20
        assert any(size == 48 << 20 for _, size in merge), merge
    finally:
        p.terminate()
        _, err = p.communicate(timeout=30)
    assert p.returncode == 143, err
    assert "pyhv: KSM: " in err
    assert not g.exists()
    (MFS.base / PARENT).rmdir()


def test_pyhv_run_refuses_a_tiny_mem_limit(tmp_path: Path) -> None:
    if MFS is None:
        pytest.skip(f"no writable memory controller: {WHY}")
    env = dict(os.environ, PYHV_CGROUP_PARENT=PARENT)
    p = subprocess.run([sys.executable, "-m", "pyhv", "run", "--kernel", str(tmp_path / "x"),
                        "--mem-limit", "4M"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "below 32 MiB" in p.stderr, p.stderr
    assert not (MFS.base / PARENT).exists()        # refused before anything was made
