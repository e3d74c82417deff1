"""ACPI tables pyhv builds in guest memory, as a PC's firmware would (ACPI 6.x spec).

    0xe0000  RSDP (revision 2: RSDT and XSDT addresses), in the BIOS area Linux scans
    0xe0040  FACS (64-byte aligned, no waking vector)
    0xe0080  DSDT: \\_S5 (SLP_TYP 5) and, when `pci` routes are given, \\_SB.PCI0 with
             a _PRT (see below); then RSDT, XSDT, FADT, MADT, each 16-byte aligned
    (0x9fc00-0x100000 is reserved in the e820 map, so no OS reuses it as RAM)

FADT (revision 3, 244 bytes): SCI on ISA IRQ 9; no SMI command port (the machine is
always in ACPI mode: PM1 control reads SCI_EN = 1); PM1a event block (4 bytes), PM1a
control block (2 bytes) and the 32-bit PM timer at the `PmPorts` given; no GPE blocks;
C2/C3 latencies "not supported"; the reset register (flag RESET_REG_SUP) in I/O space;
IAPC_BOOT_ARCH: legacy devices and an 8042 present (Linux then probes the i8042 without
PNP); the century byte at CMOS 0x32; flags WBINVD, PROC_C1, SLP_BUTTON (no sleep
button), TMR_VAL_EXT (32-bit timer), RESET_REG_SUP; PWR_BUTTON clear: the power button
is the fixed-feature one (PM1 PWRBTN_STS/EN, devices/acpipm.py), which the control API's
shutdown presses (pyhv.vmcontrol).

MADT: the local APIC address, PCAT_COMPAT (an 8259 pair is present), one processor
local APIC entry per vCPU (UID = APIC ID = index, enabled), the I/O APIC (GSI base 0),
the PC's interrupt source overrides (ISA IRQ 0 -> GSI 2; IRQ 9, the SCI, level and
active high, as QEMU's PC) and an NMI on every processor's LINT1.

DSDT, hand-written AML (ACPI spec chapter 20): `Name(\\_S5, Package(4){5, 5, 0, 0})`,
the SLP_TYP values OSPM writes to PM1a_CNT to power off. PCI interrupt routing (for the
PCI devices of the virtio work, issue 11's note): `pci_routes` maps (slot, pin) to a GSI
and adds `Device(\\_SB.PCI0){_HID PNP0A03, _UID 0, _BBN 0, _CRS, _PRT}`: _CRS gives bus
0-255, I/O 0-0xcf7 and 0xd00-0xffff, the VGA window and the MMIO hole where pyhv places
BARs; _PRT has one static Package{address (slot << 16 | 0xffff), pin, 0, GSI} per
route, which Linux reads with the I/O APIC on (docs/apic.md: "PCI interrupt routes").

Invariants: every table's checksum makes its bytes sum to 0 mod 256; the RSDP's first
20 bytes and all 36 each sum to 0; nothing here reads guest memory back (a guest that
overwrites its tables only misleads itself).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pyhv.arch.x86 import layout
from pyhv.memory import GuestMemory

RSDP_ADDR = 0xE0000
FACS_ADDR = 0xE0040
TABLES_ADDR = 0xE0080
TABLES_END = 0xF0000          # the MP table starts here (mptable.py)

OEM_ID = b"PYHV  "
OEM_TABLE_ID = b"PYHVMACH"
CREATOR_ID = b"PYHV"

FADT_FLAGS = (1 << 0) | (1 << 2) | (1 << 5) | (1 << 8) | (1 << 10)
S5_SLP_TYP = 5


@dataclass(frozen=True)
class PmPorts:
    """Where the PM1 blocks, the PM timer and the reset register are (port I/O)."""

    pm1a_evt: int = 0x600
    pm1a_cnt: int = 0x604
    pm_tmr: int = 0x608
    reset: int = 0x60C
    reset_value: int = 0x01
    sci_irq: int = 9


@dataclass(frozen=True)
class AcpiConfig:
    n_cpus: int
    ioapic_id: int
    ioapic_addr: int = 0xFEC00000
    lapic_addr: int = 0xFEE00000
    pm: PmPorts = field(default_factory=PmPorts)
    # (PCI slot, INTx pin 0..3) -> GSI: the _PRT of \_SB.PCI0 (empty: no PCI0 device)
    pci_routes: dict[tuple[int, int], int] = field(default_factory=dict)
    pci_mmio: tuple[int, int] = (layout.PCI_MMIO_START, layout.PCI_MMIO_END)


def checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: the 36-byte header + body, checksummed."""
    length = 36 + len(body)
    hdr = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID,
                      OEM_TABLE_ID, 1, CREATOR_ID, 1)
    raw = bytearray(hdr + body)
    raw[9] = checksum(bytes(raw))
    return bytes(raw)


