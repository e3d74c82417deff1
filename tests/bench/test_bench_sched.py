"""`pyhv bench sched` at small scale: the logic, not the figures (no timing asserts).

One round of the solo baseline and the limit scenario with sub-second windows: each
guest's progress counter is read through the control API and moves, the limited VM's
cgroup carried the 25% quota while it ran (as the kernel reported it) and the other VM's
none, every VM removed its cgroup, and the table and the chart are written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyhv.benchsched import SCENARIOS, measure, table
from pyhv.engines import engine_class
from pyhv.sched import CgroupUnavailable, detect

try:
    detect()
    WHY = ""
except CgroupUnavailable as e:
    WHY = str(e)
KVM = engine_class("kvm").probe()
TOOLS = [t for t in ("gcc", "ld") if shutil.which(t) is None]


@pytest.mark.skipif(bool(WHY or KVM or TOOLS),
                    reason=f"needs a writable CPU controller ({WHY or 'ok'}), the kvm "
                           f"engine ({KVM or 'ok'}) and gcc/ld (missing: {TOOLS})")
def test_limit_scenario_is_measured_from_the_guests(tmp_path: Path) -> None:
    cpu = max(os.sched_getaffinity(0))
    res = measure(["limit"], repeat=1, window=0.3, cpu=cpu, warmup=0.2, iters=100_000)
    assert set(res.samples) == {("solo", "A"), ("limit", "A")}
    for ss in res.samples.values():
        assert len(ss) == 1 and ss[0].chunks > 0 and ss[0].seconds > 0
    solo, a = res.samples[("solo", "A")][0], res.samples[("limit", "A")][0]
    if "cpu.cfs_quota_us" in a.values:
        assert a.values["cpu.cfs_quota_us"] == "25000"
        assert solo.values["cpu.cfs_quota_us"] == "-1"
        assert a.values["cpu.shares"] == solo.values["cpu.shares"] == "1000"
    else:
        assert a.values["cpu.max"] == "25000 100000"
        assert solo.values["cpu.max"] == "max 100000"
    assert a.throttled is not None and 0 <= a.throttled <= 1
    text = table(res, ["limit"])
    assert [ln.split()[:2] for ln in text.splitlines()[1:3]] == [["solo", "A"], ["limit", "A"]]
    from pyhv.schedchart import write_chart
    files = write_chart(res, ["limit"], tmp_path / "sched", "test")
    assert all(f.stat().st_size > 0 for f in files)
    assert not list(Path(f"{detect().cpu_base}").glob(f"pyhv-bench-{os.getpid()}"))


def test_scenarios_are_the_articles() -> None:
    by = {s.key: s for s in SCENARIOS}
    assert [v.shares for v in by["shares"].vms] == [2000, 1000]
    assert by["limit"].vms[0].limit == 25
    assert by["reserve"].vms[0].reservation == 50 and len(by["reserve"].vms) == 3
    for s in SCENARIOS:
        shares = [v.expect for v in s.vms if v.by == "share" and v.expect is not None]
        assert not shares or len(shares) < len(s.vms) or abs(sum(shares) - 100) < 1e-9


def test_bad_options_are_refused() -> None:
    for opts in (["--scenarios", "nope"], ["--window", "0"], ["--cpu", "4095"]):
        p = subprocess.run([sys.executable, "-m", "pyhv", "bench", "sched", *opts],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and p.stderr.startswith("pyhv: "), p.stderr
