"""Fixtures for the trap engine tests: the trap guests, built once per session.

Guest tests skip with a reason when gcc/as/ld are missing; each engine variant skips
when its engine cannot run here (trap and kvm need a usable /dev/kvm, emu unicorn).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trapbuild import session_builder  # noqa: E402


@pytest.fixture(scope="session")
def trap_guest(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """trap_guest(name) -> the built image (each built at most once per session)."""
    return session_builder(tmp_path_factory, "trap-guests")
