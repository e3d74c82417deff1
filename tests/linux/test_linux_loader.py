"""The Linux loader against synthetic bzImages/vmlinux files: header parsing, boot_params,
placement, the entry state, and every way a bad image is refused (no network needed)."""

from __future__ import annotations

import gzip
import lzma
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from linuxfakes import KERNEL_TEXT, LOAD, fake_bzimage, fake_vmlinux, new_memory

from pyhv.arch.x86 import layout
from pyhv.arch.x86.cpustate import RFLAGS_IF
from pyhv.errors import ImageError
from pyhv.loader import detect_format, linux
from pyhv.loader.image import BootRequest
from pyhv.memory import GuestMemory

Write = Callable[[str, bytes], Path]


def zp_u32(mem: GuestMemory, off: int) -> int:
    return mem.read_u32(layout.ZERO_PAGE + off)


# ---------------------------------------------------------------- the header

def test_parse_header_fields() -> None:
    hdr = linux.parse_header(fake_bzimage())
    assert hdr.version == 0x020F and hdr.version_str == "2.15"
    assert hdr.setup_sects == 3 and hdr.setup_size == 2048
    assert hdr.kernel_64 and hdr.relocatable
    assert hdr.pref_address == LOAD and hdr.kernel_alignment == 0x200000
    assert hdr.cmdline_size == 2047 and hdr.initrd_addr_max == 0x7FFFFFFF
    assert hdr.release == "6.6.6-fake"
    assert hdr.raw[:1] == bytes([3]) and hdr.raw[0x202 - 0x1F1:0x206 - 0x1F1] == b"HdrS"


def test_detect_format_says_linux() -> None:
    assert detect_format(fake_bzimage()) == "linux"
    assert linux.is_linux_elf(fake_vmlinux())
    assert not linux.is_linux_elf(fake_vmlinux(notes=False))


