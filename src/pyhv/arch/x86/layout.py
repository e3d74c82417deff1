"""The guest-physical address map of a pyhv PC, in one place.

    0x0000_0000 +--------------------------------+
                | real-mode IVT, BIOS data area  |
    0x0000_0500 | boot GDT (BOOT_GDT)            |
    0x0000_1000 | boot IDT (BOOT_IDT, empty)     |
    0x0000_2000 | boot TSS                       |
    0x0000_6000 | multiboot info / pyhv bootinfo |
    0x0000_7000 | Linux boot_params (zero page)  |
    0x0000_7c00 | flat images load here (default)|
    0x0000_9000 | page tables (PML4, PDPT, PDs)  |  up to 0x1_0000 (enough for 4 GiB, 2M pages)
    0x0002_0000 | kernel command line            |
    0x0003_0000 | multiboot memory map, module list, strings
    0x0008_0000 | boot stack top (grows down)    |
    0x0009_fc00 | EBDA (reserved in e820)        |
    0x000a_0000 | VGA hole + BIOS ROM (reserved) |
    0x0010_0000 +--------------------------------+ 1 MiB: kernels load here and above
                | RAM ...                        |
    MMIO_START  +--------------------------------+ 3 GiB: PCI MMIO hole, IOAPIC, LAPIC
                | PCI memory BARs (PCI_MMIO_*)   |  pyhv assigns them from the bottom up
    0xfec0_0000 | IOAPIC                         |
    0xfee0_0000 | local APIC                     |
    4 GiB       +--------------------------------+
                | RAM above 4 GiB (if any)       |

RAM larger than MMIO_START is split around the hole. Every fixed structure pyhv places
lies below 1 MiB, in RAM every guest has (the minimum guest is 2 MiB).
"""

from __future__ import annotations

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30

BOOT_GDT = 0x500
BOOT_IDT = 0x1000
BOOT_TSS = 0x2000
BOOTINFO = 0x6000
ZERO_PAGE = 0x7000
FLAT_LOAD_ADDR = 0x7C00
PAGE_TABLES = 0x9000
PAGE_TABLES_END = 0x10000
CMDLINE = 0x20000
CMDLINE_MAX = 0x10000
BOOTINFO_EXTRA = 0x30000
BOOTINFO_EXTRA_END = 0x7F000
BOOT_STACK_TOP = 0x80000
EBDA_START = 0x9FC00
VGA_START = 0xA0000
HIGH_MEMORY = 0x100000

MMIO_START = 0xC000_0000
IOAPIC_BASE = 0xFEC0_0000
LAPIC_BASE = 0xFEE0_0000
HIGH_RAM_START = 0x1_0000_0000

MIN_RAM = 2 * MIB

# PCI (devices/pci): where pyhv, acting as the firmware, places BARs, and the ports of
# configuration mechanism #1. Memory BARs go in the MMIO hole below the IOAPIC; I/O BARs
# above every ISA port, where PC firmware puts them.
PCI_MMIO_START = MMIO_START
PCI_MMIO_END = IOAPIC_BASE
PCI_IO_START = 0xC000
PCI_IO_END = 0x10000
PCI_CONFIG_PORT = 0xCF8   # CONFIG_ADDRESS 0xcf8, CONFIG_DATA 0xcfc-0xcff

# I/O ports pyhv's own paravirtual devices claim (free on a PC; QEMU puts nothing there).
BOOT_TIMER_PORT = 0x440   # guest /init writes 123 here: pyhv timestamps boot (boottimer.py)


def ram_layout(size: int) -> list[tuple[int, int]]:
    """(gpa, size) of each RAM region for a guest with `size` bytes of RAM."""
    if size <= MMIO_START:
        return [(0, size)]
    return [(0, MMIO_START), (HIGH_RAM_START, size - MMIO_START)]


def e820_map(size: int) -> list[tuple[int, int, int]]:
    """(addr, length, type) entries: 1 = usable RAM, 2 = reserved. Sorted, disjoint."""
    usable, reserved = 1, 2
    entries = [(0, EBDA_START, usable), (EBDA_START, HIGH_MEMORY - EBDA_START, reserved)]
    for gpa, length in ram_layout(size):
        start = max(gpa, HIGH_MEMORY)
        if gpa + length > start:
            entries.append((start, gpa + length - start, usable))
    return entries
