"""Random bytes as guest code, in real mode, 32-bit protected mode and long mode.

The bytes follow a known-good prologue (fuzzkit.image) so that they are decoded in the
mode under test; whatever they do (fault, triple fault, touch MMIO, loop, halt, write to
ports, load garbage into segment registers or CRs), the run must end with one of the
statuses pyhv promises, in time, with no thread left and bounded device queues.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzzkit import engines, fuzz_settings, image, run_guest
from hypothesis import given
from hypothesis import strategies as st

MODES = ["real", "pm32", "long64"]
TIMEOUT = 1.0


def _payload() -> st.SearchStrategy[bytes]:
    return st.binary(min_size=1, max_size=96)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("engine", engines())
def test_random_code(engine: str, mode: str, fuzz_dir: Path) -> None:
    @fuzz_settings(4)  # type: ignore[misc]
    @given(body=_payload())
    def inner(body: bytes) -> None:
        run_guest(fuzz_dir, image(mode, body), engine, timeout=TIMEOUT)
    inner()


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("engine", engines())
def test_random_code_slow(engine: str, mode: str, fuzz_dir: Path) -> None:
    @fuzz_settings(150)  # type: ignore[misc]
    @given(body=_payload())
    def inner(body: bytes) -> None:
        run_guest(fuzz_dir, image(mode, body), engine, timeout=TIMEOUT)
    inner()
