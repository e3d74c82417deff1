"""Kernel loaders: flat (real mode), multiboot v1 (32-bit), ELF64 (long mode), Linux.

`detect_format(data)` picks a loader by content; `load(mem, request)` validates the whole
image before writing it into guest memory and returns the entry state. Loaders know
guest memory and the x86 boot helpers, never an engine or a device.
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


def detect_format(data: bytes) -> str:
    """The format of a kernel image, judged by content."""
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
    return "flat"


def load(mem: GuestMemory, req: BootRequest) -> LoadedGuest:
    data = read_file(req.kernel, "kernel")
    fmt = detect_format(data) if req.format == "auto" else req.format
    if fmt not in _MODULES:
        raise ImageError(f"unknown image format {fmt!r} (choose from {', '.join(FORMATS)})")
    module = importlib.import_module(_MODULES[fmt])
    result: LoadedGuest = module.load(mem, req, data)
    return result


__all__ = ["FORMATS", "BootRequest", "LoadedGuest", "detect_format", "load", "read_file"]
