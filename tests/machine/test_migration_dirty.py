"""Which pages a migration sends again (pyhv.migration.dirty), on a real emu machine.

The A-B-A case: a page reads B when it is sent, then changes back to A, the content it
had when tracking began. The destination holds B, so the page must be sent again. The
emu engine's digest log (a digest per page, compared with the last call) cannot see it:
its digest is A's again. The shadow comparison used for emu (what was sent vs guest
RAM) does. Both checked here, so the test shows why the shadow exists."""

from __future__ import annotations

from pathlib import Path

import pytest
from guestbuild import GuestBuilder, engine_unavailable

from pyhv.machine import Machine, MachineConfig
from pyhv.memory import PAGE_SHIFT
from pyhv.migration.dirty import EngineLog, ShadowCompare, tracker_for
from pyhv.migration.pages import PageReader

pytestmark = pytest.mark.skipif(engine_unavailable("emu") is not None,
                                reason=f"{engine_unavailable('emu')}")

GPA = 0x300000          # a page of RAM the counter guest does not use


def aba(m: Machine, tracker: EngineLog | ShadowCompare) -> list[int]:
    assert m.memory is not None
    m.memory.write(GPA, b"A" * 64)
    tracker.start()
    m.memory.write(GPA, b"B" * 64)                     # the guest writes B ...
    reader = PageReader(m.memory)
    for _ in reader.pack(reader.frames(), tracker.sent):  # ... round 1 sends B ...
        pass
    m.memory.write(GPA, b"A" * 64)                     # ... and the guest writes A back
    return tracker.dirty()


def test_the_shadow_comparison_sends_an_aba_page_again(guests: GuestBuilder) -> None:
    m = Machine(MachineConfig(kernel=Path(guests("counter")), engine="emu",
                              mem_size=16 << 20), lambda _b: None)
    try:
        tracker = tracker_for(m)
        assert isinstance(tracker, ShadowCompare)
        try:
            assert aba(m, tracker) == [GPA >> PAGE_SHIFT]
        finally:
            tracker.close()
        log = EngineLog(m)
        try:
            assert GPA >> PAGE_SHIFT not in aba(m, log)     # the digest log misses it
        finally:
            log.close()
    finally:
        m.close()
