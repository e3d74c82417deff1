"""A running guest's state captured (pyhv.vmstate) and applied to a fresh machine goes
on exactly: the counting guest's serial output continues with no gap and no repeat.

The guest is tests/guests/core/counter.S ("count N" lines, polling the ACPI PM1 status
between them). The source machine is paused mid-count; its RAM and state go to a new
machine of the same configuration, which runs on; the output of the two, joined, must
be exactly "count 1\\n", "count 2\\n", ... up to where the second one was stopped."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from guestbuild import GuestBuilder, engine_unavailable
from livevm import LiveVm

from pyhv.machine import MachineConfig
from pyhv.vmstate import VmState, apply, capture, copy_ram

pytestmark = pytest.mark.skipif(engine_unavailable("emu") is not None,
                                reason=f"{engine_unavailable('emu')}")


def counting(n: int) -> bytes:
    return b"".join(b"count %d\n" % i for i in range(1, n + 1))


def assert_counts_on(text: bytes) -> int:
    """`text` is exactly the counter's output from 1 (possibly ending mid-line);
    returns the last complete count."""
    last = [int(x) for x in re.findall(rb"count (\d+)\n", text)]
    assert last, text[:200]
    assert text == counting(last[-1] + 1)[:len(text)], \
        f"gap or repeat in the count: ...{text[-120:]!r}"
    return last[-1]


@pytest.fixture
def vms() -> Iterator[list[LiveVm]]:
    made: list[LiveVm] = []
    yield made
    for vm in made:
        vm.close()


def config(guests: GuestBuilder, engine: str = "emu") -> MachineConfig:
    return MachineConfig(kernel=Path(guests("counter")), engine=engine, mem_size=16 << 20)


def test_a_counting_guest_continues_its_count_on_a_fresh_machine(
        guests: GuestBuilder, vms: list[LiveVm]) -> None:
    src = LiveVm(config(guests))
    vms.append(src)
    src.start().wait_for(b"count 5\n")
    src.pause()
    state = capture(src.machine)
    before = src.output()
    data = json.loads(json.dumps(state.to_json()))      # through JSON, as a file would

    dst = LiveVm(config(guests))
    vms.append(dst)
    assert src.machine.memory is not None and dst.machine.memory is not None
    copy_ram(src.machine.memory, dst.machine.memory)
    apply(dst.machine, VmState.from_json(data))
    src.stop()
    assert src.output() == before                       # nothing ran after the capture

    n = assert_counts_on(before)
    dst.start().wait_for(b"count %d\n" % (n + 5))
    dst.stop()
    after = dst.output()
    assert after and not after.startswith(b"count 1\n")
    assert assert_counts_on(before + after) >= n + 5


def test_capture_leaves_the_source_running_on(guests: GuestBuilder,
                                              vms: list[LiveVm]) -> None:
    src = LiveVm(config(guests))
    vms.append(src)
    src.start().wait_for(b"count 3\n")
    src.pause()
    capture(src.machine)
    n = assert_counts_on(src.output())
    src.runner.resume()
    src.wait_for(b"count %d\n" % (n + 3))
    src.stop()
    assert_counts_on(src.output())


def test_a_guest_waiting_on_timer_interrupts_finishes_on_the_fresh_machine(
        guests: GuestBuilder, vms: list[LiveVm]) -> None:
    """tests/guests/core/pit.S mid-way through its 50 PIT ticks ("sti; hlt" with the
    8259 and the 8254 programmed): the fresh machine takes the rest of the ticks and
    the guest's own checks pass (status 39, its debug-exit 0x13)."""
    cfg = MachineConfig(kernel=Path(guests("pit")), engine="emu", mem_size=16 << 20)
    src = LiveVm(cfg)
    vms.append(src)
    src.start().wait_for(b"waiting for 50 ticks\n")
    src.pause()
    state = capture(src.machine)
    assert state.devices["pit"]["state"]["counters"][0]["running"]
    dst = LiveVm(cfg)
    vms.append(dst)
    assert src.machine.memory is not None and dst.machine.memory is not None
    copy_ram(src.machine.memory, dst.machine.memory)
    apply(dst.machine, VmState.from_json(json.loads(json.dumps(state.to_json()))))
    src.stop()
    dst.start()
    dst.wait_for(b"IF=0 held the tick, sti delivered it\n")
    assert dst._thread is not None
    dst._thread.join(timeout=30)
    assert dst.result is not None and dst.result.status == 39, dst.result
    assert b"ticks=50, hlt woke on the timer" in dst.output()
