"""Multiboot v1 kernels, and the multiboot information structure pyhv hands to guests.

A multiboot kernel carries, 4-byte aligned in its first 8 KiB, the header

    +0 magic 0x1BADB002   +4 flags   +8 checksum (magic + flags + checksum == 0 mod 2^32)
    +12 header_addr +16 load_addr +20 load_end_addr +24 bss_end_addr +28 entry_addr
        (the address fields only when flags bit 16, the "a.out kludge", is set)

Without bit 16 the image must be ELF: its PT_LOAD segments go to their physical
addresses. The kernel starts in 32-bit flat protected mode, paging and interrupts off,
EAX = 0x2BADB002 and EBX = the physical address of the information structure:

    +0 flags  +4 mem_lower (KiB)  +8 mem_upper (KiB)  +16 cmdline  +20 mods_count
    +24 mods_addr  +44 mmap_length  +48 mmap_addr  +64 boot_loader_name

(Multiboot Specification 0.6.96, section 3.) `--initrd FILE` becomes module 0, loaded
page-aligned above the kernel. pyhv's ELF64 entry passes the same structure in RDI.
Flag bits 0 (page-align modules) and 1 (memory info) are honoured; bit 2 (video mode) is
accepted without a framebuffer; other requirement bits (3-15) are refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyhv.arch.x86 import boot, layout
from pyhv.errors import ImageError
from pyhv.loader import elf
from pyhv.loader.image import BootRequest, LoadedGuest, check_place, read_file
from pyhv.memory import GuestMemory

MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
SEARCH = 8192
F_PAGE_ALIGN, F_MEMINFO, F_VIDEO, F_AOUT_KLUDGE = 1 << 0, 1 << 1, 1 << 2, 1 << 16
INFO_MEM, INFO_CMDLINE, INFO_MODS, INFO_MMAP, INFO_LOADER_NAME = 1, 1 << 2, 1 << 3, 1 << 6, 1 << 9
# What pyhv itself puts below 1 MiB (layout.py). 0x80000-0x100000 (EBDA, VGA hole, BIOS
# ROM on a PC) is RAM in a pyhv guest: ld's default layout puts a read-only segment of
# ELF headers just below 1 MiB, and a loader that refused it would refuse most images.
LOW_RESERVED = [(0, layout.BOOT_STACK_TOP, "pyhv's boot structures below 512 KiB")]


def find_header(data: bytes) -> tuple[int, int] | None:
    """(offset, flags) of a valid multiboot header in the first 8 KiB, or None."""
    limit = min(len(data), SEARCH) - 12
    for off in range(0, limit + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return off, flags
    return None


def load(mem: GuestMemory, req: BootRequest, data: bytes | None = None) -> LoadedGuest:
    data = data if data is not None else read_file(req.kernel, "kernel")
    found = find_header(data)
    if found is None:
        raise ImageError(f"{req.kernel}: no multiboot header in the first 8 KiB")
    hoff, flags = found
    unknown = flags & 0xFFF8
    if unknown:
        raise ImageError(f"{req.kernel}: multiboot header requires unsupported features "
                         f"(flags {unknown:#x})")
    # Validate everything (placement, entry, command line, initrd) before the first write,
    # so a refused image leaves guest memory untouched.
    extents: list[tuple[int, int]] = []
    if flags & F_AOUT_KLUDGE:
        if hoff + 32 > len(data):
            raise ImageError(f"{req.kernel}: truncated multiboot header")
        header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from("<5I", data,
                                                                               hoff + 12)
        file_start = hoff - (header_addr - load_addr)
        if header_addr < load_addr or file_start < 0:
            raise ImageError(f"{req.kernel}: inconsistent multiboot load addresses")
        size = (load_end - load_addr) if load_end else len(data) - file_start
        if size <= 0 or file_start + size > len(data):
            raise ImageError(f"{req.kernel}: multiboot load range runs past the end of the "
                             "file (truncated?)")
        end = max(bss_end, load_addr + size)
        check_place(mem, load_addr, end - load_addr, "kernel", LOW_RESERVED)
        extents.append((load_addr, end))
        writes = [(load_addr, data[file_start:file_start + size], end - load_addr - size)]
    else:
        image = elf.parse(data, str(req.kernel))
        if image.bits != 32:
            raise ImageError(f"{req.kernel}: multiboot ELF must be 32-bit (use an ELF64 "
                             "image without a multiboot header for long mode)")
        entry = image.entry
        for seg in image.segments:
            check_place(mem, seg.paddr, seg.memsz, "kernel segment", LOW_RESERVED)
        writes = [(seg.paddr, data[seg.offset:seg.offset + seg.filesz], seg.memsz - seg.filesz)
                  for seg in image.segments]
        extents.extend((seg.paddr, seg.paddr + seg.memsz) for seg in image.segments)
    if not any(lo <= entry < hi for lo, hi in extents):
        raise ImageError(f"{req.kernel}: entry point {entry:#x} is outside the loaded image")
    kernel_end = max(hi for _, hi in extents)
    plan = plan_info(mem, req, kernel_end=kernel_end, page_align_modules=True)
    for addr, blob, zeros in writes:
        mem.write(addr, blob)
        mem.fill(addr + len(blob), zeros)
    info = write_info(mem, req, kernel_end=kernel_end, page_align_modules=True,
                      extents=extents, plan=plan)
    st = boot.protected_mode(mem, entry)
    st.rax, st.rbx = BOOTLOADER_MAGIC, info
    return LoadedGuest("multiboot", st, f"multiboot kernel, entry {entry:#x}", extents)


@dataclass
class InfoPlan:
    """What write_info will place besides the fixed structures, checked in advance."""

    initrd: bytes | None = None
    initrd_start: int = 0


def plan_info(mem: GuestMemory, req: BootRequest, *, kernel_end: int,
              page_align_modules: bool) -> InfoPlan:
    """Check the command line and read and place the initrd, writing nothing."""
    cmd = req.cmdline.encode()
    if len(cmd) >= layout.CMDLINE_MAX:
        raise ImageError(f"kernel command line is too long ({len(cmd)} bytes)")
    if req.initrd is None:
        return InfoPlan()
    blob = read_file(req.initrd, "initrd")
    start = (kernel_end + 0xFFF) & ~0xFFF if page_align_modules else kernel_end
    check_place(mem, start, len(blob), "initrd (module 0)", LOW_RESERVED)
    return InfoPlan(blob, start)


def write_info(mem: GuestMemory, req: BootRequest, *, kernel_end: int,
               page_align_modules: bool, extents: list[tuple[int, int]],
               plan: InfoPlan | None = None) -> int:
    """Write the multiboot information structure (+ cmdline, mmap, modules); return it.

    `plan` (from plan_info, called before the kernel was written) is made here if absent.
    """
    if plan is None:
        plan = plan_info(mem, req, kernel_end=kernel_end,
                         page_align_modules=page_align_modules)
    info = bytearray(88)
    flags = INFO_MEM | INFO_CMDLINE | INFO_MMAP | INFO_LOADER_NAME
    low_ram = min(mem.size, layout.EBDA_START)
    first = mem.regions[0]
    struct.pack_into("<III", info, 0, 0, low_ram // 1024,
                     max(0, first.end - layout.HIGH_MEMORY) // 1024)
    mem.write(layout.CMDLINE, req.cmdline.encode() + b"\0")
    struct.pack_into("<I", info, 16, layout.CMDLINE)
    extra = layout.BOOTINFO_EXTRA
    # memory map: entries of (size=20, base u64, length u64, type u32)
    mmap = b"".join(struct.pack("<IQQI", 20, a, n, t) for a, n, t in layout.e820_map(mem.size))
    mem.write(extra, mmap)
    struct.pack_into("<II", info, 44, len(mmap), extra)
    extra += (len(mmap) + 15) & ~15
    name = b"pyhv\0"
    mem.write(extra, name)
    struct.pack_into("<I", info, 64, extra)
    extra += 16
    if req.initrd is not None and plan.initrd is not None:
        blob, start = plan.initrd, plan.initrd_start
        mem.write(start, blob)
        extents.append((start, start + len(blob)))
        mod_name = req.initrd.name.encode() + b"\0"
        mem.write(extra, mod_name)
        mod = struct.pack("<IIII", start, start + len(blob), extra, 0)
        extra += (len(mod_name) + 15) & ~15
        mem.write(extra, mod)
        struct.pack_into("<II", info, 20, 1, extra)
        extra += 16
        flags |= INFO_MODS
    struct.pack_into("<I", info, 0, flags)
    mem.write(layout.BOOTINFO, bytes(info))
    return layout.BOOTINFO
