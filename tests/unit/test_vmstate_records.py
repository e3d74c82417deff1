"""vmstate's records: a machine's state round-trips, and every malformed record is
refused with a StateError naming it (missing fields, wrong types, out-of-range values,
unknown fields, newer versions, another machine's shape) without a traceback.

The machines here run no guest code: a real-mode `jmp $` on emu, with the PC's devices
programmed through their ports as a guest would, so the records are not the power-on
ones."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyhv.arch.x86 import boot
from pyhv.engines import engine_class
from pyhv.loader import LoadedGuest
from pyhv.machine import Machine, MachineConfig
from pyhv.memory import GuestMemory
from pyhv.vmstate import FORMAT_VERSION, StateError, VmState, apply, capture, check_fits

pytestmark = pytest.mark.skipif(engine_class("emu").probe() is not None,
                                reason="the emu engine (unicorn) is not installed")


def _setup(mem: GuestMemory) -> LoadedGuest:
    mem.write(0x7C00, b"\xeb\xfe")                    # jmp $
    return LoadedGuest("test", boot.real_mode(0, 0x7C00), "jmp $ at 0x7c00")


def machine(n_cpus: int = 1, mem: int = 4 << 20) -> Machine:
    return Machine(MachineConfig(engine="emu", mem_size=mem, n_cpus=n_cpus, setup=_setup),
                   lambda _b: None)


def program(m: Machine) -> None:
    """Put the devices in a state a guest would: PIC initialised, PIT counting, RTC
    periodic interrupt on, UART with interrupts and a byte received, APIC timer armed."""
    out = m.pio.write
    for port, v in ((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0x21, 0xF8),
                    (0x43, 0x34), (0x40, 0x9C), (0x40, 0x2E),    # PIT ch0 mode 2, 11932
                    (0x70, 0x0A), (0x71, 0x26), (0x70, 0x0B), (0x71, 0x42),  # RTC PIE
                    (0x3F9, 0x01), (0x3FC, 0x0B), (0x604, 0x1)):
        out(port, 1, v)
    m.devices.serial.feed(b"hi")
    m.poll_devices()
    m.mmio.write(0xFEE000F0, 4, 0x1FF)                # APIC software-enabled
    m.mmio.write(0xFEE00320, 4, 0x20030)              # timer: periodic, vector 0x30
    m.mmio.write(0xFEE00380, 4, 1_000_000)
    m.clock.advance(123_456)                          # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def saved() -> Iterator[dict[str, Any]]:
    m = machine()
    try:
        program(m)
        yield json.loads(json.dumps(capture(m).to_json()))
    finally:
        m.close()


@pytest.fixture
def target() -> Iterator[Machine]:
    m = machine()
    yield m
    m.close()


def test_a_state_round_trips_through_json_into_a_fresh_machine(
        saved: dict[str, Any], target: Machine) -> None:
    before = json.dumps(capture(target).to_json(), sort_keys=True)
    apply(target, VmState.from_json(saved))
    again = json.loads(json.dumps(capture(target).to_json()))
    assert again == saved
    assert json.dumps(again, sort_keys=True) != before     # it really changed the machine
    assert target.clock.now_ns() == 123_456
    assert target.devices.serial.read(0, 1) == ord("h")    # the UART's FIFO came along
    # the timers were armed again: the PIT's IRQ 0 edge and the APIC timer
    assert len(target.timers) >= 3


def _fields(saved: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for name, rec in saved["devices"].items():
        for key in rec["state"]:
            yield name, key


def _every_field() -> list[tuple[str, str]]:
    m = machine()
    try:
        program(m)
        return list(_fields(json.loads(json.dumps(capture(m).to_json()))))
    finally:
        m.close()


FIELDS = _every_field() if engine_class("emu").probe() is None else []


def _refused(target: Machine, data: dict[str, Any], *words: str) -> str:
    before = json.dumps(capture(target).to_json(), sort_keys=True)
    with pytest.raises(StateError) as e:
        apply(target, VmState.from_json(data))
    msg = str(e.value)
    for w in words:
        assert w in msg, msg
    return before


@pytest.mark.parametrize(("name", "key"), FIELDS, ids=[f"{n}.{k}" for n, k in FIELDS])
@pytest.mark.parametrize("damage", ["missing", "wrong-type", "out-of-range"])
def test_every_device_field_is_checked(saved: dict[str, Any], target: Machine, name: str,
                                       key: str, damage: str) -> None:
    data = copy.deepcopy(saved)
    rec = data["devices"][name]["state"]
    if damage == "missing":
        del rec[key]
    elif damage == "wrong-type":
        rec[key] = "zz"
    else:
        rec[key] = 1 << 300 if not isinstance(rec[key], dict | list) else [1 << 300] * 300
    before = json.dumps(capture(target).to_json()["devices"][name], sort_keys=True)
    with pytest.raises(StateError) as e:
        apply(target, VmState.from_json(data))
    assert name in str(e.value) or name.split(".")[0] in str(e.value)
    # a refused record leaves its device as it was
    assert json.dumps(capture(target).to_json()["devices"][name], sort_keys=True) == before


@pytest.mark.parametrize("name", sorted({n for n, _ in FIELDS}))
def test_unknown_fields_and_newer_versions_are_refused(
        saved: dict[str, Any], target: Machine, name: str) -> None:
    data = copy.deepcopy(saved)
    data["devices"][name]["state"]["from_the_future"] = 1
    _refused(target, data, "unknown field", "from_the_future")
    data = copy.deepcopy(saved)
    data["devices"][name]["version"] += 1
    _refused(target, data, name, "newer")


CPU_FIELDS = ["rax", "rip", "rflags", "cr0", "cr4", "cr8", "cs", "gdt", "msrs", "fxsave",
              "pending_interrupt", "interrupt_shadow", "halted"]


@pytest.mark.parametrize("key", CPU_FIELDS)
@pytest.mark.parametrize("damage", ["missing", "wrong-type", "out-of-range"])
def test_every_vcpu_field_is_checked(saved: dict[str, Any], target: Machine, key: str,
                                     damage: str) -> None:
    data = copy.deepcopy(saved)
    st = data["vcpus"][0]["state"]
    if damage == "missing":
        del st[key]
    elif damage == "wrong-type":
        st[key] = "zz" if key != "halted" else 1
    elif key == "halted":
        st[key] = None
    else:
        st[key] = 1 << 300 if not isinstance(st[key], dict) else {"selector": 1 << 300}
    with pytest.raises(StateError, match=f"vcpu.0.*{key}|{key}.*vcpu.0|vcpu.0.state"):
        VmState.from_json(data)


@pytest.mark.parametrize("change", [
    ("format", FORMAT_VERSION + 1, "newer"),
    ("mem_size", 8 << 20, "RAM"),
    ("vcpus", "two", "vcpus"),
    ("devices", "none", "devices"),
    ("clock_ns", -1, "clock_ns"),
])
def test_the_envelope_is_checked(saved: dict[str, Any], target: Machine,
                                 change: tuple[str, object, str]) -> None:
    key, value, word = change
    data = copy.deepcopy(saved)
    data[key] = value
    _refused(target, data, word)


def test_another_device_set_or_vcpu_count_is_refused(saved: dict[str, Any],
                                                     target: Machine) -> None:
    data = copy.deepcopy(saved)
    del data["devices"]["rtc"]
    data["devices"]["floppy"] = {"version": 1, "state": {}}
    _refused(target, data, "device set differs", "rtc", "floppy")
    two = machine(n_cpus=2)
    try:
        with pytest.raises(StateError, match="1 vCPUs, this machine 2"):
            check_fits(two, VmState.from_json(saved))
    finally:
        two.close()


HOSTILE: list[Callable[[dict[str, Any]], None]] = [
    lambda d: d["devices"]["pic"]["state"]["master"].update(elcr=0x07),   # edge-only IRQs
    lambda d: d["devices"]["lapic.0"]["state"].update(base=0xFEE00000),   # BSP bit gone
    lambda d: d["devices"]["ioapic"]["state"]["entries"].__setitem__(0, 1 << 40),
    lambda d: d["devices"]["serial"]["state"].update(trigger=3),
    lambda d: d["devices"]["serial"]["state"].update(rx="00" * 65),
    lambda d: d["devices"]["fwcfg"]["state"].update(offset=5),            # past "QEMU"
    lambda d: d["devices"]["pit"]["state"]["counters"][0].update(count=0),
    lambda d: d["vcpus"][0]["state"].update(rflags=0),                    # bit 1 is fixed
    lambda d: d["vcpus"][0]["state"].update(cr0=0x80000000),              # PG without PE
    lambda d: d["vcpus"][0]["state"].update(fxsave="00" * 511),
    lambda d: d["vcpus"][0]["state"]["msrs"].update({"-1": 0}),
]


@pytest.mark.parametrize("damage", HOSTILE, ids=range(len(HOSTILE)))
def test_values_no_device_can_hold_are_refused(saved: dict[str, Any], target: Machine,
                                               damage: Callable[[dict[str, Any]], None]
                                               ) -> None:
    data = copy.deepcopy(saved)
    damage(data)
    with pytest.raises(StateError):
        apply(target, VmState.from_json(data))
