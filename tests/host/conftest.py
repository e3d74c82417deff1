"""Fixtures for the host daemon's tests: `daemon()` starts a real `pyhv host serve` with
its state directory in the test's temporary folder (reaped at teardown, with its VMs:
hostkit.Daemon.reap), `guests` builds the core test guests.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "machine"))
sys.path.insert(0, str(HERE))

from guestbuild import GuestBuilder, engine_unavailable, missing_tools  # noqa: E402
from hostkit import Daemon  # noqa: E402


@pytest.fixture(scope="session")
def guests(tmp_path_factory: pytest.TempPathFactory) -> GuestBuilder:
    missing = missing_tools()
    if missing:
        pytest.skip(f"cannot build the test guests: {', '.join(missing)} not installed")
    if (why := engine_unavailable("emu")) is not None:
        pytest.skip(why)
    return GuestBuilder(tmp_path_factory.mktemp("host-guests"))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    made: list[Daemon] = []

    def _make(*extra: str) -> Daemon:
        # a second daemon (migration between two hosts) gets its own state directory
        d = Daemon(tmp_path / ("s" if not made else f"s{len(made)}"), *extra)
        made.append(d)
        return d.start()

    yield _make
    for d in made:
        d.reap()
