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

from trapbuild import build, missing_tools  # noqa: E402


@pytest.fixture(scope="session")
def trap_guest(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """trap_guest(name) -> the built image (each built at most once per session)."""
    missing = missing_tools()
    if missing:
        pytest.skip(f"cannot build the trap guests: {', '.join(missing)} not installed")
    out = tmp_path_factory.mktemp("trap-guests")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build(name, out)
        return built[name]
    return get
