"""Fixtures for the fuzz tests: the harness module (fuzzkit) on sys.path, a scratch dir.

Every fuzz test is derandomized in the default run (CI sees the same examples every time)
with small example counts; each has a `slow`-marked variant with more, which `-m slow` runs
randomized (tests/conftest.py's `explore` profile). To replay one exploration:
`pytest tests/fuzz -m slow --hypothesis-seed=<n>`; PYHV_FUZZ_LOG=<file>
appends one line per run (engine, status, reason, time, detail, queue lengths).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where guest images are written (one file per run, removed after it)."""
    return tmp_path_factory.mktemp("fuzz")