@pytest.mark.parametrize("data, message", [
    (b"", "too small"),
    (b"\0" * 4096, "not a Linux bzImage"),
    (b"MZ" + b"\x90" * 8000, "not a Linux bzImage"),
    (b"#!/bin/sh\necho hello\n" * 100, "not a Linux bzImage"),
])
def test_not_a_kernel(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        linux.parse_header(data)


def test_old_protocol_refused() -> None:
    with pytest.raises(ImageError, match=r"boot protocol 2\.04 is too old"):
        linux.parse_header(fake_bzimage(version=0x0204))


def test_missing_boot_flag() -> None:
    data = bytearray(fake_bzimage())
    data[0x1FE:0x200] = b"\0\0"
    with pytest.raises(ImageError, match="0xAA55"):
        linux.parse_header(bytes(data))


def test_zimage_refused() -> None:
    data = bytearray(fake_bzimage())
    data[0x211] = 0
    with pytest.raises(ImageError, match="zImage"):
        linux.parse_header(bytes(data))


@pytest.mark.parametrize("keep", [0x500, 2048, 2048 + 0x100])
def test_truncated(keep: int) -> None:
    with pytest.raises(ImageError, match="truncated|too small"):
        linux.parse_header(fake_bzimage()[:keep])


def test_truncated_payload() -> None:
    data = bytearray(fake_bzimage())
    struct.pack_into("<I", data, 0x1F4, 0)            # syssize passes, payload does not
    struct.pack_into("<I", data, 0x24C, len(data))
    with pytest.raises(ImageError, match="payload .* runs past the end"):
        linux.parse_header(bytes(data))


def test_bad_kernel_alignment() -> None:
    data = bytearray(fake_bzimage())
    struct.pack_into("<I", data, 0x230, 0x3000)
    with pytest.raises(ImageError, match="power of 2"):
        linux.parse_header(bytes(data))


# ---------------------------------------------------------------- payloads

def test_payload_formats() -> None:
    elf = fake_vmlinux()
    assert linux.payload_format(gzip.compress(elf)) == "gzip"
    assert linux.payload_format(lzma.compress(elf)) == "xz"
    assert linux.payload_format(b"\x28\xb5\x2f\xfd....") == "zstd"
    assert linux.payload_format(b"\x02\x21\x4c\x18....") == "lz4"


def test_xz_payload_decompressed() -> None:
    elf = fake_vmlinux()
    blob = lzma.compress(elf, check=lzma.CHECK_CRC32) + struct.pack("<I", len(elf))
    data = fake_bzimage(payload=blob)
    hdr = linux.parse_header(data)
    assert linux.decompress_payload(data, hdr) == elf


def test_zstd_payload_falls_back_to_the_kernels_decompressor(mem: GuestMemory,
                                                              write: Write) -> None:
    data = fake_bzimage(payload=b"\x28\xb5\x2f\xfd" + bytes(60))
    g = linux.load(mem, BootRequest(write("bz", data)))
    assert "kernel's decompressor" in g.description
    assert g.entry.rip == LOAD + 0x200


def test_corrupt_payload(mem: GuestMemory, write: Write) -> None:
    data = bytearray(fake_bzimage())
    hdr = linux.parse_header(bytes(data))
    start = hdr.setup_size + hdr.payload_offset
    data[start + 20:start + 60] = b"\xff" * 40
    with pytest.raises(ImageError, match="corrupt gzip payload|gzip payload decompressed"):
        linux.load(mem, BootRequest(write("bz", bytes(data))))
    # without decompression pyhv cannot tell: the kernel's decompressor would complain
    linux.load(new_memory(), BootRequest(write("bz2", bytes(data))), decompress=False)


def test_payload_that_is_not_elf(mem: GuestMemory, write: Write) -> None:
    data = fake_bzimage(payload=gzip.compress(b"not an elf" * 10, mtime=0))
    with pytest.raises(ImageError, match="not an ELF kernel"):
        linux.load(mem, BootRequest(write("bz", data)))


# ---------------------------------------------------------------- loading

def check_boot_params(mem: GuestMemory, cmdline: str) -> None:
    zp = layout.ZERO_PAGE
    assert mem.read_u16(zp + 0x1FE) == 0xAA55
    assert mem.read(zp + 0x202, 4) == b"HdrS"
    assert mem.read_u8(zp + 0x210) == 0xFF                       # type_of_loader
    assert mem.read_u8(zp + 0x211) & 0x01                        # LOADED_HIGH
    assert zp_u32(mem, 0x228) == layout.CMDLINE and zp_u32(mem, 0x0C8) == 0
    assert mem.read_cstring(layout.CMDLINE).decode() == cmdline
    e820 = layout.e820_map(mem.size)
    assert mem.read_u8(zp + 0x1E8) == len(e820)
    for i, (addr, size, kind) in enumerate(e820):
        assert struct.unpack("<QQI", mem.read(zp + 0x2D0 + 20 * i, 20)) == (addr, size, kind)


def check_entry_64(g: object, rip: int) -> None:
    st = g.entry  # type: ignore[attr-defined]
    assert st.mode == "long" and st.cpl == 0
    assert st.cs.selector == 0x10 and st.cs.l == 1
    assert st.ds.selector == st.es.selector == st.ss.selector == 0x18
    assert st.rsi == layout.ZERO_PAGE and st.rip == rip
    assert not st.rflags & RFLAGS_IF


def walk(mem: GuestMemory, cr3: int, va: int) -> int:
    """Translate va through 4-level paging with 2 MiB pages (what pyhv's tables use)."""
    pml4e = mem.read_u64(cr3 + 8 * ((va >> 39) & 511))
    pdpte = mem.read_u64((pml4e & ~0xFFF) + 8 * ((va >> 30) & 511))
    pde = mem.read_u64((pdpte & 0x000FFFFFFFFFF000) + 8 * ((va >> 21) & 511))
    assert pml4e & 1 and pdpte & 1 and pde & 1 and pde & 0x80
    return (pde & 0x000FFFFFFFE00000) | (va & 0x1FFFFF)


def test_load_decompressed(mem: GuestMemory, write: Write) -> None:
    initrd = b"INITRD" * 1000
    g = linux.load(mem, BootRequest(write("bz", fake_bzimage()), "console=ttyS0 quiet",
                                    write("initrd", initrd)))
    assert g.format == "linux" and "gzip payload decompressed by pyhv" in g.description
    check_entry_64(g, LOAD)                      # the ELF's entry: the kernel's startup_64
    assert mem.read(LOAD, len(KERNEL_TEXT)) == KERNEL_TEXT
    assert mem.read(LOAD + len(KERNEL_TEXT), 0x2000) == bytes(0x2000)   # bss zeroed
    check_boot_params(mem, "console=ttyS0 quiet")
    start, size = zp_u32(mem, 0x218), zp_u32(mem, 0x21C)
    assert size == len(initrd) and mem.read(start, size) == initrd
    assert start % 4096 == 0 and start + size <= mem.size
    assert mem.size - (start + size) < 4096           # as high as it goes
    assert zp_u32(mem, 0x0C0) == zp_u32(mem, 0x0C4) == 0
    for va in (LOAD, layout.ZERO_PAGE, layout.CMDLINE, start, start + size - 1):
        assert walk(mem, g.entry.cr3, va) == va


def test_load_bzimage_as_is(mem: GuestMemory, write: Write) -> None:
    data = fake_bzimage()
    g = linux.load(mem, BootRequest(write("bz", data), "x"), decompress=False)
    check_entry_64(g, LOAD + 0x200)
    assert mem.read(LOAD, 0x100) == data[2048:2048 + 0x100]
    check_boot_params(mem, "x")
    # the setup header is copied verbatim (apart from the loader's own fields)
    assert mem.read(layout.ZERO_PAGE + 0x1F1, 9) == data[0x1F1:0x1FA]
    assert mem.read(layout.ZERO_PAGE + 0x22C, 0x38) == data[0x22C:0x264]
    assert mem.read_u32(layout.ZERO_PAGE + 0x260) == 0x400000


def test_bzimage_initrd_stays_clear_of_init_size(write: Write) -> None:
    mem = new_memory(64 << 20)
    initrd = bytes(44 << 20)      # fits only if placed over [16 MiB, 16 MiB + init_size)
    with pytest.raises(ImageError, match="does not fit"):
        linux.load(mem, BootRequest(write("bz", fake_bzimage(init_size=8 << 20)), "",
                                    write("initrd", initrd)))


def test_32bit_entry_without_xlf_kernel_64(mem: GuestMemory, write: Write) -> None:
    g = linux.load(mem, BootRequest(write("bz", fake_bzimage(xloadflags=0)), ""))
    st = g.entry
    assert st.mode == "protected" and st.rip == LOAD and st.rsi == layout.ZERO_PAGE
    assert st.cs.selector == 0x10 and st.cs.db == 1 and st.cs.l == 0
    assert st.ds.selector == 0x18
    raw = mem.read_u64(layout.BOOT_GDT + 0x10)
    assert (raw >> 53) & 1 == 0 and (raw >> 54) & 1 == 1     # GDT 0x10: 32-bit code


def test_bare_vmlinux(mem: GuestMemory, write: Write) -> None:
    g = linux.load(mem, BootRequest(write("vmlinux", fake_vmlinux()), "root=/dev/vda"))
    assert "vmlinux (ELF)" in g.description and "6.6.6-fake" in g.description
    check_entry_64(g, LOAD)
    check_boot_params(mem, "root=/dev/vda")
    assert mem.read_u16(layout.ZERO_PAGE + 0x206) == 0x020F


def test_elf_that_is_not_linux(mem: GuestMemory, write: Write) -> None:
    with pytest.raises(ImageError, match="not an x86-64 Linux vmlinux"):
        linux.load(mem, BootRequest(write("elf", fake_vmlinux(notes=False))))


def test_virtual_entry_translated(mem: GuestMemory, write: Write) -> None:
    elf = bytearray(fake_vmlinux())
    struct.pack_into("<Q", elf, 24, 0xFFFFFFFF80000000 + LOAD + 4)
    g = linux.load(mem, BootRequest(write("vmlinux", bytes(elf))))
    assert g.entry.rip == LOAD + 4


# ---------------------------------------------------------------- bad fits

def test_initrd_too_big(mem: GuestMemory, write: Write) -> None:
    big = write("big", bytes(200 << 20))
    with pytest.raises(ImageError, match=r"initrd .* does not fit in guest RAM"):
        linux.load(mem, BootRequest(write("bz", fake_bzimage()), "", big))
    assert mem.read(LOAD, 16) == bytes(16)         # nothing was written


def test_too_little_memory_for_the_kernel(write: Write) -> None:
    mem = new_memory(16 << 20)
    with pytest.raises(ImageError, match="kernel .* does not fit in guest RAM"):
        linux.load(mem, BootRequest(write("bz", fake_bzimage()), ""), decompress=False)
    with pytest.raises(ImageError, match="does not fit in guest RAM"):
        linux.load(mem, BootRequest(write("bz", fake_bzimage()), ""))


def test_cmdline_too_long(mem: GuestMemory, write: Write) -> None:
    with pytest.raises(ImageError, match="accepts at most 2047"):
        linux.load(mem, BootRequest(write("bz", fake_bzimage()), "x" * 2048))


def test_cmdline_with_nul(mem: GuestMemory, write: Write) -> None:
    with pytest.raises(ImageError, match="NUL"):
        linux.load(mem, BootRequest(write("bz", fake_bzimage()), "a\0b"))


def test_place_initrd_respects_addr_max() -> None:
    mem = new_memory(256 << 20)
    at = linux.place_initrd(mem, 10000, kernel_end=32 << 20, addr_max=(64 << 20) - 1)
    assert at + 10000 <= 64 << 20 and at % 4096 == 0 and at > (63 << 20)


def test_missing_file(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does not exist"):
        linux.load(mem, BootRequest(tmp_path / "nope"))
