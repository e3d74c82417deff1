"""Fixtures for the network tests (helpers: netkit.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from netkit import HAVE_QEMU, QemuHub


@pytest.fixture
def qemu_hub(tmp_path: Path) -> Iterator[QemuHub]:
    if not HAVE_QEMU:
        pytest.skip("qemu-system-x86_64 is not installed (scripts/setup.sh installs it)")
    hub = QemuHub(tmp_path)
    try:
        yield hub
    finally:
        hub.close()