# ---------------------------------------------------------------------- AML

def _pkg_length(n: int) -> bytes:
    """PkgLength encoding of a body of n bytes (the length counts itself)."""
    if n + 1 < 0x40:
        return bytes([n + 1])
    for extra in (1, 2, 3):
        total = n + 1 + extra
        if total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0xF)]
            rest = total >> 4
            for _ in range(extra):
                out.append(rest & 0xFF)
                rest >>= 8
            return bytes(out)
    raise ValueError("AML package too long")


def aml_int(v: int) -> bytes:
    if v == 0:
        return b"\x00"
    if v == 1:
        return b"\x01"
    if v <= 0xFF:
        return b"\x0a" + bytes([v])
    if v <= 0xFFFF:
        return b"\x0b" + struct.pack("<H", v)
    if v <= 0xFFFFFFFF:
        return b"\x0c" + struct.pack("<I", v)
    return b"\x0e" + struct.pack("<Q", v)


def aml_package(items: list[bytes]) -> bytes:
    body = bytes([len(items)]) + b"".join(items)
    return b"\x12" + _pkg_length(len(body)) + body


def aml_name(name: bytes, value: bytes) -> bytes:
    return b"\x08" + name + value


def aml_eisa_id(text: str) -> bytes:
    """EISAID("PNP0A03") as its 32-bit compressed form."""
    c = [ord(ch) - 0x40 for ch in text[:3]]
    v = (c[0] << 26) | (c[1] << 21) | (c[2] << 16) | int(text[3:], 16)
    return aml_int(int.from_bytes(v.to_bytes(4, "big"), "little"))


def aml_device(name: bytes, body: bytes) -> bytes:
    inner = name + body
    return b"\x5b\x82" + _pkg_length(len(inner)) + inner


def aml_scope(name: bytes, body: bytes) -> bytes:
    inner = name + body
    return b"\x10" + _pkg_length(len(inner)) + inner


def aml_buffer(data: bytes) -> bytes:
    body = aml_int(len(data)) + data
    return b"\x11" + _pkg_length(len(body)) + body


def word_space(kind: int, type_flags: int, lo: int, hi: int) -> bytes:
    """Word Address Space Descriptor (ACPI 6.4.3.5.3), a producer with fixed bounds."""
    return struct.pack("<BHBBBHHHHH", 0x88, 13, kind, 0x0C, type_flags, 0, lo, hi, 0,
                       hi - lo + 1)


def dword_memory(lo: int, hi: int) -> bytes:
    """DWord Address Space Descriptor (6.4.3.5.2): cacheable read-write memory window."""
    return struct.pack("<BHBBBIIIII", 0x87, 23, 0, 0x0C, 0x03, 0, lo, hi, 0, hi - lo + 1)


def pci0_crs(cfg: AcpiConfig) -> bytes:
    """PCI0's _CRS: bus 0-255, I/O around the configuration ports, the VGA window and
    the MMIO hole where pyhv places BARs."""
    res = (word_space(2, 0, 0, 0xFF)
           + word_space(1, 0x03, 0x0000, 0x0CF7)
           + word_space(1, 0x03, 0x0D00, 0xFFFF)
           + dword_memory(0xA0000, 0xBFFFF)
           + dword_memory(cfg.pci_mmio[0], cfg.pci_mmio[1] - 1)
           + b"\x79\x00")                                 # end tag
    return aml_buffer(res)


def dsdt_aml(cfg: AcpiConfig) -> bytes:
    aml = aml_name(b"\\_S5_", aml_package([aml_int(S5_SLP_TYP), aml_int(S5_SLP_TYP),
                                             aml_int(0), aml_int(0)]))
    if cfg.pci_routes:
        prt = aml_package([aml_package([aml_int((slot << 16) | 0xFFFF), aml_int(pin),
                                        aml_int(0), aml_int(gsi)])
                           for (slot, pin), gsi in sorted(cfg.pci_routes.items())])
        pci0 = aml_device(b"PCI0", aml_name(b"_HID", aml_eisa_id("PNP0A03"))
                          + aml_name(b"_UID", aml_int(0)) + aml_name(b"_BBN", aml_int(0))
                          + aml_name(b"_CRS", pci0_crs(cfg)) + aml_name(b"_PRT", prt))
        aml += aml_scope(b"\\_SB_", pci0)
    return aml


# ---------------------------------------------------------------------- tables

def gas_io(addr: int, width_bits: int) -> bytes:
    """A Generic Address Structure in system I/O space."""
    access = {8: 1, 16: 2, 32: 3}[width_bits]
    return struct.pack("<BBBBQ", 1, width_bits, 0, access, addr)


