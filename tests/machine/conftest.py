"""Fixtures for the machine tests: guests built once per session, engines probed once.

Every test here runs the real `pyhv run` command in a subprocess. Guest tests skip with a
reason when gcc/ld are missing; a test's kvm variant skips when /dev/kvm is missing or
unusable, its emu variant when unicorn is.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guestbuild import GuestBuilder, missing_tools  # noqa: E402


@pytest.fixture(scope="session")
def guests(tmp_path_factory: pytest.TempPathFactory) -> GuestBuilder:
    """guests(name) -> the built image's path (built at most once per session)."""
    missing = missing_tools()
    if missing:
        pytest.skip(f"cannot build the test guests: {', '.join(missing)} not installed")
    return GuestBuilder(tmp_path_factory.mktemp("core-guests"))
