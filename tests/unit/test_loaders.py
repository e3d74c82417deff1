"""Kernel loaders (pyhv.loader): flat, multiboot v1 (a.out kludge and ELF32), ELF64,
format detection, and their refusals of bad input.

Images are built here byte by byte with `struct`, so every field is under the test's
control. Every refusal is checked to be an ImageError with a one-line message and to
leave guest memory exactly as it was (a loader validates before it writes).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyhv.arch.x86 import layout
from pyhv.arch.x86.cpustate import CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME
from pyhv.errors import ImageError
from pyhv.loader import BootRequest, detect_format, load
from pyhv.loader import elf as elfmod
from pyhv.loader.multiboot import BOOTLOADER_MAGIC, find_header
from pyhv.memory import GuestMemory

MIB = 1 << 20
Put = Callable[..., Path]
Segs = list[tuple[int, bytes, int]]
MB_MAGIC = 0x1BADB002
AOUT = 1 << 16


# ---------------------------------------------------------------------- image builders


def mb_header(flags: int, *, addrs: tuple[int, ...] = (), checksum: int | None = None
              ) -> bytes:
    cs = (-(MB_MAGIC + flags)) & 0xFFFFFFFF if checksum is None else checksum
    return struct.pack("<III", MB_MAGIC, flags, cs) + struct.pack(f"<{len(addrs)}I", *addrs)


def mb_aout(load_addr: int, body: bytes, *, bss: int = 0, entry: int | None = None,
            flags: int = AOUT, load_end: int | None = None) -> bytes:
    """A multiboot image whose header (32 bytes) sits at file offset 0 = load_addr."""
    end = load_addr + 32 + len(body) if load_end is None else load_end
    entry = load_addr + 32 if entry is None else entry
    bss_end = end + bss if bss else 0
    return mb_header(flags, addrs=(load_addr, load_addr, end, bss_end, entry)) + body


def elf_image(bits: int, segs: list[tuple[int, bytes, int]], entry: int, *,
              extra_head: bytes = b"", vaddr_of: dict[int, int] | None = None) -> bytes:
    """An ELF with one PT_LOAD per (paddr, bytes, memsz); `extra_head` (e.g. a multiboot
    header) follows the program headers, inside the first 8 KiB."""
    vaddr_of = vaddr_of or {}
    ehsize, phsize = (52, 32) if bits == 32 else (64, 56)
    data_off = ehsize + phsize * len(segs) + len(extra_head)
    data_off = (data_off + 15) & ~15
    ident = b"\x7fELF" + bytes([1 if bits == 32 else 2, 1, 1, 0]) + bytes(8)
    machine = 3 if bits == 32 else 62
    if bits == 32:
        eh = ident + struct.pack("<HHIIIIIHHHHHH", 2, machine, 1, entry, ehsize, 0, 0, ehsize,
                                 phsize, len(segs), 0, 0, 0)
    else:
        eh = ident + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, entry, ehsize, 0, 0, ehsize,
                                 phsize, len(segs), 0, 0, 0)
    phs, blobs, off = b"", b"", data_off
    for i, (paddr, blob, memsz) in enumerate(segs):
        vaddr = vaddr_of.get(i, paddr)
        if bits == 32:
            phs += struct.pack("<8I", 1, off, vaddr, paddr, len(blob), memsz, 5, 0x1000)
        else:
            phs += struct.pack("<IIQQQQQQ", 1, 5, off, vaddr, paddr, len(blob), memsz, 0x1000)
        blobs += blob
        off += len(blob)
    head = eh + phs + extra_head
    return head + bytes(data_off - len(head)) + blobs


def mb_elf32(segs: list[tuple[int, bytes, int]], entry: int) -> bytes:
    return elf_image(32, segs, entry, extra_head=mb_header(0x3))


# ---------------------------------------------------------------------- fixtures


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.with_layout([(0, 4 * MIB)])
    # Non-zero background: shows what a loader wrote, zeroed (bss) or left alone.
    m.fill(0, m.size, 0xCC)
    yield m
    m.close()


def snapshot(m: GuestMemory) -> list[bytes]:
    return [bytes(r.view) for r in m.regions]


@pytest.fixture
def put(tmp_path: Path) -> Iterator[Put]:
    """put(bytes, name) -> Path of a file holding them."""
    def _put(data: bytes, name: str = "kernel.img") -> Path:
        p = tmp_path / name
        p.write_bytes(data)
        return p
    yield _put


def refuse(m: GuestMemory, req: BootRequest, match: str) -> ImageError:
    """Loading req must fail with ImageError(match) and leave memory untouched."""
    before = snapshot(m)
    with pytest.raises(ImageError, match=match) as ei:
        load(m, req)
    assert "\n" not in str(ei.value)
    changed = _changed(before, snapshot(m), m)
    assert changed is None, f"the failed load still wrote guest memory at {changed}"
    return ei.value


def _changed(a: list[bytes], b: list[bytes], m: GuestMemory) -> str | None:
    for r, x, y in zip(m.regions, a, b, strict=True):
        if x != y:
            lo = next(i for i in range(len(x)) if x[i] != y[i])
            hi = next(i for i in range(len(x) - 1, -1, -1) if x[i] != y[i])
            return f"{r.gpa + lo:#x}-{r.gpa + hi + 1:#x}"
    return None


def info_fields(m: GuestMemory, addr: int) -> dict[str, int]:
    names = ("flags", "mem_lower", "mem_upper", "boot_device", "cmdline", "mods_count",
             "mods_addr")
    out = dict(zip(names, struct.unpack_from("<7I", m.read(addr, 28)), strict=True))
    out["mmap_length"], out["mmap_addr"] = struct.unpack("<II", m.read(addr + 44, 8))
    out["boot_loader_name"] = m.read_u32(addr + 64)
    return out


# ---------------------------------------------------------------------- format detection


def test_detect_format() -> None:
    assert detect_format(mb_aout(0x100000, b"\xf4")) == "multiboot"
    assert detect_format(mb_elf32([(0x100000, b"\xf4", 1)], 0x100000)) == "multiboot"
    assert detect_format(elf_image(64, [(0x200000, b"\xf4", 1)], 0x200000)) == "elf64"
    assert detect_format(b"\xb0\x55\xe6\xf4\xf4" + bytes(505) + b"\x55\xaa") == "flat"
    assert detect_format(bytes(0x202) + b"HdrS" + bytes(16)) == "linux"
    with pytest.raises(ImageError, match="ELF32 image without a multiboot header"):
        detect_format(elf_image(32, [(0x100000, b"\xf4", 1)], 0x100000))


@pytest.mark.parametrize("data,why", [
    (b"\xb0\x55\xe6\xf4\xf4", "it has 5 bytes, not 512"),           # flat code, no signature
    (b"root:x:0:0:root:/root:/bin/sh\n" * 40, "not 512"),             # /etc/passwd
    (bytes(510) + b"\xaa\x55", "its last two bytes are not 55 aa"),   # swapped signature
    (bytes(1024) + b"\x55\xaa", "not 512"),                           # too big for a sector
])
def test_detect_format_refuses_what_it_does_not_recognise(data: bytes, why: str) -> None:
    """--format auto takes a flat image only as a boot sector; anything else is refused
    with why it is none of the formats, and the hint to use --format flat."""
    with pytest.raises(ImageError) as e:
        detect_format(data, "kernel 'x'")
    msg = str(e.value)
    assert msg.startswith("kernel 'x' is in no format pyhv recognises")
    for part in ("not Linux", "not multiboot", "not ELF64", why, "--format flat"):
        assert part in msg


def test_multiboot_header_search() -> None:
    assert find_header(mb_header(0)) == (0, 0)
    assert find_header(bytes(8) + mb_header(AOUT, addrs=(0,) * 5)) == (8, AOUT)
    assert find_header(bytes(6) + mb_header(0)) is None           # must be 4-byte aligned
    assert find_header(bytes(8192 - 12) + mb_header(0)) == (8180, 0)   # last slot
    assert find_header(bytes(8192 - 8) + mb_header(0)) is None    # beyond the first 8 KiB
    assert find_header(mb_header(0, checksum=0)) is None          # bad checksum
    assert find_header(b"") is None and find_header(b"\x02\xb0\xad\x1b") is None


# ---------------------------------------------------------------------- flat


def test_flat_loads_at_7c00_in_real_mode(mem: GuestMemory, put: Put) -> None:
    code = bytes(range(1, 200))
    g = load(mem, BootRequest(put(code, "boot.bin"), format="flat"))
    assert g.format == "flat"
    assert mem.read(0x7C00, len(code)) == code
    assert mem.read_u8(0x7BFF) == 0xCC and mem.read_u8(0x7C00 + len(code)) == 0xCC
    st = g.entry
    assert st.mode == "real" and not st.cr0 & CR0_PE
    assert (st.cs.selector, st.cs.base, st.rip) == (0, 0, 0x7C00)
    assert (st.ss.selector, st.rsp) == (0, 0x7C00)
    assert st.rdx & 0xFF == 0x80
    assert g.extents == [(0x7C00, 0x7C00 + len(code))]


def test_flat_at_a_high_address_uses_a_segment(mem: GuestMemory, put: Put) -> None:
    g = load(mem, BootRequest(put(b"\xf4"), format="flat", load_addr=0x12340))
    assert mem.read_u8(0x12340) == 0xF4
    assert (g.entry.cs.selector, g.entry.cs.base, g.entry.rip) == (0x1234, 0x12340, 0)


@pytest.mark.parametrize("addr,size,match", [
    (0x7C00, layout.VGA_START - 0x7C00 + 1, "does not fit"),
    (0x100, 16, "does not fit"),
    (0x9FFF0, 32, "does not fit"),
])
def test_flat_refusals(mem: GuestMemory, put: Put, addr: int, size: int,
                       match: str) -> None:
    refuse(mem, BootRequest(put(b"\x90" * size), format="flat", load_addr=addr), match)


def test_flat_takes_no_initrd(mem: GuestMemory, put: Put) -> None:
    refuse(mem, BootRequest(put(b"\xf4"), format="flat", initrd=put(b"x", "initrd")),
           "no --initrd")


# ---------------------------------------------------------------------- multiboot


def test_multiboot_aout_lands_and_enters_protected_mode(mem: GuestMemory, put: Put) -> None:
    body = b"\xf4" + bytes(range(2, 100))
    img = mb_aout(0x100000, body, bss=0x2000)
    g = load(mem, BootRequest(put(img), cmdline="console=ttyS0 x=1"))
    assert g.format == "multiboot"
    assert mem.read(0x100000, len(img)) == img
    end = 0x100000 + len(img)
    assert mem.read(end, 0x2000) == bytes(0x2000)                 # bss zeroed
    assert mem.read_u8(end + 0x2000) == 0xCC                       # and no further
    assert g.extents[0] == (0x100000, end + 0x2000)
    st = g.entry
    assert st.mode == "protected" and st.cr0 & CR0_PE and not st.cr0 & CR0_PG
    assert st.rip == 0x100020
    assert st.rax == BOOTLOADER_MAGIC == 0x2BADB002
    assert st.rbx == layout.BOOTINFO
    assert st.cs.db == 1 and st.cs.base == 0 and st.cs.limit == 0xFFFFFFFF
    assert st.cs.selector == 0x08 and st.ds.selector == st.ss.selector == 0x18
    assert not st.rflags & (1 << 9)                               # interrupts off
    # the boot GDT the selectors refer to is in guest memory
    assert st.gdt.base == layout.BOOT_GDT and mem.read_u64(layout.BOOT_GDT) == 0


def test_multiboot_info_structure(mem: GuestMemory, put: Put) -> None:
    g = load(mem, BootRequest(put(mb_aout(0x100000, b"\xf4")), cmdline="hello world"))
    info = info_fields(mem, g.entry.rbx)
    assert info["flags"] & 0x1 and info["flags"] & 0x4 and info["flags"] & 0x40
    assert info["flags"] & (1 << 9)
    assert not info["flags"] & 0x8                                # no modules without --initrd
    assert info["mem_lower"] == 639
    assert info["mem_upper"] == (4 * MIB - MIB) // 1024
    assert mem.read_cstring(info["cmdline"]) == b"hello world"
    assert mem.read_cstring(info["boot_loader_name"]) == b"pyhv"
    raw = mem.read(info["mmap_addr"], info["mmap_length"])
    entries = [struct.unpack_from("<IQQI", raw, o) for o in range(0, len(raw), 24)]
    assert [(a, n, t) for _, a, n, t in entries] == layout.e820_map(4 * MIB)
    assert all(size == 20 for size, *_ in entries)


def test_multiboot_initrd_is_module_0(mem: GuestMemory, put: Put) -> None:
    blob = bytes(range(256)) * 20
    img = mb_aout(0x100000, b"\xf4", bss=0x1234)
    g = load(mem, BootRequest(put(img), initrd=put(blob, "my.cpio")))
    info = info_fields(mem, g.entry.rbx)
    assert info["flags"] & 0x8 and info["mods_count"] == 1
    mod_start, mod_end, string, _ = struct.unpack("<4I", mem.read(info["mods_addr"], 16))
    kernel_end = 0x100000 + len(img) + 0x1234
    assert mod_start % 4096 == 0 and mod_start >= kernel_end
    assert mod_end - mod_start == len(blob)
    assert mem.read(mod_start, len(blob)) == blob
    assert mem.read_cstring(string) == b"my.cpio"
    assert (mod_start, mod_end) in g.extents


def test_multiboot_elf32_segments_go_to_their_physical_addresses(mem: GuestMemory,
                                                                  put: Put) -> None:
    text, data = b"\xf4" * 64, b"DATA" * 8
    img = mb_elf32([(0x100000, text, len(text)), (0x180000, data, len(data) + 0x1000)],
                   0x100000)
    g = load(mem, BootRequest(put(img)))
    assert g.format == "multiboot"
    assert mem.read(0x100000, 64) == text
    assert mem.read(0x180000, len(data)) == data
    assert mem.read(0x180000 + len(data), 0x1000) == bytes(0x1000)
    assert mem.read_u8(0x180000 + len(data) + 0x1000) == 0xCC
    assert g.entry.rip == 0x100000 and g.entry.rax == 0x2BADB002
    assert g.extents == [(0x100000, 0x100040), (0x180000, 0x180000 + len(data) + 0x1000)]


def test_multiboot_bad_checksum(mem: GuestMemory, put: Put) -> None:
    img = mb_header(AOUT, addrs=(0x100000, 0x100000, 0, 0, 0x100020), checksum=1) + b"\xf4"
    refuse(mem, BootRequest(put(img), format="multiboot"), "no multiboot header")


@pytest.mark.parametrize("img,match", [
    (mb_aout(0x100000, b"\xf4", flags=AOUT | (1 << 3)), "unsupported features"),
    (mb_aout(0x100000, b"\xf4", load_end=0x100000 + 4096), "truncated"),
    (mb_header(AOUT), "truncated multiboot header"),
    (mb_header(AOUT, addrs=(0x100000, 0x100010, 0, 0, 0x100020)), "inconsistent"),
    (mb_aout(0x8000, b"\xf4"), "overlaps pyhv's boot structures"),
    (mb_aout(0x3FFFF0, b"\xf4" * 64), "does not fit in guest RAM"),
    (mb_aout(0x100000, b"\xf4", bss=64 * MIB), "does not fit in guest RAM"),
    (mb_aout(0x100000, b"\xf4", entry=0x300000), "entry point"),
], ids=["flag-bit-3", "load-end-past-eof", "short-header", "header-before-load",
        "below-1MiB", "past-ram", "bss-past-ram", "entry-outside"])
def test_multiboot_aout_refusals(mem: GuestMemory, put: Put, img: bytes, match: str) -> None:
    refuse(mem, BootRequest(put(img), format="multiboot"), match)


@pytest.mark.parametrize("segs,entry,match", [
    ([(0x100000, b"\xf4", 1)], 0x200000, "entry point"),
    ([(0x100000, b"\xf4", 1), (0x500000, b"x", 1)], 0x100000, "does not fit in guest RAM"),
    ([(0x100000, b"\xf4", 1), (0x9000, b"x", 16)], 0x100000, "overlaps pyhv's boot"),
    ([(0x3FF000, b"\xf4", 0x2000)], 0x3FF000, "does not fit in guest RAM"),
])
def test_multiboot_elf32_refusals(mem: GuestMemory, put: Put, segs: Segs, entry: int,
                                  match: str) -> None:
    refuse(mem, BootRequest(put(mb_elf32(segs, entry))), match)


def test_multiboot_missing_initrd_is_refused_before_loading(mem: GuestMemory, put: Put,
                                                           tmp_path: Path) -> None:
    refuse(mem, BootRequest(put(mb_aout(0x100000, b"\xf4")), initrd=tmp_path / "nope"),
           "initrd .* does not exist")


def test_multiboot_initrd_that_does_not_fit_is_refused(mem: GuestMemory, put: Put) -> None:
    refuse(mem, BootRequest(put(mb_aout(0x100000, b"\xf4")),
                            initrd=put(bytes(4 * MIB), "big")), "does not fit")


def test_command_line_too_long_is_refused(mem: GuestMemory, put: Put) -> None:
    refuse(mem, BootRequest(put(mb_aout(0x100000, b"\xf4")),
                            cmdline="x" * layout.CMDLINE_MAX), "command line is too long")


# ---------------------------------------------------------------------- ELF parsing


def test_elf_parse_reads_segments_and_skips_empty_ones() -> None:
    img = elf_image(64, [(0x200000, b"abc", 0x1000), (0x300000, b"", 0)], 0x200000)
    e = elfmod.parse(img)
    assert (e.bits, e.machine, e.entry) == (64, 62, 0x200000)
    assert [(s.paddr, s.filesz, s.memsz) for s in e.segments] == [(0x200000, 3, 0x1000)]


@pytest.mark.parametrize("cut", [3, 20, 52, 63, 64 + 55])
def test_truncated_elf64_is_refused(mem: GuestMemory, put: Put, cut: int) -> None:
    img = elf_image(64, [(0x200000, b"\xf4" * 100, 100)], 0x200000)
    refuse(mem, BootRequest(put(img[:cut]), format="elf64"),
           "not an ELF|truncated|past the end")


def test_segment_data_past_end_of_file_is_refused(mem: GuestMemory, put: Put) -> None:
    img = elf_image(64, [(0x200000, b"\xf4" * 100, 100)], 0x200000)
    refuse(mem, BootRequest(put(img[:-1]), format="elf64"), "runs past the end of the file")


@pytest.mark.parametrize("patch,match", [
    ((5, b"\x02"), "big-endian"),
    ((4, b"\x07"), "unknown ELF class"),
    ((18, b"\x28\x00"), "not x86"),               # EM_ARM
    ((56, b"\x00\x00"), "no program headers"),   # e_phnum = 0
    ((54, b"\x10\x00"), "implausible"),          # e_phentsize = 16
    ((56, b"\xff\xff"), "implausible"),          # e_phnum = 65535
])
def test_malformed_elf_headers(patch: tuple[int, bytes], match: str) -> None:
    img = bytearray(elf_image(64, [(0x200000, b"\xf4", 1)], 0x200000))
    off, b = patch
    img[off:off + len(b)] = b
    with pytest.raises(ImageError, match=match):
        elfmod.parse(bytes(img))


def test_memsz_smaller_than_filesz_and_no_loadable_segment() -> None:
    with pytest.raises(ImageError, match="memsz < filesz"):
        elfmod.parse(elf_image(64, [(0x200000, b"abcd", 2)], 0x200000))
    with pytest.raises(ImageError, match="no loadable segment"):
        elfmod.parse(elf_image(64, [(0x200000, b"", 0)], 0x200000))


def test_huge_program_header_offset_is_refused_without_allocating() -> None:
    img = bytearray(elf_image(64, [(0x200000, b"\xf4", 1)], 0x200000))
    struct.pack_into("<Q", img, 32, 1 << 62)              # e_phoff
    with pytest.raises(ImageError, match="past the end"):
        elfmod.parse(bytes(img))


# ---------------------------------------------------------------------- ELF64


def test_elf64_loads_and_enters_long_mode_with_identity_paging(mem: GuestMemory, put: Put) -> None:
    code = b"\xf4" * 32
    img = elf_image(64, [(0x200000, code, 0x3000), (0, b"RO", 2)], 0x200010,
                    vaddr_of={1: 0x280000})               # paddr 0: placed at vaddr
    g = load(mem, BootRequest(put(img), cmdline="k64"))
    assert g.format == "elf64"
    assert mem.read(0x200000, 32) == code
    assert mem.read(0x200020, 0x3000 - 32) == bytes(0x3000 - 32)
    assert mem.read(0x280000, 2) == b"RO"
    st = g.entry
    assert st.mode == "long" and st.cs.l == 1 and st.cs.selector == 0x10
    assert st.rip == 0x200010 and st.rsp == layout.BOOT_STACK_TOP
    assert st.cr0 & CR0_PG and st.cr0 & CR0_PE and st.cr4 & CR4_PAE
    assert st.efer & EFER_LME and st.efer & EFER_LMA
    assert st.cr3 == layout.PAGE_TABLES
    pml4 = mem.read_u64(st.cr3)
    pdpt = pml4 & ~0xFFF
    for gib in range(4):
        pd = mem.read_u64(pdpt + 8 * gib) & ~0xFFF
        for i in (0, 1, 511):
            pde = mem.read_u64(pd + 8 * i)
            assert pde & 0x83 == 0x83                      # present, writable, 2 MiB page
            assert pde & ~0xFFF == gib * (1 << 30) + i * (2 << 20)
    # the same information structure as multiboot, in RDI
    assert st.rdi == layout.BOOTINFO
    assert mem.read_cstring(info_fields(mem, st.rdi)["cmdline"]) == b"k64"


@pytest.mark.parametrize("segs,entry,match", [
    ([(0x200000, b"\xf4", 1)], 0x1_0000_0000, "above the 4 GiB identity map"),
    ([(0x600000, b"\xf4", 1)], 0x600000, "does not fit in guest RAM"),
    ([(0x9000, b"\xf4", 1)], 0x9000, "overlaps pyhv's boot"),
])
def test_elf64_refusals(mem: GuestMemory, put: Put, segs: Segs, entry: int, match: str) -> None:
    refuse(mem, BootRequest(put(elf_image(64, segs, entry))), match)


def test_elf64_format_forced_on_elf32_is_refused(mem: GuestMemory, put: Put) -> None:
    img = elf_image(32, [(0x100000, b"\xf4", 1)], 0x100000)
    refuse(mem, BootRequest(put(img), format="elf64"), "not an ELF64")


def test_multiboot_format_forced_on_elf64_is_refused(mem: GuestMemory, put: Put) -> None:
    img = elf_image(64, [(0x200000, b"\xf4", 1)], 0x200000, extra_head=mb_header(0x3))
    refuse(mem, BootRequest(put(img), format="multiboot"), "must be 32-bit")


# ---------------------------------------------------------------------- files


def test_missing_directory_and_empty_files(mem: GuestMemory, tmp_path: Path, put: Put) -> None:
    refuse(mem, BootRequest(tmp_path / "missing"), "does not exist")
    refuse(mem, BootRequest(tmp_path), "is a directory")
    refuse(mem, BootRequest(put(b"", "empty")), "is empty")


def test_unknown_format_is_refused(mem: GuestMemory, put: Put) -> None:
    refuse(mem, BootRequest(put(b"\xf4"), format="pe"), "unknown image format")
