"""Across engines: a bare-metal guest's state captured on one engine goes on on another.

The engine-neutral state (pyhv.vmstate: CpuState, the clock, device records) lets a
guest paused on `emu` (unicorn) continue on `kvm` (/dev/kvm) or `trap` (trap-and-emulate
on /dev/kvm) and back. The guests count on the serial port (tests/guests/core/
counter64.S in long mode, which all three run; counter.S in 32-bit protected mode,
which emu and kvm run, trap refusing it: it runs 64-bit kernels only). The target's
output must continue the source's byte for byte: no gap, no repeat. Console output is
collected synchronously in this process, so the source's output at the capture is an
exact offset.

On this host /dev/kvm is KVM-PVM (docs/host.md): CPL 0 guest code runs in KVM's
instruction emulator, slowly but correctly for these guests. Pairs whose engine cannot
run here are skipped with the engine's reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from guestbuild import GuestBuilder
from livevm import LiveVm
from snaphelp import continues

from pyhv.engines import engine_class
from pyhv.errors import HostError
from pyhv.machine import MachineConfig
from pyhv.vmstate import VmState, apply, capture, copy_ram


def _why_not(engine: str) -> str | None:
    return engine_class(engine).probe()


def pairs(items: list[tuple[str, str, str]]) -> list[object]:
    out: list[object] = []
    for guest, a, b in items:
        why = _why_not(a) or _why_not(b)
        marks = [pytest.mark.skip(reason=f"{a}->{b}: {why}")] if why else []
        if "kvm" in (a, b) or "trap" in (a, b):
            marks.append(pytest.mark.kvm)
        out.append(pytest.param(guest, a, b, marks=marks, id=f"{guest}-{a}-to-{b}"))
    return out


@pytest.fixture
def vms() -> Iterator[list[LiveVm]]:
    made: list[LiveVm] = []
    yield made
    for vm in made:
        vm.close()


def move(guests: GuestBuilder, vms: list[LiveVm], guest: str, route: list[str]) -> None:
    """Run `guest` on route[0], move it to route[1], then route[2]...; check the joined
    output is the counter's, continuing exactly at every move."""
    kernel = Path(guests(guest))
    vm = LiveVm(MachineConfig(kernel=kernel, engine=route[0], mem_size=16 << 20))
    vms.append(vm)
    vm.start().wait_more(60, 0)
    whole = b""
    for nxt in route[1:]:
        vm.pause()
        out = vm.output()
        whole += out
        state = VmState.from_json(capture(vm.machine).to_json())
        new = LiveVm(MachineConfig(mem_size=16 << 20, engine=nxt, kernel=kernel))
        vms.append(new)
        assert vm.machine.memory is not None and new.machine.memory is not None
        copy_ram(vm.machine.memory, new.machine.memory)
        apply(new.machine, state)
        vm.stop()
        vm = new
        vm.start().wait_more(60, 0)
    vm.stop()
    tail = vm.output()
    assert tail and not tail.startswith(b"count 1\n")
    continues(whole + tail, 0)


@pytest.mark.parametrize(("guest", "src", "dst"), pairs([
    ("counter64", "emu", "kvm"), ("counter64", "kvm", "emu"),
    ("counter64", "emu", "trap"), ("counter64", "trap", "emu"),
    ("counter64", "kvm", "trap"), ("counter", "emu", "kvm"), ("counter", "kvm", "emu"),
]))
def test_a_guest_moves_to_another_engine_and_counts_on(
        guests: GuestBuilder, vms: list[LiveVm], guest: str, src: str, dst: str) -> None:
    move(guests, vms, guest, [src, dst])


@pytest.mark.parametrize(("guest", "src", "dst"), pairs([("counter64", "emu", "trap"),
                                                         ("counter64", "emu", "kvm")]))
def test_there_and_back_twice(guests: GuestBuilder, vms: list[LiveVm], guest: str,
                              src: str, dst: str) -> None:
    move(guests, vms, guest, [src, dst, src, dst, src])


@pytest.mark.parametrize(("guest", "src", "dst"), pairs([("counter", "emu", "trap")]))
def test_an_engine_that_cannot_run_the_saved_mode_refuses_it(
        guests: GuestBuilder, vms: list[LiveVm], guest: str, src: str, dst: str) -> None:
    kernel = Path(guests(guest))
    vm = LiveVm(MachineConfig(kernel=kernel, engine=src, mem_size=16 << 20))
    vms.append(vm)
    vm.start().wait_more(40, 0)
    vm.pause()
    state = capture(vm.machine)
    target = LiveVm(MachineConfig(kernel=Path(guests("counter64")), engine=dst,
                                  mem_size=16 << 20))
    vms.append(target)
    before = capture(target.machine).to_json()["devices"]
    with pytest.raises(HostError, match="trap engine runs 64-bit kernels"):
        apply(target.machine, state)
    assert capture(target.machine).to_json()["devices"] == before   # no device changed
