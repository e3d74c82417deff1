"""ACPI tables and the MP table as pyhv writes them into guest memory, read back with an
independent parser written from the specs (ACPI 6.x chapter 5, MP spec 1.4 chapter 4):
signatures, checksums, pointers, FADT fields, MADT entries, the DSDT's AML for \\_S5 and
the PCI _PRT, the MP table's entries. (iasl/acpidump are not installed on this host;
Debian's kernel, which parses all of them with ACPICA, is the other check:
tests/linux/test_linux_run.py.)"""

from __future__ import annotations

import struct

import pytest

from pyhv.arch.x86 import acpi, layout, mptable
from pyhv.memory import GuestMemory


@pytest.fixture
def mem() -> GuestMemory:
    m = GuestMemory.with_layout(layout.ram_layout(4 << 20))
    yield m
    m.close()


def find_rsdp(mem: GuestMemory) -> int:
    for addr in range(0xE0000, 0x100000, 16):
        if mem.read(addr, 8) == b"RSD PTR ":
            return addr
    raise AssertionError("no RSDP in 0xe0000-0xfffff")


def table(mem: GuestMemory, addr: int) -> tuple[bytes, bytes]:
    sig, length = struct.unpack("<4sI", mem.read(addr, 8))
    raw = mem.read(addr, length)
    assert sum(raw) % 256 == 0, f"{sig!r} checksum"
    return sig, raw


def aml_pkglen(data: bytes, i: int) -> tuple[int, int]:
    """(package length, bytes of the encoding) at data[i]."""
    lead = data[i]
    extra = lead >> 6
    if not extra:
        return lead & 0x3F, 1
    n = lead & 0xF
    for k in range(extra):
        n |= data[i + 1 + k] << (4 + 8 * k)
    return n, 1 + extra


def aml_value(data: bytes, i: int) -> tuple[object, int]:
    op = data[i]
    if op in (0, 1):
        return op, i + 1
    if op == 0x0A:
        return data[i + 1], i + 2
    if op == 0x0B:
        return struct.unpack_from("<H", data, i + 1)[0], i + 3
    if op == 0x0C:
        return struct.unpack_from("<I", data, i + 1)[0], i + 5
    if op == 0x11:                               # Buffer: size, then the bytes
        length, enc = aml_pkglen(data, i + 1)
        end = i + 1 + length
        size, j = aml_value(data, i + 1 + enc)
        assert isinstance(size, int) and j + size == end, "buffer length mismatch"
        return data[j:end], end
    if op == 0x12:
        length, enc = aml_pkglen(data, i + 1)
        end = i + 1 + length
        count = data[i + 1 + enc]
        j = i + 2 + enc
        items = []
        for _ in range(count):
            v, j = aml_value(data, j)
            items.append(v)
        assert j == end, "package length mismatch"
        return items, end
    raise AssertionError(f"unexpected AML opcode {op:#x} at {i}")


def aml_names(data: bytes) -> dict[str, object]:
    """NameOp objects in the AML, by path (Scope and Device bodies walked)."""
    out: dict[str, object] = {}

    def walk(i: int, end: int, prefix: str) -> None:
        while i < end:
            op = data[i]
            if op == 0x08:
                j = i + 1
                root = data[j] == 0x5C
                j += root
                name = data[j:j + 4].decode()
                v, i = aml_value(data, j + 4)
                out[("\\" if root else prefix) + name] = v
            elif op == 0x10 or (op == 0x5B and data[i + 1] == 0x82):
                start = i + (2 if op == 0x5B else 1)
                length, _enc = aml_pkglen(data, start)
                body_end = start + length
                j = start + _enc
                root = data[j] == 0x5C
                j += root
                name = data[j:j + 4].decode()
                walk(j + 4, body_end, ("\\" if root else prefix) + name + ".")
                i = body_end
            else:
                raise AssertionError(f"unexpected AML opcode {op:#x} at {i}")

    walk(0, len(data), "\\")
    return out


