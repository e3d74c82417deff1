"""Kernel loaders: flat (real mode), multiboot v1 (32-bit), ELF64 (long mode), Linux.

`detect_format(data)` picks a loader by content; `load(mem, request)` validates the whole
image before writing it into guest memory and returns the entry state. Loaders know
guest memory and the x86 boot helpers, never an engine or a device.

Detection (`--format auto`), first match wins:

    linux      "HdrS" at 0x202 (a bzImage), or an ELF64 vmlinux (loader.linux)
    multiboot  a multiboot v1 header in the first 8 KiB (checksum valid)
    elf64      any other ELF64 file (an ELF32 without a multiboot header is refused)
    flat       only a boot sector: exactly 512 bytes ending in 0x55 0xAA, as a BIOS boots

Anything else is refused, with why it is none of these, because a flat binary has no
signature: any file (a text file, a truncated kernel) would "run" as real-mode code.
`--format flat` runs any file as a flat binary.
"""

from __future__ import annotations

import importlib

from pyhv.errors import ImageError
from pyhv.loader import elf, multiboot
from pyhv.loader.image import BootRequest, LoadedGuest, read_file
from pyhv.memory import GuestMemory

FORMATS = ("auto", "flat", "multiboot", "elf64", "linux")
_MODULES = {"flat": "pyhv.loader.flat", "multiboot": "pyhv.loader.multiboot",
            "elf64": "pyhv.loader.elf64", "linux": "pyhv.loader.linux"}


BOOT_SECTOR_SIZE = 512
BOOT_SIGNATURE = b"\x55\xaa"


def is_boot_sector(data: bytes) -> bool:
    """Exactly 512 bytes ending in the 0x55 0xAA signature (what a PC BIOS boots)."""
    return len(data) == BOOT_SECTOR_SIZE and data[-2:] == BOOT_SIGNATURE


def detect_format(data: bytes, what: str = "the image") -> str:
    """The format of a kernel image, judged by content; ImageError saying why it is none
    of them when it is not recognised."""
    if len(data) >= 0x206 and data[0x202:0x206] == b"HdrS":
        return "linux"
    if multiboot.find_header(data) is not None:
        return "multiboot"
    if elf.is_elf(data):
        from pyhv.loader import linux  # noqa: PLC0415 (a vmlinux is ELF64 too)
        if linux.is_linux_elf(data):
            return "linux"
        if len(data) > 4 and data[4] == 2:
            return "elf64"
        raise ImageError("ELF32 image without a multiboot header: pyhv cannot tell how to "
                         "enter it (add a multiboot header, or use --format flat)")
    if is_boot_sector(data):
        return "flat"
    sector = ("its last two bytes are not 55 aa" if len(data) == BOOT_SECTOR_SIZE
              else f"it has {len(data)} bytes, not 512")
    raise ImageError(f"{what} is in no format pyhv recognises: not Linux (no bzImage 'HdrS' "
                     "header at 0x202, no vmlinux ELF), not multiboot (no multiboot v1 "
                     "header in its first 8 KiB), not ELF64 (no ELF header), not a boot "
                     f"sector ({sector}); use --format flat to run it as a flat real-mode "
                     "binary")


def load(mem: GuestMemory, req: BootRequest) -> LoadedGuest:
    data = read_file(req.kernel, "kernel")
    fmt = (detect_format(data, f"kernel {str(req.kernel)!r}") if req.format == "auto"
           else req.format)
    if fmt not in _MODULES:
        raise ImageError(f"unknown image format {fmt!r} (choose from {', '.join(FORMATS)})")
    module = importlib.import_module(_MODULES[fmt])
    result: LoadedGuest = module.load(mem, req, data)
    return result


__all__ = ["FORMATS", "BootRequest", "LoadedGuest", "detect_format", "is_boot_sector", "load",
           "read_file"]
