"""Initial CPU states for the three ways a guest can be entered, and the tables they need.

Every loader ends by asking for one of these states; the machine hands it to the engine
unchanged, so the same entry works on KVM and on the software CPU.

- `real_mode(cs, ip)`: 16-bit real mode, as a BIOS leaves a boot sector.
- `protected_mode(mem, entry)`: 32-bit flat protected mode, paging off (multiboot).
- `long_mode(mem, entry)`: 64-bit mode with identity-mapped paging (ELF64, Linux).

The boot GDT (at layout.BOOT_GDT) is shared by all of them:

    0x00 null    0x08 code32 flat    0x10 code64    0x18 data flat    0x20 TSS (16 bytes)

(0x10/0x18 are also what Linux's 64-bit boot protocol expects as __BOOT_CS/__BOOT_DS.)
"""

from __future__ import annotations

from pyhv.arch.x86 import gdt, layout, paging
from pyhv.arch.x86.cpustate import (
    CR0_ET,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR4_OSFXSR,
    CR4_OSXMMEXCPT,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    RFLAGS_FIXED,
    CpuState,
    DescriptorTable,
    Segment,
)
from pyhv.memory import GuestMemory

SEL_CODE32, SEL_CODE64, SEL_DATA, SEL_TSS = 0x08, 0x10, 0x18, 0x20
TSS_LIMIT = 0x67


def _segments() -> tuple[Segment, Segment, Segment, Segment]:
    code32 = Segment.flat(SEL_CODE32, code=True, bits=32)
    code64 = Segment.flat(SEL_CODE64, code=True, bits=64)
    data = Segment.flat(SEL_DATA, code=False, bits=32)
    tss = Segment.system(SEL_TSS, layout.BOOT_TSS, TSS_LIMIT, 0xB)
    return code32, code64, data, tss


def write_boot_gdt(mem: GuestMemory) -> DescriptorTable:
    """Write the boot GDT and an empty TSS; return GDTR."""
    code32, code64, data, tss = _segments()
    image = gdt.table([None, code32, code64, data, tss, None])
    mem.write(layout.BOOT_GDT, image)
    mem.fill(layout.BOOT_TSS, TSS_LIMIT + 1)
    return DescriptorTable(layout.BOOT_GDT, len(image) - 1)


def real_mode(cs: int, ip: int, *, ss: int = 0, sp: int = 0x7C00) -> CpuState:
    st = CpuState()
    st.cs = Segment.real_mode(cs, code=True)
    for name in ("ds", "es", "fs", "gs"):
        setattr(st, name, Segment.real_mode(0))
    st.ss = Segment.real_mode(ss)
    st.rip, st.rsp = ip, sp
    st.rdx = 0x80  # BIOS convention: boot drive in DL
    st.cr0 = CR0_ET
    st.idt = DescriptorTable(0, 0x3FF)
    return st


def protected_mode(mem: GuestMemory, entry: int, *, stack: int = layout.BOOT_STACK_TOP
                   ) -> CpuState:
    """32-bit flat protected mode, paging off, interrupts off (multiboot's machine state)."""
    code32, _, data, tss = _segments()
    st = CpuState()
    st.gdt = write_boot_gdt(mem)
    st.idt = DescriptorTable(layout.BOOT_IDT, 0)
    st.cs = code32
    st.ds, st.es, st.fs, st.gs, st.ss = (Segment.flat(SEL_DATA, code=False, bits=32)
                                         for _ in range(5))
    _ = data
    st.tr = tss
    st.cr0 = CR0_PE | CR0_ET | CR0_NE
    st.rip, st.rsp, st.rflags = entry, stack, RFLAGS_FIXED
    return st


def long_mode(mem: GuestMemory, entry: int, *, stack: int = layout.BOOT_STACK_TOP,
              span: int = 4 << 30, user_pages: bool = False) -> CpuState:
    """64-bit mode: identity paging for the first `span` bytes, SSE enabled."""
    _, code64, _, tss = _segments()
    st = CpuState()
    st.gdt = write_boot_gdt(mem)
    st.idt = DescriptorTable(layout.BOOT_IDT, 0)
    cr3, tables = paging.identity_tables(span, user=user_pages)
    mem.write(layout.PAGE_TABLES, tables)
    st.cs = code64
    st.ds, st.es, st.fs, st.gs, st.ss = (Segment.flat(SEL_DATA, code=False, bits=32)
                                         for _ in range(5))
    st.tr = tss
    st.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG
    st.cr3 = cr3
    st.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    st.efer = EFER_LME | EFER_LMA
    st.rip, st.rsp, st.rflags = entry, stack, RFLAGS_FIXED
    return st
