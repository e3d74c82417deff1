"""Synthetic Linux images for the loader tests, so its logic is tested without a network.

A synthetic bzImage follows Documentation/arch/x86/boot.rst: `setup_sects` 512-byte
sectors after the boot sector, a setup header at 0x1f1 ("HdrS" at 0x202), then the
protected-mode part, whose payload (at payload_offset) is a gzip-compressed ELF64
"vmlinux" with one PT_LOAD at 16 MiB, followed by the decompressed size as a u32.
"""

from __future__ import annotations

import gzip
import struct

from pyhv.arch.x86 import layout
from pyhv.memory import GuestMemory

KERNEL_TEXT = b"\x90" * 64 + b"\xf4" + b"PYHV-FAKE-KERNEL"     # nop sled, hlt, a tag
LOAD = 0x100_0000


def fake_vmlinux(text: bytes = KERNEL_TEXT, paddr: int = LOAD, bss: int = 0x2000,
                 notes: bool = True) -> bytes:
    """A minimal x86-64 ELF with one PT_LOAD (text + bss) and a Linux ELF note."""
    note = b""
    if notes:
        name, desc = b"Linux\0\0\0", b"6.6.6-fake\0\0"
        note = struct.pack("<III", 6, 11, 0x100) + name + desc
    phnum = 2 if note else 1
    text_off = 64 + 56 * phnum
    note_off = text_off + len(text)
    eh = (b"\x7fELF\x02\x01\x01" + bytes(9)
          + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, paddr, 64, 0, 0, 64, 56, phnum, 0, 0, 0))
    ph = struct.pack("<IIQQQQQQ", 1, 7, text_off, 0xFFFFFFFF80000000 + paddr, paddr,
                     len(text), len(text) + bss, 0x200000)
    if note:
        ph += struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    return eh + ph + text + note


def fake_bzimage(*, version: int = 0x020F, payload: bytes | None = None,
                 xloadflags: int = 0x3, init_size: int = 0x400000,
                 setup_sects: int = 3) -> bytes:
    """A bzImage-shaped file: setup header + protected-mode part with a gzip payload."""
    vmlinux = fake_vmlinux()
    if payload is None:
        payload = gzip.compress(vmlinux, mtime=0)    # gzip ends with ISIZE: the size word
    pm = bytearray(b"\xf4" * 0x200)                  # "decompressor" (64-bit entry at +0x200)
    pm += b"\xf4" * 0x10
    payload_offset = len(pm)
    pm += payload
    pm += bytes(-len(pm) & 15)
    setup = bytearray((setup_sects + 1) * 512)
    struct.pack_into("<B", setup, 0x1F1, setup_sects)
    struct.pack_into("<I", setup, 0x1F4, len(pm) // 16)          # syssize
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    struct.pack_into("<BB", setup, 0x200, 0xEB, 0x6A)            # jmp; header ends 0x26c
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<H", setup, 0x20E, 0x400)                   # kernel_version string
    setup[0x600:0x600 + 40] = b"6.6.6-fake (pyhv@test) #1 SMP\0".ljust(40, b"\0")
    struct.pack_into("<B", setup, 0x211, 0x01)                    # LOADED_HIGH
    struct.pack_into("<I", setup, 0x214, 0x100000)
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)              # initrd_addr_max
    struct.pack_into("<I", setup, 0x230, 0x200000)                # kernel_alignment
    struct.pack_into("<BB", setup, 0x234, 1, 21)                  # relocatable, min_align
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, 2047)                    # cmdline_size
    struct.pack_into("<II", setup, 0x248, payload_offset, len(payload))
    struct.pack_into("<Q", setup, 0x258, LOAD)                    # pref_address
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + bytes(pm)


def new_memory(size: int = 128 << 20) -> GuestMemory:
    return GuestMemory.with_layout(layout.ram_layout(size))


