"""Internal snapshots: the snapshot table and the create / apply / delete operations.

Snapshot table entry (qcow2.txt "Snapshots"), each entry padded to 8 bytes:

    0  l1_table_offset u64    8  l1_size u32     12 id_str_size u16   14 name_size u16
    16 date_sec u32           20 date_nsec u32   24 vm_clock_nsec u64
    32 vm_state_size u32      36 extra_data_size u32
    40 extra data: vm_state_size_large u64, disk_size u64 [, icount u64]
       id string, name (no terminators)

A snapshot owns an L1 table; its L2 tables and data clusters are shared with the active
image and counted once per L1 that reaches them.

Entries are written as QEMU writes them, in v2 images too: 24 bytes of extra data
(vm_state_size_large, disk_size, icount; icount all ones when unknown) plus any unknown
extra data kept. An entry read without disk_size means "the image's current size" (v2
allowed that; in a v3 image it is an incomplete entry, which check reports and any
rewrite completes). v2 images need not record the size per snapshot, so, as QEMU does,
a v2 image with snapshots is never resized, and a snapshot whose recorded size differs
from the image's cannot be applied to it.

Every operation here is a whole-metadata rewrite (rewrite.py): the new active L1 and L2
copies, the new snapshot table and a recounted refcount structure are written past the
end of the file and switched in by one header write, so a crash leaves the old image
intact (the new clusters are then merely unreferenced space past the end).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyhv.disk.qcow2.header import MAX_L1_BYTES, MAX_VIRTUAL_SIZE, l1_entries_needed
from pyhv.errors import ImageError

if TYPE_CHECKING:
    from pyhv.disk.qcow2.image import Qcow2Image

_ENTRY = struct.Struct(">QIHHIIQII")
MAX_EXTRA = 1024
MAX_NAME_BYTES = 255  # QEMU keeps names in a char[256]
MAX_TABLE_BYTES = 64 << 20


@dataclass
class Snapshot:
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    disk_size: int | None = None
    icount: int | None = None
    extra_rest: bytes = b""

    def pack(self, version: int, image_size: int) -> bytes:
        extra = struct.pack(">QQQ", self.vm_state_size,
                            image_size if self.disk_size is None else self.disk_size,
                            (1 << 64) - 1 if self.icount is None else self.icount)
        extra += self.extra_rest
        ids, name = self.id_str.encode(), self.name.encode()
        out = _ENTRY.pack(self.l1_table_offset, self.l1_size, len(ids), len(name),
                          self.date_sec, self.date_nsec, self.vm_clock_nsec,
                          min(self.vm_state_size, 0xFFFFFFFF), len(extra))
        out += extra + ids + name
        return out + bytes(-len(out) % 8)


def parse_snapshots(read: Callable[[int, int, str], bytes], offset: int, count: int, cs: int,
                    file_size: int) -> tuple[list[Snapshot], int]:
    """Parse `count` entries at `offset`; return them and the table's byte length."""
    snaps: list[Snapshot] = []
    pos = offset
    for i in range(count):
        raw = read(pos, _ENTRY.size, "snapshot table")
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vmsize,
         extra_len) = _ENTRY.unpack(raw)
        if extra_len > MAX_EXTRA:
            raise ImageError(f"snapshot {i}: extra data too large ({extra_len} bytes)")
        rest = read(pos + _ENTRY.size, extra_len + id_len + name_len, "snapshot table")
        extra = rest[:extra_len]
        sn = Snapshot(l1_off, l1_size, rest[extra_len:extra_len + id_len].decode(
            errors="replace"), rest[extra_len + id_len:].decode(errors="replace"),
            dsec, dnsec, clock, vmsize)
        if extra_len >= 8:
            sn.vm_state_size = struct.unpack_from(">Q", extra, 0)[0]
        if extra_len >= 16:
            sn.disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if extra_len >= 24:
            sn.icount = struct.unpack_from(">Q", extra, 16)[0]
            sn.extra_rest = bytes(extra[24:])
        if l1_off % cs or (l1_size and l1_off == 0):
            raise ImageError(f"snapshot {i}: L1 table offset {l1_off:#x} is not "
                             "cluster-aligned")
        if l1_size * 8 > MAX_L1_BYTES:
            raise ImageError(f"snapshot {i}: L1 table too large ({l1_size} entries)")
        if l1_off + l1_size * 8 > file_size:
            raise ImageError(f"snapshot {i}: L1 table lies past the end of the file")
        snaps.append(sn)
        pos += _ENTRY.size + extra_len + id_len + name_len
        pos += -pos % 8
        if pos - offset > MAX_TABLE_BYTES:
            raise ImageError("snapshot table too large")
    return snaps, pos - offset


def find(img: Qcow2Image, key: str) -> int:
    """Index of the snapshot whose ID, else name, is `key`."""
    for i, sn in enumerate(img.snapshots):
        if sn.id_str == key:
            return i
    for i, sn in enumerate(img.snapshots):
        if sn.name == key:
            return i
    raise ImageError(f"no snapshot with ID or name {key!r} in {img.path}")


def create(img: Qcow2Image, name: str) -> Snapshot:
    """Make snapshot `name` of the active image (the old active L1 becomes its L1)."""
    from pyhv.disk.qcow2.rewrite import rewrite

    if len(name.encode()) > MAX_NAME_BYTES:  # QEMU silently cuts names to 255 bytes
        raise ImageError(f"snapshot names are limited to {MAX_NAME_BYTES} bytes")
    if any(sn.name == name for sn in img.snapshots):
        raise ImageError(f"a snapshot named {name!r} already exists")
    if len(img.snapshots) >= 65536:
        raise ImageError("too many snapshots")
    ids = [int(sn.id_str) for sn in img.snapshots if sn.id_str.isdigit()]
    now = time.time()
    sn = Snapshot(img.h.l1_table_offset, img.h.l1_size, str(max(ids, default=0) + 1), name,
                  int(now), int((now % 1) * 1e9), 0, 0, img.size, 0)  # icount 0 as QEMU
    rewrite(img, active_l1=list(img.l1), snapshots=[*img.snapshots, sn], size=img.size)
    return sn


def apply(img: Qcow2Image, key: str) -> None:
    """Revert the active image to snapshot `key` (it keeps the snapshot)."""
    from pyhv.disk.qcow2.rewrite import rewrite

    sn = img.snapshots[find(img, key)]
    l1 = img.read_l1(sn.l1_table_offset, sn.l1_size)
    size = sn.disk_size if sn.disk_size is not None else img.size
    if img.h.version < 3 and size != img.size:  # QEMU's goto would resize: refused in v2
        raise ImageError(f"Can't resize a v2 image which has snapshots\nCould not apply "
                         f"snapshot '{key}': Failed to load snapshot: Operation not "
                         "supported")
    need = l1_entries_needed(size, img.h.cluster_bits)
    if size > MAX_VIRTUAL_SIZE or need * 8 > MAX_L1_BYTES:
        raise ImageError(f"snapshot {sn.id_str} records an impossible disk size {size}")
    l1 = l1 + [0] * max(0, need - len(l1))
    rewrite(img, active_l1=l1, snapshots=list(img.snapshots), size=size)


def delete(img: Qcow2Image, key: str) -> None:
    from pyhv.disk.qcow2.rewrite import rewrite

    i = find(img, key)
    rest = img.snapshots[:i] + img.snapshots[i + 1:]
    rewrite(img, active_l1=list(img.l1), snapshots=rest, size=img.size)
