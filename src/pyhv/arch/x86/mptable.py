"""The Intel MultiProcessor Specification 1.4 table, for guests without ACPI (`acpi=off`).

    0xf0000  MP floating pointer "_MP_" (16 bytes, in the BIOS area Linux scans):
             physical address of the configuration table, spec revision 4, feature
             byte 1 = 0 (a configuration table is present), byte 2 IMCRP = 0 (virtual
             wire mode: the 8259 reaches the BSP through its local APIC's LINT0)
    0xf0010  "PCMP" configuration table: local APIC address, then entries sorted by
             type (MP spec 4.3):
               processor      one per vCPU (APIC ID = index, version 0x14; the BSP flag
                              on CPU 0), CPUID signature and feature flags
               bus            0: "ISA   "; with `pci_routes`, 1: "PCI   "
               I/O APIC       its ID, version 0x20, enabled, 0xfec00000
               I/O interrupt  ISA IRQ 0 -> INTIN 2; IRQ 1, 3..15 -> INTIN n
                              (conforming polarity/trigger: ISA edge, active high);
                              PCI: bus 1, source (slot << 2 | pin) -> the route's
                              INTIN, level, active low (MP spec 4.3.4 / Table 4-12)
               local interrupt ExtINT -> LINT0 and NMI -> LINT1 of every local APIC

Invariants: both structures checksum to 0; the configuration table fits below 0xf1000.
"""

from __future__ import annotations

import struct

from pyhv.memory import GuestMemory

MP_FLOAT_ADDR = 0xF0000
MP_CONFIG_ADDR = 0xF0010
MP_CONFIG_END = 0xF1000
ISA_BUS, PCI_BUS = 0, 1
INT_ASSERT_LEVEL_LOW = 0x000F      # PCI INTx: active low (11), level (11 << 2)


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def config_table(n_cpus: int, ioapic_id: int, *, cpu_signature: int, cpu_features: int,
                 pci_routes: dict[tuple[int, int], int] | None = None,
                 ioapic_addr: int = 0xFEC00000, lapic_addr: int = 0xFEE00000) -> bytes:
    entries: list[bytes] = []
    for i in range(n_cpus):
        flags = 1 | (2 if i == 0 else 0)                      # enabled, BSP
        entries.append(struct.pack("<BBBBII8x", 0, i, 0x14, flags, cpu_signature,
                                   cpu_features))
    entries.append(struct.pack("<BB6s", 1, ISA_BUS, b"ISA   "))
    if pci_routes:
        entries.append(struct.pack("<BB6s", 1, PCI_BUS, b"PCI   "))
    entries.append(struct.pack("<BBBBI", 2, ioapic_id, 0x20, 1, ioapic_addr))
    for irq in (0, 1, *range(3, 16)):
        intin = 2 if irq == 0 else irq
        entries.append(struct.pack("<BBHBBBB", 3, 0, 0, ISA_BUS, irq, ioapic_id, intin))
    for (slot, pin), gsi in sorted((pci_routes or {}).items()):
        entries.append(struct.pack("<BBHBBBB", 3, 0, INT_ASSERT_LEVEL_LOW, PCI_BUS,
                                   (slot << 2) | pin, ioapic_id, gsi))
    entries.append(struct.pack("<BBHBBBB", 4, 3, 0, ISA_BUS, 0, 0xFF, 0))   # ExtINT LINT0
    entries.append(struct.pack("<BBHBBBB", 4, 1, 0, ISA_BUS, 0, 0xFF, 1))   # NMI LINT1
    body = b"".join(entries)
    length = 44 + len(body)
    hdr = bytearray(struct.pack("<4sHBB8s12sIHHIHBx", b"PCMP", length, 4, 0, b"PYHV    ",
                                b"PYHV MACHINE", 0, 0, len(entries), lapic_addr, 0, 0))
    raw = bytearray(hdr + body)
    raw[7] = _checksum(bytes(raw))
    return bytes(raw)


def floating_pointer(config_addr: int) -> bytes:
    raw = bytearray(struct.pack("<4sIBBBBBBBB", b"_MP_", config_addr, 1, 4, 0, 0, 0, 0, 0,
                                0))
    raw[10] = _checksum(bytes(raw))
    return bytes(raw)


def install(mem: GuestMemory, n_cpus: int, ioapic_id: int, *, cpu_signature: int,
            cpu_features: int, pci_routes: dict[tuple[int, int], int] | None = None
            ) -> None:
    table = config_table(n_cpus, ioapic_id, cpu_signature=cpu_signature,
                         cpu_features=cpu_features, pci_routes=pci_routes)
    if MP_CONFIG_ADDR + len(table) > MP_CONFIG_END:
        raise ValueError("MP configuration table too long")
    mem.write(MP_FLOAT_ADDR, floating_pointer(MP_CONFIG_ADDR))
    mem.write(MP_CONFIG_ADDR, table)
