"""Snapshot files (pyhv.snapshot) in one process: a running counting guest snapshotted,
reverted and restored from its files continues its count exactly; the RAM file is
sparse and mapped copy-on-write; damaged or foreign snapshots are refused.

The guest is tests/guests/core/counter.S on emu. Console output here is synchronous
(LiveVm collects it on the run-loop thread), so "where the guest was" is an exact byte
offset of its output."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from guestbuild import GuestBuilder, engine_unavailable
from livevm import LiveVm
from snaphelp import continues, flip_ram_byte, rewrite_json

from pyhv.errors import StateError
from pyhv.machine import MachineConfig
from pyhv.snapshot import SnapshotStore, create_snapshot, open_snapshot, revert_snapshot
from pyhv.snapshot.manifest import MANIFEST, RAM, VMSTATE
from pyhv.snapshot.ramfile import ram_checksum
from pyhv.vmstate import apply

pytestmark = pytest.mark.skipif(engine_unavailable("emu") is not None,
                                reason=f"{engine_unavailable('emu')}")
MEM = 32 << 20


@pytest.fixture
def vms() -> Iterator[list[LiveVm]]:
    made: list[LiveVm] = []
    yield made
    for vm in made:
        vm.close()


@pytest.fixture
def counter(guests: GuestBuilder) -> Path:
    return Path(guests("counter"))


def running(counter: Path, vms: list[LiveVm], after: bytes = b"count 3\n") -> LiveVm:
    vm = LiveVm(MachineConfig(kernel=counter, engine="emu", mem_size=MEM))
    vms.append(vm)
    vm.start().wait_for(after)
    return vm


def snapshot(vm: LiveVm, store: SnapshotStore, name: str) -> int:
    """Snapshot the (running) VM; returns its output length at that instant."""
    vm.pause()
    at = len(vm.output())
    create_snapshot(vm.machine, store, name, vm="t")
    vm.runner.resume()
    return at


def test_revert_puts_a_running_guest_back_to_the_snapshot(
        counter: Path, vms: list[LiveVm], tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "t")
    vm = running(counter, vms)
    at = snapshot(vm, store, "s1")
    vm.wait_more(500, at)
    vm.pause()
    mark = len(vm.output())
    revert_snapshot(vm.machine, store, "s1")
    vm.runner.resume()
    vm.wait_more(200, mark)
    vm.stop()
    continues(vm.output()[mark:], at)     # from the snapshot's point, not from mark


def test_restore_from_the_files_maps_ram_copy_on_write_and_continues(
        counter: Path, vms: list[LiveVm], tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "t")
    vm = running(counter, vms)
    at = snapshot(vm, store, "s1")
    vm.stop()
    snapdir = store.path("s1")
    ram = snapdir / RAM
    assert ram.stat().st_size == MEM
    assert ram.stat().st_blocks * 512 < MEM // 8          # zero pages are holes
    manifest, state = open_snapshot(snapdir)
    new = LiveVm(MachineConfig(mem_size=manifest.mem_size, n_cpus=manifest.cpus,
                               engine="emu", restore_ram=ram))
    vms.append(new)
    maps = Path(f"/proc/{os.getpid()}/maps").read_text()
    assert str(ram.resolve()) in maps                     # the RAM is the file, mapped
    before = ram_checksum(ram)
    apply(new.machine, state)
    new.start().wait_more(200, 0)
    new.stop()
    continues(new.output(), at)
    assert ram_checksum(ram) == before                    # private: the file is untouched


def _copy_snapshot(tmp_path: Path, counter: Path, vms: list[LiveVm]) -> Path:
    store = SnapshotStore(tmp_path / "t")
    vm = running(counter, vms)
    snapshot(vm, store, "s1")
    vm.stop()
    return store.path("s1")


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "ram-byte-flipped": (flip_ram_byte, "does not match its checksum"),
    "ram-truncated": (lambda d: os.truncate(d / RAM, MEM - 4096), "bytes, the manifest"),
    "vmstate-edited": (lambda d: (d / VMSTATE).write_text(
        (d / VMSTATE).read_text().replace('"halted": false', '"halted": fals0', 1)),
                       "checksum"),
    "vmstate-missing": (lambda d: (d / VMSTATE).unlink(), "missing"),
    "manifest-missing": (lambda d: (d / MANIFEST).unlink(), "not a pyhv snapshot"),
    "manifest-garbage": (lambda d: (d / MANIFEST).write_text("{"), "not valid JSON"),
    "newer-format": (lambda d: rewrite_json(d, MANIFEST, lambda m: m.update(format=2)),
                     "newer"),
    "newer-vmstate": (lambda d: rewrite_json(d, VMSTATE, lambda s: s.update(format=9)),
                      "newer"),
    "newer-device-record": (lambda d: rewrite_json(d, VMSTATE, lambda s: s["devices"]["pit"]
                                               .update(version=2)), "newer"),
    "state-disagrees": (lambda d: rewrite_json(d, VMSTATE, lambda s: s.update(
        mem_size=MEM * 2)), "does not agree"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_snapshots_are_refused(counter: Path, vms: list[LiveVm], tmp_path: Path,
                                       case: str) -> None:
    snapdir = _copy_snapshot(tmp_path, counter, vms)
    damage, words = DAMAGE[case]
    damage(snapdir)
    with pytest.raises(StateError, match=words):
        m, state = open_snapshot(snapdir)
        # a record newer than this pyhv reads is found when it meets the machine
        target = LiveVm(MachineConfig(mem_size=m.mem_size, engine="emu",
                                      restore_ram=snapdir / RAM))
        vms.append(target)
        apply(target.machine, state)


def test_a_foreign_device_set_is_refused_before_the_machine_changes(
        counter: Path, vms: list[LiveVm], tmp_path: Path) -> None:
    snapdir = _copy_snapshot(tmp_path, counter, vms)

    def drop_rtc(s: dict[str, Any]) -> None:
        del s["devices"]["rtc"]
        s["devices"]["floppy"] = {"version": 1, "state": {}}
    rewrite_json(snapdir, VMSTATE, drop_rtc)
    rewrite_json(snapdir, MANIFEST, lambda m: m.update(devices=[
        "floppy" if d == "rtc" else d for d in m["devices"]]))
    m, state = open_snapshot(snapdir)
    target = LiveVm(MachineConfig(mem_size=m.mem_size, engine="emu",
                                  restore_ram=snapdir / RAM))
    vms.append(target)
    with pytest.raises(StateError, match="device set differs.*rtc.*floppy"):
        apply(target.machine, state)


def _punch_hole(snapdir: Path) -> None:
    """Zero the first data page at or above 1 MiB by making it a hole (truncate to it,
    then write back what followed)."""
    fd = os.open(snapdir / RAM, os.O_RDWR)
    try:
        at = os.lseek(fd, 0x100000, os.SEEK_DATA)
        size = os.fstat(fd).st_size
        rest = os.pread(fd, size - at - 4096, at + 4096)
        os.ftruncate(fd, at)
        os.ftruncate(fd, size)
        os.pwrite(fd, rest, at + 4096)
    finally:
        os.close(fd)


def _write_into_hole(snapdir: Path) -> None:
    fd = os.open(snapdir / RAM, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        hole = os.lseek(fd, 0, os.SEEK_HOLE)
        assert hole < size, "the copy has no hole"
        os.pwrite(fd, b"\x01", hole)
    finally:
        os.close(fd)


def _densify(snapdir: Path) -> None:
    """A copy that filled the holes (same content): the quick check cannot vouch for
    it and falls back to the full hash, which accepts it."""
    data = (snapdir / RAM).read_bytes()
    (snapdir / RAM).unlink()
    (snapdir / RAM).write_bytes(data)


def _sparse_copytree(src: Path, dst: Path) -> None:
    """copytree fills the RAM file's holes; copy it again with its zero pages holes."""
    import shutil
    shutil.copytree(src, dst)
    data = (src / RAM).read_bytes()
    (dst / RAM).unlink()
    fd = os.open(dst / RAM, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, len(data))
        zero = bytes(4096)
        for off in range(0, len(data), 4096):
            if data[off:off + 4096] != zero:
                os.pwrite(fd, data[off:off + 4096], off)
    finally:
        os.close(fd)


