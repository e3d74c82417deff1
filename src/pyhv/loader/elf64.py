"""ELF64 kernels entered directly in 64-bit long mode.

PT_LOAD segments go to their physical addresses (p_paddr; p_vaddr when p_paddr is 0).
The entry runs with identity paging over the first 4 GiB (2 MiB pages), the boot GDT's
64-bit code segment, RSP at the boot stack, interrupts off, and RDI = the physical
address of a multiboot-format information structure (cmdline, memory map, initrd as
module 0), so a 64-bit test kernel gets the same facts a multiboot one does.
"""

from __future__ import annotations

from pyhv.arch.x86 import boot
from pyhv.errors import ImageError
from pyhv.loader import elf
from pyhv.loader.image import BootRequest, LoadedGuest, check_place, read_file
from pyhv.loader.multiboot import LOW_RESERVED, plan_info, write_info
from pyhv.memory import GuestMemory


def load(mem: GuestMemory, req: BootRequest, data: bytes | None = None) -> LoadedGuest:
    data = data if data is not None else read_file(req.kernel, "kernel")
    image = elf.parse(data, str(req.kernel))
    if image.bits != 64:
        raise ImageError(f"{req.kernel}: not an ELF64 image")
    # Everything is checked before the first write: a refused image leaves memory untouched.
    extents: list[tuple[int, int]] = []
    for seg in image.segments:
        check_place(mem, seg.paddr or seg.vaddr, seg.memsz, "kernel segment", LOW_RESERVED)
    entry = image.entry
    if entry >= 4 << 30:
        raise ImageError(f"{req.kernel}: entry {entry:#x} is above the 4 GiB identity map")
    kernel_end = max((seg.paddr or seg.vaddr) + seg.memsz for seg in image.segments)
    plan = plan_info(mem, req, kernel_end=kernel_end, page_align_modules=True)
    for seg in image.segments:
        addr = seg.paddr or seg.vaddr
        mem.write(addr, data[seg.offset:seg.offset + seg.filesz])
        mem.fill(addr + seg.filesz, seg.memsz - seg.filesz)
        extents.append((addr, addr + seg.memsz))
    info = write_info(mem, req, kernel_end=kernel_end, page_align_modules=True,
                      extents=extents, plan=plan)
    st = boot.long_mode(mem, entry)
    st.rdi = info
    return LoadedGuest("elf64", st, f"ELF64 kernel, entry {entry:#x}, long mode", extents)
