"""fw_cfg: signature, ID, RAM size, CPUs, file directory, through the ports."""

from __future__ import annotations

import struct

import pytest

from pyhv.devices import fwcfg as f
from pyhv.devices.bus import Bus
from pyhv.devices.fwcfg import FwCfg


def make(ram: int = 128 << 20, cpus: int = 2) -> tuple[Bus, FwCfg]:
    dev = FwCfg(ram, cpus)
    bus = Bus("pio", strict=True)
    for base, length, d, name in dev.regions():
        bus.register(base, length, d, name)
    return bus, dev


def read_item(bus: Bus, key: int, n: int) -> bytes:
    bus.write(0x510, 2, key)
    return bytes(bus.read(0x511, 1) for _ in range(n))


def test_signature_and_id() -> None:
    bus, _ = make()
    assert read_item(bus, f.KEY_SIGNATURE, 4) == b"QEMU"
    ident = struct.unpack("<I", read_item(bus, f.KEY_ID, 4))[0]
    assert ident & f.ID_TRADITIONAL and not ident & f.ID_DMA


def test_ram_size_and_cpus() -> None:
    bus, _ = make(ram=3 << 30, cpus=4)
    assert struct.unpack("<Q", read_item(bus, f.KEY_RAM_SIZE, 8))[0] == 3 << 30
    assert struct.unpack("<H", read_item(bus, f.KEY_NB_CPUS, 2))[0] == 4


def test_reads_past_end_and_unknown_keys_are_zero() -> None:
    bus, _ = make()
    assert read_item(bus, f.KEY_SIGNATURE, 8) == b"QEMU\0\0\0\0"
    assert read_item(bus, 0x1234, 4) == bytes(4)


def test_selector_write_rewinds() -> None:
    bus, _ = make()
    assert read_item(bus, f.KEY_SIGNATURE, 2) == b"QE"
    assert read_item(bus, f.KEY_SIGNATURE, 2) == b"QE"


def test_data_writes_are_ignored() -> None:
    bus, _ = make()
    bus.write(0x510, 2, f.KEY_SIGNATURE)
    bus.write(0x511, 1, 0x41)
    assert read_item(bus, f.KEY_SIGNATURE, 4) == b"QEMU"


def test_file_directory() -> None:
    bus, dev = make()
    assert read_item(bus, f.KEY_FILE_DIR, 4) == bytes(4)
    k1 = dev.add_file("etc/boot-fail-wait", b"\x05\0\0\0")
    k2 = dev.add_file("opt/pyhv/hello", b"hello, world")
    assert (k1, k2) == (0x20, 0x21)
    bus.write(0x510, 2, f.KEY_FILE_DIR)
    count = struct.unpack(">I", bytes(bus.read(0x511, 1) for _ in range(4)))[0]
    assert count == 2
    entries = []
    for _ in range(count):
        raw = bytes(bus.read(0x511, 1) for _ in range(64))
        size, select, reserved, name = struct.unpack(">IHH56s", raw)
        assert reserved == 0
        entries.append((name.rstrip(b"\0").decode(), size, select))
    assert entries == [("etc/boot-fail-wait", 4, 0x20), ("opt/pyhv/hello", 12, 0x21)]
    assert read_item(bus, 0x21, 12) == b"hello, world"


def test_file_names_are_checked() -> None:
    _, dev = make()
    dev.add_file("a", b"")
    with pytest.raises(ValueError):
        dev.add_file("a", b"x")
    with pytest.raises(ValueError):
        dev.add_file("x" * 56, b"")
    with pytest.raises(ValueError):
        dev.set_item(f.KEY_FILE_DIR, b"")


def test_set_item() -> None:
    bus, dev = make()
    dev.set_item(0x0008, struct.pack("<I", 1234))
    assert read_item(bus, 0x0008, 4) == struct.pack("<I", 1234)