def fadt(cfg: AcpiConfig, facs: int, dsdt: int) -> bytes:
    pm = cfg.pm
    body = bytearray(244 - 36)

    def put(off: int, fmt: str, *v: int) -> None:
        struct.pack_into(fmt, body, off - 36, *v)

    put(36, "<II", facs, dsdt)
    put(45, "<BH", 0, pm.sci_irq)          # profile unspecified, SCI_INT
    put(48, "<IBBBB", 0, 0, 0, 0, 0)       # no SMI_CMD: always in ACPI mode
    put(56, "<IIIIIIII", pm.pm1a_evt, 0, pm.pm1a_cnt, 0, 0, pm.pm_tmr, 0, 0)
    put(88, "<BBBBBBBB", 4, 2, 0, 4, 0, 0, 0, 0)
    put(96, "<HHHH", 0x0FFF, 0x0FFF, 0, 0)     # C2 / C3 not supported
    put(104, "<BBBBB", 0, 0, 0, 0, 0x32)       # century at CMOS 0x32
    put(109, "<H", 0x0003)                     # legacy devices, 8042
    put(112, "<I", FADT_FLAGS)
    body[116 - 36:128 - 36] = gas_io(pm.reset, 8)
    put(128, "<B", pm.reset_value)
    put(132, "<QQ", facs, dsdt)                # X_FIRMWARE_CTRL, X_DSDT
    body[148 - 36:160 - 36] = gas_io(pm.pm1a_evt, 32)
    body[172 - 36:184 - 36] = gas_io(pm.pm1a_cnt, 16)
    body[208 - 36:220 - 36] = gas_io(pm.pm_tmr, 32)
    return sdt(b"FACP", 3, bytes(body))


def madt(cfg: AcpiConfig) -> bytes:
    body = struct.pack("<II", cfg.lapic_addr, 1)          # PCAT_COMPAT
    for i in range(cfg.n_cpus):
        body += struct.pack("<BBBBI", 0, 8, i, i, 1)       # processor local APIC
    body += struct.pack("<BBBBII", 1, 12, cfg.ioapic_id, 0, cfg.ioapic_addr, 0)
    body += struct.pack("<BBBBIH", 2, 10, 0, 0, 2, 0)      # ISA IRQ 0 -> GSI 2
    body += struct.pack("<BBBBIH", 2, 10, 0, cfg.pm.sci_irq, cfg.pm.sci_irq,
                        0x000D)                            # SCI: level, active high
    body += struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)        # NMI on LINT1, all CPUs
    return sdt(b"APIC", 3, body)


def facs_table() -> bytes:
    # signature, length, hardware signature, waking vector, global lock, flags,
    # X waking vector, version 2; the rest reserved
    return struct.pack("<4sIIIIIQB", b"FACS", 64, 0, 0, 0, 0, 0, 2).ljust(64, b"\0")


def rsdp(rsdt: int, xsdt: int) -> bytes:
    raw = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, rsdt, 36,
                                xsdt, 0))
    raw[8] = checksum(bytes(raw[:20]))
    raw[32] = checksum(bytes(raw))
    return bytes(raw)


def _align(n: int, a: int = 16) -> int:
    return (n + a - 1) & ~(a - 1)


def build(cfg: AcpiConfig) -> dict[int, bytes]:
    """Every table at its guest-physical address."""
    out: dict[int, bytes] = {FACS_ADDR: facs_table()}
    addr = TABLES_ADDR
    dsdt_addr = addr
    out[dsdt_addr] = sdt(b"DSDT", 2, dsdt_aml(cfg))
    addr = _align(addr + len(out[dsdt_addr]))
    fadt_addr = addr
    out[fadt_addr] = fadt(cfg, FACS_ADDR, dsdt_addr)
    addr = _align(addr + len(out[fadt_addr]))
    madt_addr = addr
    out[madt_addr] = madt(cfg)
    addr = _align(addr + len(out[madt_addr]))
    rsdt_addr = addr
    out[rsdt_addr] = sdt(b"RSDT", 1, struct.pack("<II", fadt_addr, madt_addr))
    addr = _align(addr + len(out[rsdt_addr]))
    xsdt_addr = addr
    out[xsdt_addr] = sdt(b"XSDT", 1, struct.pack("<QQ", fadt_addr, madt_addr))
    addr = _align(addr + len(out[xsdt_addr]))
    if addr > TABLES_END:
        raise ValueError("ACPI tables do not fit below the MP table")
    out[RSDP_ADDR] = rsdp(rsdt_addr, xsdt_addr)
    return out


def install(mem: GuestMemory, cfg: AcpiConfig) -> None:
    for addr, data in build(cfg).items():
        mem.write(addr, data)
