"""vmstate's virtio records (transport, queues, blk, rng, the PCI function): a machine
with a qcow2 disk and an rng whose drivers' set-up was done through the common
configuration registers, as a driver does, round-trips; every field of the records is
checked; a record of another device or disk is refused. No guest code runs."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyhv.arch.x86 import boot
from pyhv.devices.virtio.transport import F_VERSION_1, VirtioPciFunction
from pyhv.disk.qcow2.create import create as create_qcow2
from pyhv.diskspec import DiskSpec, make_function
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


def machine(disk: Path, size: int = 1 << 20) -> Machine:
    from pyhv.cmd_run import _rng_function
    return Machine(MachineConfig(engine="emu", mem_size=4 << 20, setup=_setup,
                                 pci_devices=[make_function(DiskSpec(str(disk), "qcow2"), 0),
                                              _rng_function]), lambda _b: None)


def functions(m: Machine) -> list[VirtioPciFunction]:
    return [fn for _, fn in sorted(m.devices.pci.slots.items())
            if isinstance(fn, VirtioPciFunction)]


def drive(fn: VirtioPciFunction) -> None:
    """What a driver does: ACK, DRIVER, features, FEATURES_OK, queue 0 at 1 MiB, enable,
    DRIVER_OK."""
    w = fn.common_write
    w(0x14, 1, 1 | 2)
    w(0x08, 4, 1)
    w(0x0C, 4, F_VERSION_1 >> 32)
    w(0x14, 1, 1 | 2 | 8)
    w(0x16, 2, 0)
    w(0x18, 2, 16)
    for off, gpa in ((0x20, 0x100000), (0x28, 0x101000), (0x30, 0x102000)):
        w(off, 8, gpa)
    w(0x1C, 2, 1)
    w(0x14, 1, 1 | 2 | 8 | 4)
    assert fn.active


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    p = tmp_path / "d.qcow2"
    create_qcow2(str(p), 1 << 20)
    return p


@pytest.fixture
def saved(disk: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    m = machine(disk)
    try:
        for fn in functions(m):
            drive(fn)
        yield json.loads(json.dumps(capture(m).to_json()))
    finally:
        m.close()


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Machine]:
    other = tmp_path / "other.qcow2"
    create_qcow2(str(other), 1 << 20)
    m = machine(other)
    yield m
    m.close()


def test_virtio_devices_round_trip(saved: dict[str, Any], target: Machine) -> None:
    names = [n for n in saved["devices"] if n.startswith("pci.")]
    assert len(names) == 2
    apply(target, VmState.from_json(saved))
    again = json.loads(json.dumps(capture(target).to_json()))
    assert again == saved
    assert all(fn.active for fn in functions(target))
    q = functions(target)[0].queues[0]
    assert (q.enabled, q.size, q.desc) == (True, 16, 0x100000)


def _virtio_fields(saved: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for name, rec in saved["devices"].items():
        if name.startswith("pci."):
            out += [(name, k) for k in rec["state"]["virtio"]]
            out += [(name, f"queues.{k}") for k in rec["state"]["virtio"]["queues"][0]]
    return out


@pytest.mark.parametrize("damage", ["missing", "wrong-type", "out-of-range"])
def test_every_virtio_field_is_checked(saved: dict[str, Any], target: Machine,
                                       damage: str) -> None:
    fields = _virtio_fields(saved)
    assert len(fields) > 30
    for name, key in fields:
        data = copy.deepcopy(saved)
        rec = data["devices"][name]["state"]["virtio"]
        if key.startswith("queues."):
            rec, key = rec["queues"][0], key.split(".", 1)[1]
        if damage == "missing":
            del rec[key]
        elif damage == "wrong-type":
            rec[key] = "zz"
        else:
            rec[key] = 1 << 300 if not isinstance(rec[key], dict | list) else [1 << 300]
        with pytest.raises(StateError):
            apply(target, VmState.from_json(data))


@pytest.mark.parametrize("change", [
    ("device_type", 1, "this slot holds"),
    ("driver_features", 1 << 60, "does not offer"),
    ("queues", [], "queues"),
    ("device", {"capacity": 1, "read_only": False}, "sectors"),
    ("device_version", 2, "newer"),
])
def test_foreign_virtio_records_are_refused(saved: dict[str, Any], target: Machine,
                                            change: tuple[str, Any, str]) -> None:
    key, value, words = change
    data = copy.deepcopy(saved)
    blk = next(n for n in data["devices"] if n.startswith("pci."))
    data["devices"][blk]["state"]["virtio"][key] = value
    with pytest.raises(StateError, match=words):
        apply(target, VmState.from_json(data))


def test_a_queue_outside_guest_ram_is_refused(saved: dict[str, Any], target: Machine
                                              ) -> None:
    data = copy.deepcopy(saved)
    blk = next(n for n in data["devices"] if n.startswith("pci."))
    data["devices"][blk]["state"]["virtio"]["queues"][0]["desc"] = 64 << 20
    with pytest.raises(StateError, match="outside guest RAM"):
        apply(target, VmState.from_json(data))


def test_a_snapshot_takes_a_qcow2_internal_snapshot_and_refuses_a_raw_disk(
        disk: Path, tmp_path: Path) -> None:
    import shutil
    import subprocess

    from pyhv.snapshot import SnapshotStore, create_snapshot, revert_snapshot
    store = SnapshotStore(tmp_path / "snaps")
    m = machine(disk)
    try:
        blk = functions(m)[0].device
        blk.disk.write(0, b"before")
        made = create_snapshot(m, store, "s1", vm="t")
        assert made.manifest.disks == [{"index": 0, "path": str(disk), "format": "qcow2",
                                        "read_only": False, "snapshot": "s1"}]
        blk.disk.write(0, b"after!")
        revert_snapshot(m, store, "s1")
        assert blk.disk.read(0, 6) == b"before"
    finally:
        m.close()
    if shutil.which("qemu-img"):
        r = subprocess.run(["qemu-img", "snapshot", "-l", str(disk)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0 and " s1 " in r.stdout, r.stdout + r.stderr
        r = subprocess.run(["qemu-img", "check", str(disk)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr

    raw = tmp_path / "r.img"
    raw.write_bytes(bytes(1 << 20))
    from pyhv.cmd_run import _rng_function
    m = Machine(MachineConfig(engine="emu", mem_size=4 << 20, setup=_setup,
                              pci_devices=[make_function(DiskSpec(str(raw), "raw"), 0),
                                           _rng_function]), lambda _b: None)
    try:
        with pytest.raises(StateError, match="raw image"):
            create_snapshot(m, store, "s2", vm="t")
        assert not store.exists("s2") and not list((tmp_path / "snaps").glob(".s2*"))
    finally:
        m.close()


def test_the_msix_table_and_pending_bits_round_trip(disk: Path, target: Machine) -> None:
    """A driver's MSI-X vectors (table entries, pending bits) are part of the record: a
    restored Linux guest's virtio interrupts go where its driver pointed them."""
    m = machine(disk)
    try:
        fn = functions(m)[0]
        drive(fn)
        fn.msix.write(0x10, 4, 0xFEE01004)         # vector 1: address, data, unmasked
        fn.msix.write(0x18, 4, 0x0041)
        fn.msix.write(0x1C, 4, 0)
        fn.msix.pending = 0b10
        data = json.loads(json.dumps(capture(m).to_json()))
    finally:
        m.close()
    apply(target, VmState.from_json(data))
    got = functions(target)[0].msix
    assert got.read(0x10, 4) == 0xFEE01004 and got.read(0x18, 4) == 0x41
    assert got.read(0x1C, 4) == 0 and got.pending == 0b10
    blk = next(n for n in data["devices"] if n.startswith("pci."))
    rec = data["devices"][blk]["state"]["virtio"]["msix"]
    table = bytearray(bytes.fromhex(rec["table"]))
    table[0x1C] |= 2                                # a reserved vector-control bit
    rec["table"] = table.hex()
    with pytest.raises(StateError, match="reserved"):
        apply(target, VmState.from_json(data))
