"""Fixtures for the emu engine tests: skip without unicorn or a toolchain; build guests;
boot them on pyhv's machine (tests/emu/emuguests.py) and close every machine after the
test."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from emuguests import Booted, build, missing_tools  # noqa: E402

from pyhv.engines.emu import EmuEngine  # noqa: E402

_why = EmuEngine.probe()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if Path(str(item.fspath)).resolve().parent != here:
            continue
        if _why is not None:
            item.add_marker(pytest.mark.skip(reason=f"emu engine unavailable: {_why}"))
        elif "guest" in item.fixturenames and missing_tools():
            item.add_marker(pytest.mark.skip(
                reason=f"cannot build the emu guests: {', '.join(missing_tools())} missing"))


@pytest.fixture(scope="session")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """guest(name) -> the built image of tests/guests/emu/<name>.S (once per session)."""
    cache: dict[str, Path] = {}
    tmp = tmp_path_factory.mktemp("emu-guests")

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = build(name, tmp)
        return cache[name]

    return get


@pytest.fixture
def emu() -> Iterator[Callable[..., Booted]]:
    """emu(image, append="", **MachineConfig fields) -> a booted guest, closed after."""
    booted: list[Booted] = []

    def boot(image: Path, **kw: object) -> Booted:
        b = Booted(image, **kw)  # type: ignore[arg-type]
        booted.append(b)
        return b

    yield boot
    for b in booted:
        b.close()
