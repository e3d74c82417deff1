"""QEMU's fw_cfg, traditional I/O interface: selector 0x510, data 0x511.

Facts (QEMU docs/specs/fw_cfg.rst, "Selector (Control) Register", "Data Register",
"Firmware Configuration Items"):

    0x510  write  selector (16 bits): picks an item and rewinds its data offset to 0.
                  Bit 14 is the write channel (deprecated; writes are ignored here),
                  bit 15 marks architecture-specific items (kept as part of the key).
    0x511  read   the next byte of the selected item; past the end (or for a key with
                  no item) reads return 0. Writes are ignored (QEMU >= 2.4 too).

    key     item                                       encoding
    0x0000  signature                                  b"QEMU"
    0x0001  revision / feature bitmap                  u32 LE; bit 0 = traditional
                                                        interface, bit 1 (DMA) clear
    0x0002  UUID                                       16 bytes (zero)
    0x0003  RAM size                                   u64 LE
    0x0005  number of CPUs                             u16 LE
    0x000f  max CPUs                                   u16 LE
    0x0019  file directory                             u32 BE count, then per file:
                                                        u32 BE size, u16 BE select,
                                                        u16 reserved, char name[56]
    0x0020+ files added with add_file(name, data), in the order they were added

Design: items are immutable `bytes` in a dict keyed by selector; the file directory is
rebuilt whenever a file is added. There is no DMA interface (ID bit 1 clear, nothing at
0x514), so a guest can only read. A multi-byte read of the data port returns that many
consecutive bytes, little-endian (QEMU only allows byte reads there; pyhv is lenient).

Invariants: the data offset never exceeds the selected item's length (reads past the end
return 0 without moving it); file names are unique, shorter than 56 bytes, and their
selectors lie in [FILE_FIRST, 0x4000); the guest cannot change any item.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any, ClassVar

from pyhv.devices.bus import BusDevice
from pyhv.devices.state import Reader

PORT = 0x510
LENGTH = 2
SELECTOR = 0
DATA = 1

KEY_SIGNATURE = 0x0000
KEY_ID = 0x0001
KEY_UUID = 0x0002
KEY_RAM_SIZE = 0x0003
KEY_NB_CPUS = 0x0005
KEY_MAX_CPUS = 0x000F
KEY_FILE_DIR = 0x0019
FILE_FIRST = 0x0020
FILE_LAST = 0x3FFF

WRITE_CHANNEL = 0x4000
ARCH_LOCAL = 0x8000

ID_TRADITIONAL = 0x01
ID_DMA = 0x02
FILE_NAME_MAX = 56         # includes the terminating NUL


class FwCfg:
    """fw_cfg with the standard items and a file directory."""

    def __init__(self, ram_size: int, n_cpus: int) -> None:
        self.items: dict[int, bytes] = {
            KEY_SIGNATURE: b"QEMU",
            KEY_ID: struct.pack("<I", ID_TRADITIONAL),
            KEY_UUID: bytes(16),
            KEY_RAM_SIZE: struct.pack("<Q", ram_size),
            KEY_NB_CPUS: struct.pack("<H", n_cpus),
            KEY_MAX_CPUS: struct.pack("<H", n_cpus),
        }
        self.files: list[tuple[str, int]] = []    # (name, selector), in directory order
        self._rebuild_dir()
        self.selector = KEY_SIGNATURE
        self._offset = 0

    def regions(self) -> list[tuple[int, int, BusDevice, str]]:
        """(base, length, device, name) to register on the port bus."""
        return [(PORT, LENGTH, self, "fwcfg")]

    # ------------------------------------------------------------------ items

    def set_item(self, key: int, data: bytes) -> None:
        """Set a numbered item (e.g. 0x0007.. for a kernel handed over by fw_cfg)."""
        if not 0 <= key <= 0xFFFF or key & WRITE_CHANNEL:
            raise ValueError(f"fw_cfg key {key:#x} out of range")
        if FILE_FIRST <= key <= FILE_LAST or key == KEY_FILE_DIR:
            raise ValueError(f"fw_cfg key {key:#x} belongs to the file directory")
        self.items[key] = bytes(data)

    def add_file(self, name: str, data: bytes) -> int:
        """Add a named file; returns the selector it was given."""
        raw = name.encode()
        if not raw or len(raw) >= FILE_NAME_MAX or b"\0" in raw:
            raise ValueError(f"fw_cfg file name {name!r}: 1 to {FILE_NAME_MAX - 1} bytes")
        if any(n == name for n, _ in self.files):
            raise ValueError(f"fw_cfg file {name!r} already exists")
        key = FILE_FIRST + len(self.files)
        if key > FILE_LAST:
            raise ValueError("fw_cfg file directory is full")
        self.files.append((name, key))
        self.items[key] = bytes(data)
        self._rebuild_dir()
        return key

    def _rebuild_dir(self) -> None:
        out = bytearray(struct.pack(">I", len(self.files)))
        for name, key in self.files:
            out += struct.pack(">IHH56s", len(self.items[key]), key, 0, name.encode())
        self.items[KEY_FILE_DIR] = bytes(out)

    # ------------------------------------------------------------------ bus protocol

    def read(self, offset: int, size: int) -> int:
        if offset != DATA:
            return 0
        item = self.items.get(self.selector & ~WRITE_CHANNEL, b"")
        start = self._offset
        chunk = item[start:start + size]
        self._offset = min(start + size, len(item))
        return int.from_bytes(chunk.ljust(size, b"\0"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == SELECTOR:
            self.selector = value & 0xFFFF
            self._offset = 0

    # ------------------------------------------------------------------ state records

    state_version: ClassVar[int] = 1

    def save_state(self) -> dict[str, Any]:
        """The selector and the read offset; the items are the machine's configuration
        (the same on the machine a record is loaded into)."""
        return {"selector": self.selector, "offset": self._offset}

    def load_state(self, record: Mapping[str, Any], version: int) -> None:
        r = Reader("fwcfg", record)
        selector = r.int("selector", 0, 0xFFFF)
        offset = r.int("offset", 0, 0xFFFFFFFF)
        r.done()
        size = len(self.items.get(selector & ~WRITE_CHANNEL, b""))
        if offset > size:
            raise r.fail("offset", f"= {offset} is past the end of item {selector:#x} "
                         f"({size} bytes)")
        self.selector, self._offset = selector, offset
