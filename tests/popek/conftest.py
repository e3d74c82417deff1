"""Fixtures for the Popek-Goldberg probe tests: one shared matrix.

The full matrix (every probe on kvm and emu, UMIP off and on, plus the CPL 0 reference
runs) takes about a second, so it is run once per session and shared.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from popek_env import EMU_WHY, KVM_WHY  # noqa: E402

from pyhv.popek.probe import Report, run_probes  # noqa: E402


@pytest.fixture(scope="session")
def report() -> Report:
    if KVM_WHY is not None and EMU_WHY is not None:
        pytest.skip(f"no engine runs here (kvm: {KVM_WHY}; emu: {EMU_WHY})")
    return run_probes(timeout=5.0)
