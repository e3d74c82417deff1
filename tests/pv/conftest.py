"""Fixtures for the pv engine tests: the trap guests (tests/guests/trap), native and PV
builds (name + "-pv": -DPV through pvops.h), built once per session."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "trap"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bt"))

from trapbuild import session_builder  # noqa: E402


@pytest.fixture(scope="session")
def pv_guest(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    return session_builder(tmp_path_factory, "pv-guests")
