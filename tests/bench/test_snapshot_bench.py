"""bench/snapshot_bench.py runs end to end and prints its table (slow: two Linux boots)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")
def test_snapshot_bench_prints_its_ratios() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "snapshot_bench.py"),
                        "--runs", "1", "--sizes", "128"], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for what in ("create (savevm)", "revert a running VM (loadvm)",
                 "restore-to-running, --verify", "restore-to-running (quick check)",
                 "the same, code already loaded"):
        line = next(ln for ln in r.stdout.splitlines() if what in ln)
        assert line.rstrip().endswith("x"), line        # a pyhv/QEMU ratio
