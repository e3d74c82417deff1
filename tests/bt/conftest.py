"""Fixtures for the bt engine tests: the trap teaching guests (tests/guests/trap), built
once per session with tests/trap/trapbuild.py; guest tests skip without gcc/as/ld."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "trap"))

from trapbuild import build, missing_tools  # noqa: E402


@pytest.fixture(scope="session")
def bt_guest(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """bt_guest(name) -> the built image (each built at most once per session)."""
    missing = missing_tools()
    if missing:
        pytest.skip(f"cannot build the trap guests: {', '.join(missing)} not installed")
    out = tmp_path_factory.mktemp("bt-guests")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build(name, out)
        return built[name]
    return get
