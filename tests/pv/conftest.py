"""Fixtures for the pv engine tests: the trap guests (tests/guests/trap), native and PV
builds (name + "-pv": -DPV through pvops.h), built once per session."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "trap"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bt"))

from trapbuild import build, missing_tools  # noqa: E402


@pytest.fixture(scope="session")
def pv_guest(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    missing = missing_tools()
    if missing:
        pytest.skip(f"cannot build the trap guests: {', '.join(missing)} not installed")
    out = tmp_path_factory.mktemp("pv-guests")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build(name, out)
        return built[name]
    return get