def test_the_quick_ram_check_and_its_limit(counter: Path, vms: list[LiveVm],
                                           tmp_path: Path) -> None:
    """`--restore`'s default check: size + sparse map. It refuses a truncated file, a
    zeroed (hole-punched) page, data written into a hole; it accepts a copy with the
    holes filled (falling back to the full hash) and an older manifest without the
    quick digest (full hash). Its documented limit: a byte changed inside a data page
    passes it; the full check (--verify, snapshot-verify) refuses it."""
    orig = _copy_snapshot(tmp_path, counter, vms)
    open_snapshot(orig, ram="quick")
    cases: list[tuple[Callable[[Path], None], str | None, str | None]] = [
        (lambda d: os.truncate(d / RAM, MEM - 4096), "bytes, the manifest", None),
        (_punch_hole, "does not match its checksum", None),
        (_write_into_hole, "does not match its checksum", None),
        (_densify, None, None),
        (lambda d: rewrite_json(d, MANIFEST, lambda m: m["files"][RAM].pop(
            "sha256_extents")), None, None),
        (flip_ram_byte, None, "does not match its checksum"),
    ]
    for i, (damage, quick_words, full_words) in enumerate(cases):
        d = tmp_path / f"c{i}"
        _sparse_copytree(orig, d)
        open_snapshot(d, ram="quick")
        damage(d)
        for mode, words in (("quick", quick_words), ("full", full_words or quick_words)):
            if words is None:
                open_snapshot(d, ram=mode)
            else:
                with pytest.raises(StateError, match=words):
                    open_snapshot(d, ram=mode)