@pytest.mark.parametrize("n_cpus", [1, 4, 16])
def test_acpi_tables(mem: GuestMemory, n_cpus: int) -> None:
    pm = acpi.PmPorts()
    acpi.install(mem, acpi.AcpiConfig(n_cpus=n_cpus, ioapic_id=n_cpus))
    r = find_rsdp(mem)
    raw = mem.read(r, 36)
    assert sum(raw[:20]) % 256 == 0 and sum(raw) % 256 == 0
    sig, _ck, oem, rev, rsdt, length, xsdt = struct.unpack_from("<8sB6sBIIQ", raw)
    assert (rev, length) == (2, 36)
    sig, rsdt_raw = table(mem, rsdt)
    assert sig == b"RSDT"
    sig, xsdt_raw = table(mem, xsdt)
    assert sig == b"XSDT"
    ptrs32 = struct.unpack_from(f"<{(len(rsdt_raw) - 36) // 4}I", rsdt_raw, 36)
    ptrs64 = struct.unpack_from(f"<{(len(xsdt_raw) - 36) // 8}Q", xsdt_raw, 36)
    assert list(ptrs32) == list(ptrs64)
    tables = dict(table(mem, p) for p in ptrs64)
    assert set(tables) == {b"FACP", b"APIC"}

    fadt = tables[b"FACP"]
    assert len(fadt) == 244 and fadt[8] == 3
    facs, dsdt = struct.unpack_from("<II", fadt, 36)
    assert struct.unpack_from("<QQ", fadt, 132) == (facs, dsdt)
    assert mem.read(facs, 4) == b"FACS" and facs % 64 == 0
    assert struct.unpack_from("<H", fadt, 46)[0] == pm.sci_irq
    assert struct.unpack_from("<I", fadt, 48)[0] == 0           # no SMI_CMD
    evt, _, cnt, _, _, tmr = struct.unpack_from("<6I", fadt, 56)
    assert (evt, cnt, tmr) == (pm.pm1a_evt, pm.pm1a_cnt, pm.pm_tmr)
    assert tuple(fadt[88:92]) == (4, 2, 0, 4)
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & (1 << 10) and flags & (1 << 8)                # RESET_REG_SUP, TMR_VAL_EXT
    assert not flags & (1 << 4)        # PWR_BUTTON clear: the fixed-feature power button
    space, width, _off, _acc, addr = struct.unpack_from("<BBBBQ", fadt, 116)
    assert (space, width, addr, fadt[128]) == (1, 8, pm.reset, pm.reset_value)
    assert struct.unpack_from("<H", fadt, 109)[0] & 2            # 8042 present

    madt = tables[b"APIC"]
    lapic_addr, mflags = struct.unpack_from("<II", madt, 36)
    assert (lapic_addr, mflags & 1) == (0xFEE00000, 1)
    entries: list[tuple[int, bytes]] = []
    i = 44
    while i < len(madt):
        kind, ln = madt[i], madt[i + 1]
        entries.append((kind, madt[i:i + ln]))
        i += ln
    assert i == len(madt)
    cpus = [struct.unpack("<BBBBI", e) for k, e in entries if k == 0]
    assert [(c[2], c[3], c[4]) for c in cpus] == [(n, n, 1) for n in range(n_cpus)]
    ioapics = [struct.unpack("<BBBBII", e) for k, e in entries if k == 1]
    assert ioapics == [(1, 12, n_cpus, 0, 0xFEC00000, 0)]
    overrides = {e[3]: struct.unpack_from("<IH", e, 4) for k, e in entries if k == 2}
    assert overrides == {0: (2, 0), 9: (9, 0xD)}
    assert [e for k, e in entries if k == 4] == [bytes([4, 6, 0xFF, 0, 0, 1])]

    sig, dsdt_raw = table(mem, dsdt)
    assert sig == b"DSDT"
    names = aml_names(dsdt_raw[36:])
    assert names == {"\\_S5_": [5, 5, 0, 0]}


