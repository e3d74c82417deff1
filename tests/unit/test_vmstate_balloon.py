"""vmstate's virtio-balloon record: target, actual, the held frames (as runs), the
counters, the guest's last statistics and the statistics buffer the device keeps
round-trip to a fresh machine; a hostile record (frames outside RAM, too many stats,
a bad buffer head) is refused before anything changes. No guest code runs."""

from __future__ import annotations

import copy
import json
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from pyhv.arch.x86 import boot
from pyhv.cmd_run import _balloon_function
from pyhv.devices.virtio.balloon import MAX_STATS, VirtioBalloon
from pyhv.devices.virtio.transport import VirtioPciFunction
from pyhv.engines import engine_class
from pyhv.loader import LoadedGuest
from pyhv.machine import Machine, MachineConfig
from pyhv.memory import GuestMemory
from pyhv.vmstate import StateError, VmState, apply, capture

pytestmark = pytest.mark.skipif(engine_class("emu").probe() is not None,
                                reason="the emu engine (unicorn) is not installed")


def _setup(mem: GuestMemory) -> LoadedGuest:
    mem.write(0x7C00, b"\xeb\xfe")
    return LoadedGuest("test", boot.real_mode(0, 0x7C00), "jmp $ at 0x7c00")


def machine() -> Machine:
    return Machine(MachineConfig(engine="emu", mem_size=4 << 20, setup=_setup,
                                 pci_devices=[_balloon_function]), lambda _b: None)


def balloon(m: Machine) -> tuple[VirtioPciFunction, VirtioBalloon]:
    fn = next(f for f in m.devices.pci.slots.values() if isinstance(f, VirtioPciFunction))
    assert isinstance(fn.device, VirtioBalloon)
    return fn, fn.device


def name(m: Machine) -> str:
    fn, _ = balloon(m)
    return next(f"pci.{s}" for s, f in m.devices.pci.slots.items() if f is fn)


@pytest.fixture
def saved() -> Iterator[dict[str, Any]]:
    m = machine()
    try:
        _, dev = balloon(m)
        assert m.memory is not None
        dev.set_target(300)
        dev.config_write(4, (7).to_bytes(4, "little"))        # the driver's `actual`
        dev._inflate(m.memory, [0x200, 0x201, 0x202, 0x300, 0x9999999])
        m.memory.write(0x3000, struct.pack("<HQHQ", 4, 123 << 20, 5, 4 << 20))
        dev._take_stats(m.memory, [(0x3000, 20)])
        dev._stats_head = 3
        yield json.loads(json.dumps(capture(m).to_json()))
    finally:
        m.close()


@pytest.fixture
def target() -> Iterator[Machine]:
    m = machine()
    yield m
    m.close()


def test_the_balloon_round_trips(saved: dict[str, Any], target: Machine) -> None:
    apply(target, VmState.from_json(saved))
    _, dev = balloon(target)
    assert dev.report() == {"target_pages": 300, "actual_pages": 7, "held_pages": 4,
                            "inflated": 5, "deflated": 0, "bad_frames": 1,
                            "guest_stats": {"free_memory": 123 << 20,
                                            "total_memory": 4 << 20},
                            "stats_updates": 1}
    assert dev.held == {0x200, 0x201, 0x202, 0x300}
    assert dev._stats_head == 3
    rec = saved["devices"][name(target)]["state"]["virtio"]["device"]
    assert rec["held"] == [[0x200, 3], [0x300, 1]]
    assert json.loads(json.dumps(capture(target).to_json()))["devices"] == saved["devices"]


@pytest.mark.parametrize("key, value, words", [
    ("held", [[0x3FF, 2]], "inside guest RAM"),
    ("held", [[1, 0]], "inside guest RAM"),
    ("held", [[1]], "inside guest RAM"),
    ("held", "all", "not a list"),
    ("target", 1 << 32, "target"),
    ("actual", -1, "actual"),
    ("stats", {f"s{i}": 1 for i in range(MAX_STATS + 1)}, "more than"),
    ("stats", {"free_memory": "x"}, "free_memory"),
    ("stats_head", 128, "stats_head"),
    ("inflated", None, "inflated"),
    ("extra", 1, "unknown field"),
])
def test_a_hostile_balloon_record_is_refused(saved: dict[str, Any], target: Machine,
                                             key: str, value: Any, words: str) -> None:
    data = copy.deepcopy(saved)
    data["devices"][name(target)]["state"]["virtio"]["device"][key] = value
    _, dev = balloon(target)
    with pytest.raises(StateError, match=words):
        apply(target, VmState.from_json(data))
    assert dev.held == set() and dev.target_pages == 0


def test_a_restore_builds_the_balloon_again() -> None:
    """`pyhv run --balloon` names the balloon in the manifest; --restore builds it
    (before, the restored machine lacked it and its device set was refused)."""
    from pyhv.cmd_restore import pci_devices
    from pyhv.devices.deferred import DeferredCalls
    made = pci_devices([{"kind": "balloon"}])
    assert len(made) == 1
    fn = made[0](GuestMemory.with_layout([(0, 1 << 20)]), DeferredCalls())
    assert isinstance(fn, VirtioPciFunction) and isinstance(fn.device, VirtioBalloon)
    fn.close()
