"""Shared test configuration: hypothesis profiles.

The default run is deterministic: every hypothesis test is derandomized (the same
examples on every machine, every time) and no example database is read or written, so
what CI explores is exactly what a developer's run explored. Random exploration is
opt-in:

- `pytest -m slow` (a selection that asks for the slow tests) loads the `explore`
  profile: randomized, more examples;
- `pytest --hypothesis-profile=explore [--hypothesis-seed=N]` does so for any selection.

A failure found while exploring becomes an `@example(...)` on the test (hypothesis
prints the failing arguments), never a file in the source tree.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("ci", derandomize=True, **_COMMON)  # type: ignore[arg-type]
settings.register_profile("explore", derandomize=False, max_examples=1000,
                          **_COMMON)  # type: ignore[arg-type]


def _asks_for_slow(markexpr: str) -> bool:
    """True for `-m slow`, `-m "slow and emu"`...; False for `-m "not slow"`."""
    words = markexpr.replace("(", " ").replace(")", " ").split()
    return any(w == "slow" and (i == 0 or words[i - 1] != "not") for i, w in enumerate(words))


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("hypothesis_profile", None):
        return  # an explicit --hypothesis-profile wins (hypothesis's plugin loaded it)
    settings.load_profile("explore" if _asks_for_slow(config.option.markexpr or "") else "ci")