def test_dsdt_pci_routing_table(mem: GuestMemory) -> None:
    routes = {(1, 0): 16, (1, 1): 17, (2, 0): 17, (3, 3): 19}
    acpi.install(mem, acpi.AcpiConfig(n_cpus=2, ioapic_id=2, pci_routes=routes))
    rsdt = struct.unpack_from("<I", mem.read(find_rsdp(mem), 20), 16)[0]
    fadt_addr = struct.unpack_from("<I", mem.read(rsdt, 40), 36)[0]     # its first entry
    assert mem.read(fadt_addr, 4) == b"FACP"
    dsdt = struct.unpack_from("<I", mem.read(fadt_addr, 44), 40)[0]
    _s, raw = table(mem, dsdt)
    names = aml_names(raw[36:])
    assert names["\\_SB_.PCI0._HID"] == 0x030AD041              # EISAID("PNP0A03")
    assert names["\\_SB_.PCI0._BBN"] == 0
    prt = names["\\_SB_.PCI0._PRT"]
    assert prt == [[(slot << 16) | 0xFFFF, pin, 0, gsi]
                   for (slot, pin), gsi in sorted(routes.items())]
    crs = names["\\_SB_.PCI0._CRS"]
    assert isinstance(crs, bytes)
    windows = []
    i = 0
    while crs[i] != 0x79:                         # large descriptors up to the end tag
        kind, length = crs[i], struct.unpack_from("<H", crs, i + 1)[0]
        if kind == 0x88:
            rtype, _g, _t, _gran, lo, hi, _tra, ln = struct.unpack_from("<BBBHHHHH", crs, i + 3)
        else:
            assert kind == 0x87
            rtype, _g, _t, _gran, lo, hi, _tra, ln = struct.unpack_from("<BBBIIIII", crs, i + 3)
        assert ln == hi - lo + 1
        windows.append((rtype, lo, hi))
        i += 3 + length
    assert crs[i:] == b"\x79\x00"
    assert windows == [(2, 0, 0xFF), (1, 0, 0xCF7), (1, 0xD00, 0xFFFF), (0, 0xA0000, 0xBFFFF),
                       (0, layout.PCI_MMIO_START, layout.PCI_MMIO_END - 1)]


def test_mp_table(mem: GuestMemory) -> None:
    mptable.install(mem, 4, 4, cpu_signature=0x663, cpu_features=0x1234,
                    pci_routes={(1, 0): 16})
    addr = next(a for a in range(0xF0000, 0x100000, 16) if mem.read(a, 4) == b"_MP_")
    fp = mem.read(addr, 16)
    assert sum(fp) % 256 == 0 and fp[8] == 1 and fp[9] == 4 and fp[11] == 0
    cfg = struct.unpack_from("<I", fp, 4)[0]
    sig, length, rev = struct.unpack_from("<4sHB", mem.read(cfg, 7))
    raw = mem.read(cfg, length)
    assert sig == b"PCMP" and rev == 4 and sum(raw) % 256 == 0
    count, lapic = struct.unpack_from("<HI", raw, 34)
    assert lapic == 0xFEE00000
    sizes = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}
    i, entries = 44, []
    for _ in range(count):
        kind = raw[i]
        entries.append(raw[i:i + sizes[kind]])
        i += sizes[kind]
    assert i == length
    assert [e[0] for e in entries] == sorted(e[0] for e in entries)   # sorted by type
    cpus = [e for e in entries if e[0] == 0]
    assert [(e[1], e[3]) for e in cpus] == [(0, 3), (1, 1), (2, 1), (3, 1)]
    buses = [e[2:8] for e in entries if e[0] == 1]
    assert buses == [b"ISA   ", b"PCI   "]
    assert [e for e in entries if e[0] == 2] == [bytes([2, 4, 0x20, 1]) + b"\0\0\xc0\xfe"]
    ints = {(e[4], e[5]): (e[6], e[7], struct.unpack_from("<H", e, 2)[0])
            for e in entries if e[0] == 3}
    assert ints[(0, 0)] == (4, 2, 0) and ints[(0, 1)] == (4, 1, 0)
    assert (0, 2) not in ints
    assert ints[(1, 1 << 2 | 0)] == (4, 16, 0xF)
    local = [(e[1], e[7]) for e in entries if e[0] == 4]
    assert local == [(3, 0), (1, 1)]                              # ExtINT LINT0, NMI LINT1
