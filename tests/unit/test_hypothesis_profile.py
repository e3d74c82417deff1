"""The default run is deterministic: tests/conftest.py's hypothesis profile."""

from __future__ import annotations

import pytest
from hypothesis import settings

from tests.conftest import _asks_for_slow


@pytest.mark.parametrize("expr,slow", [
    ("", False), ("not slow", False), ("slow", True), ("slow and not kvm", True),
    ("kvm and slow", True), ("(slow)", True), ("not (slow)", False), ("kvm", False),
])
def test_which_selections_explore(expr: str, slow: bool) -> None:
    assert _asks_for_slow(expr) is slow


def test_the_profile_in_force_matches_the_selection(request: pytest.FixtureRequest) -> None:
    explicit = request.config.getoption("hypothesis_profile", None)
    if explicit:
        pytest.skip(f"--hypothesis-profile={explicit} was given")
    exploring = _asks_for_slow(request.config.option.markexpr or "")
    assert settings.default.derandomize is not exploring
    assert settings.default.database is None  # nothing read from or written to the tree
    assert settings.default.deadline is None  # no dependence on how fast this machine is
