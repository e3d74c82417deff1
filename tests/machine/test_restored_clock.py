"""A guest restored with a later guest time (a migrated or restored VM) idles on the
virtual clock at once, not after the host has "caught up" with its saved time.

The emu run loop paces guest time to host time while the guest idles (runner._idle): a
timer due at guest time T fires when T is reached on the host's time line. That line
must start at the guest time the run starts from (a fresh machine: 0; a restored one:
the saved time). Before that was so, a destination started from a VM with an hour of
guest time behind it would sit in HLT for an hour. Here tests/guests/core/pit.S is
paused while it waits for its 50 PIT ticks, its guest clock moved an hour on (as if the
VM had idled that long), and the captured state run on a fresh machine: the guest takes
its ticks and ends with its own success status (39) well within the run's timeout."""

from __future__ import annotations

from pathlib import Path

import pytest
from guestbuild import GuestBuilder, engine_unavailable
from livevm import LiveVm

from pyhv.clock import VirtualClock
from pyhv.machine import MachineConfig
from pyhv.vmstate import apply, capture, copy_ram

pytestmark = pytest.mark.skipif(engine_unavailable("emu") is not None,
                                reason=f"{engine_unavailable('emu')}")

HOUR_NS = 3600 * 10**9


def test_a_restored_guest_an_hour_on_idles_on_its_own_time_line(
        guests: GuestBuilder) -> None:
    cfg = MachineConfig(kernel=Path(guests("pit")), engine="emu", mem_size=16 << 20)
    src = LiveVm(cfg)
    dst = LiveVm(cfg)
    try:
        src.start().wait_for(b"waiting for 50 ticks\n")
        src.pause()
        clock = src.machine.clock
        assert isinstance(clock, VirtualClock)
        clock.skip_to(clock.now_ns() + HOUR_NS)
        state = capture(src.machine)
        assert src.machine.memory is not None and dst.machine.memory is not None
        copy_ram(src.machine.memory, dst.machine.memory)
        apply(dst.machine, state)
        src.stop()
        dst.runner.timeout = 60.0
        dst.start()
        assert dst._thread is not None
        dst._thread.join(90)
        assert dst.result is not None and dst.result.status == 39, dst.result
        assert b"ticks=50, hlt woke on the timer" in dst.output()
    finally:
        src.close()
        dst.close()
