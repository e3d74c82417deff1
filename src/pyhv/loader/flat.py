"""Flat binaries: raw bytes loaded at one address and started in 16-bit real mode.

The image is copied to `load_addr` (default 0x7c00, where a BIOS puts a boot sector) and
entered at its first byte with CS:IP = 0:load_addr (or load_addr/16:0 when the address
does not fit in 16 bits), SS:SP = 0:0x7c00, DL = 0x80, interrupts off. The image must
fit below the VGA hole at 0xA0000 (real-mode code cannot address more without help).
"""

from __future__ import annotations

from pyhv.arch.x86 import boot, layout
from pyhv.errors import ImageError
from pyhv.loader.image import BootRequest, LoadedGuest, check_place, read_file
from pyhv.memory import GuestMemory


def load(mem: GuestMemory, req: BootRequest, data: bytes | None = None) -> LoadedGuest:
    data = data if data is not None else read_file(req.kernel, "kernel")
    addr = layout.FLAT_LOAD_ADDR if req.load_addr is None else req.load_addr
    if addr < 0x500 or addr + len(data) > layout.VGA_START:
        raise ImageError(f"flat image of {len(data)} bytes at {addr:#x} does not fit between "
                         f"0x500 and {layout.VGA_START:#x}")
    if req.initrd is not None:
        raise ImageError("flat images take no --initrd")
    check_place(mem, addr, len(data), "flat image")
    mem.write(addr, data)
    cs, ip = (0, addr) if addr < 0x10000 else (addr >> 4, addr & 0xF)
    st = boot.real_mode(cs, ip)
    return LoadedGuest("flat", st, f"flat binary at {addr:#x} ({len(data)} bytes), real mode",
                       [(addr, addr + len(data))])
