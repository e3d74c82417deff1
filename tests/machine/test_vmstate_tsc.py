"""The guest's TSC across a capture and apply (a snapshot, a migration): it goes on from
where it was, neither back nor leaping ahead.

The guest is tests/guests/core/tsc.S (prints RDTSC as "tsc HEX" lines). emu's TSC is the
virtual clock at 1 GHz plus the guest's offset (docs/emu.md), kvm's is the host's TSC
plus KVM's offset (IA32_TSC carried in CpuState.msrs, written back with KVM_SET_MSRS).
The source runs a while and is paused; its state and RAM go to a fresh machine (the
same engine, or another); the target runs on. Checked: every value after the restore is
above the last one before, and the first one after is no further ahead of the last
before than the guest time between them allows (a leap would be the saved clock counted
twice).

On this host's KVM (KVM-PVM, docs/host.md) the guest's TSC is the host's: KVM_SET_MSRS
takes IA32_TSC and changes nothing, and the guest's own WRMSR is ignored too. kvm to kvm
continues (both read the host's TSC); emu to kvm cannot: the kvm engine reads IA32_TSC
back and reports the jump (`tsc_unset`), which the test then checks instead."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from guestbuild import GuestBuilder, engine_unavailable
from livevm import LiveVm

from pyhv.machine import MachineConfig
from pyhv.vmstate import apply, capture, copy_ram


def lines(vm: LiveVm, n: int, timeout: float = 60.0) -> None:
    """Wait (bounded) until `vm` printed n TSC lines."""
    deadline = time.monotonic() + timeout
    while len(values(vm.output())) < n:
        assert time.monotonic() < deadline, vm.output()[-300:]
        time.sleep(0.02)


def values(text: bytes) -> list[int]:
    return [int(x, 16) for x in re.findall(rb"tsc ([0-9a-f]{16})\n", text)]


@pytest.fixture
def vms() -> Iterator[list[LiveVm]]:
    made: list[LiveVm] = []
    yield made
    for vm in made:
        vm.close()


def config(guests: GuestBuilder, engine: str) -> MachineConfig:
    return MachineConfig(kernel=Path(guests("tsc")), engine=engine, mem_size=16 << 20)


@pytest.mark.parametrize("src_engine, dst_engine", [
    ("emu", "emu"),
    pytest.param("kvm", "kvm", marks=pytest.mark.kvm),
    pytest.param("emu", "kvm", marks=pytest.mark.kvm),
])
def test_the_tsc_continues_across_a_restore(guests: GuestBuilder, vms: list[LiveVm],
                                            src_engine: str, dst_engine: str) -> None:
    for e in (src_engine, dst_engine):
        if engine_unavailable(e) is not None:
            pytest.skip(f"{engine_unavailable(e)}")
    src = LiveVm(config(guests, src_engine))
    vms.append(src)
    src.start()
    lines(src, 20)
    src.pause()
    paused = time.monotonic()
    state = capture(src.machine)
    before = values(src.output())
    dst = LiveVm(config(guests, dst_engine))
    vms.append(dst)
    assert src.machine.memory is not None and dst.machine.memory is not None
    copy_ram(src.machine.memory, dst.machine.memory)
    apply(dst.machine, state)
    unset = getattr(dst.machine.vcpus[0], "tsc_unset", None)
    src.stop()
    dst.start()
    lines(dst, 10)
    host_ns = int((time.monotonic() - paused) * 1e9)
    dst.stop()
    after = values(dst.output())
    assert before == sorted(before)
    if unset is not None:
        # this host's KVM keeps the guest's TSC the host's (KVM-PVM: docs/host.md): the
        # kvm engine said so when the state was applied; the guest reads the host's TSC
        assert dst_engine == "kvm" and src_engine != "kvm", unset
        step = max(b - a for a, b in zip(before, before[1:], strict=False))
        assert 0 <= unset[0] - before[-1] < 4 * step, (hex(before[-1]), hex(unset[0]))
        # the first line may be the one in flight at the pause (read on emu)
        rest = after[1:] if abs(after[0] - unset[0]) < abs(after[0] - unset[1]) else after
        assert rest and rest == sorted(rest), [hex(v) for v in after]
        assert abs(rest[0] - unset[1]) < 10 * host_ns + (1 << 32)
        return
    assert after == sorted(after)
    assert after[0] > before[-1], (hex(before[-1]), hex(after[0]))
    # how far the first value after may be ahead of the last before: the line in flight
    # at the pause (a few steps of the guest's loop) plus, on kvm, whose TSC runs with
    # the host's time, the host time from the pause to the lines after (at most 10
    # cycles a ns); a leap (the saved TSC or clock counted twice, or the host's TSC
    # instead of the guest's) is far beyond
    step = max(b - a for a, b in zip(before, before[1:], strict=False))
    bound = 4 * step + (10 * host_ns if dst_engine == "kvm" else 0)
    assert after[0] - before[-1] < bound, (hex(before[-1]), hex(after[0]), hex(bound))
