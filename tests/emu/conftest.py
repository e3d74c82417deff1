"""Fixtures for the emu engine tests: skip without unicorn or a toolchain; build guests."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from emu_harness import build, have_toolchain  # noqa: E402

from pyhv.engines.emu import EmuEngine  # noqa: E402

_why = EmuEngine.probe()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if Path(str(item.fspath)).resolve().parent != here:
            continue
        if _why is not None:
            item.add_marker(pytest.mark.skip(reason=f"emu engine unavailable: {_why}"))
        elif "guest" in item.fixturenames and not have_toolchain():
            item.add_marker(pytest.mark.skip(reason="gcc/ld not installed"))


@pytest.fixture(scope="session")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., bytes]:
    """guest(name, base=0x10000) -> flat binary, built once per session."""
    cache: dict[tuple[str, int], bytes] = {}
    tmp = tmp_path_factory.mktemp("emu-guests")

    def get(name: str, base: int = 0x10000) -> bytes:
        key = (name, base)
        if key not in cache:
            cache[key] = build(name, tmp, base=base)
        return cache[key]

    return get
