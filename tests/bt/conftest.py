"""Fixtures for the bt engine tests: the trap teaching guests (tests/guests/trap), built
once per session with tests/trap/trapbuild.py; guest tests skip without gcc/as/ld."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "trap"))

from trapbuild import session_builder  # noqa: E402


@pytest.fixture(scope="session")
def bt_guest(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """bt_guest(name) -> the built image (each built at most once per session)."""
    return session_builder(tmp_path_factory, "bt-guests")
