"""Several vCPUs: the smp guest (tests/guests/core/smp.c, 2 vCPUs on emu) captured at
points of its run (APs not yet started, APs started and exchanging IPIs, APIC timers
and the I/O APIC at work) and applied to a fresh machine finishes with every one of its
own checks passing: the APs' wait-for-SIPI state, every local APIC (IRR/ISR, timers,
IPIs in flight) and the I/O APIC come back. The joined output must be exactly the
guest's expected output and the fresh machine must power off through ACPI S5."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from guestbuild import GuestBuilder, engine_unavailable
from livevm import LiveVm
from test_smp_guests import expected

from pyhv.machine import MachineConfig
from pyhv.vmstate import VmState, apply, capture, copy_ram

pytestmark = pytest.mark.skipif(engine_unavailable("emu") is not None,
                                reason=str(engine_unavailable("emu")))


@pytest.fixture
def vms() -> Iterator[list[LiveVm]]:
    made: list[LiveVm] = []
    yield made
    for vm in made:
        vm.close()


@pytest.mark.parametrize("after", [b"cpus: 2\n", b"(exact)\n", b"broadcast 1\n"])
def test_an_smp_guest_finishes_its_checks_on_a_fresh_machine(
        guests: GuestBuilder, vms: list[LiveVm], after: bytes) -> None:
    cfg = MachineConfig(kernel=Path(guests("smp")), engine="emu", n_cpus=2,
                        mem_size=32 << 20)
    src = LiveVm(cfg)
    vms.append(src)
    src.start().wait_for(after)
    src.pause()
    state = VmState.from_json(json.loads(json.dumps(capture(src.machine).to_json())))
    before = src.output()
    dst = LiveVm(cfg)
    vms.append(dst)
    assert src.machine.memory is not None and dst.machine.memory is not None
    copy_ram(src.machine.memory, dst.machine.memory)
    apply(dst.machine, state)
    src.stop()
    dst.start()
    assert dst._thread is not None
    dst._thread.join(timeout=60)
    assert dst.result is not None and (dst.result.status, dst.result.reason) == \
        (0, "poweroff"), (dst.result, dst.output())
    assert (before + dst.output()).decode() == expected(2)
