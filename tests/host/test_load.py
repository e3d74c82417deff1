"""The load test of issue 14: 20 small bare-metal VMs (the counter guest on emu, 8 MiB)
started and stopped repeatedly through the daemon's API, without a failure.

It runs bench/host_load.py, which prints the API's latency (p50/p99) under that load;
this test asserts only that nothing failed (no wall-clock assertion), so it is marked
slow: a few minutes on a loaded 2-core machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from guestbuild import GuestBuilder

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_twenty_vms_started_and_stopped_repeatedly(guests: GuestBuilder) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "host_load.py"), "--vms",
                        "20", "--rounds", "2", "--kernel", str(guests("counter"))],
                       capture_output=True, text=True, timeout=840)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "failures: 0" in r.stdout
