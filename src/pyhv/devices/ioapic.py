"""The I/O APIC (82093AA-compatible, version 0x20) at 0xfec00000, 24 inputs (GSIs).

Facts (Intel 82093AA datasheet, 3.0 "Register Description"; the EOI register of
version 0x20 parts as in Intel's ICH/PCH datasheets, "I/O APIC EOI register"):

    base+0x00  IOREGSEL (8 bits)        base+0x10  IOWIN (32-bit window)
    base+0x40  EOI: a write of vector v clears remote IRR of the entries with vector v
    register 0x00 ID (bits 27:24)   0x01 version: max entry 23 (bits 23:16), 0x20
             0x02 arbitration ID    0x10 + 2n / 0x11 + 2n: redirection entry n, low/high
    entry:   7:0 vector  10:8 delivery mode  11 logical  12 delivery status (RO)
             13 polarity (1 = active low)  14 remote IRR (RO)  15 level  16 mask
             63:56 destination

Design:
- Inputs are logical: `set_irq(gsi, True)` means "asserted", whatever the pin's wired
  polarity; the polarity bit is stored for the guest and does not invert anything (the
  devices' lines in pyhv are all "asserted = True", edge or level).
- Edge entries send a message on each assertion edge while unmasked (an edge while
  masked is lost, as on the chip). Level entries send while the input is asserted,
  unmasked and remote IRR is clear, then set remote IRR; an EOI for the vector (from a
  local APIC's EOI broadcast or the EOI register) clears it and re-sends if the input is
  still asserted. So a stuck level line costs one message per EOI: never a storm.
- A message that no local APIC accepts (an entry pointing nowhere, an illegal vector)
  leaves remote IRR clear, so the entry does not wedge.
- ISA IRQ 0 is on GSI 2 (the PC's IRQ0 -> GSI2 override, which the MADT announces);
  every other ISA IRQ n is on GSI n (`isa_gsi`).
- Power-on state: every entry masked, edge, vector 0, ID 0 (ID written by the machine).

Invariants: 24 fixed entries; IOREGSEL keeps 8 bits; writes to read-only bits (delivery
status, remote IRR, the version register) are ignored; no access raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pyhv.devices.apicbus import ApicBus, Message
from pyhv.devices.state import Reader

IOAPIC_BASE_ADDR = 0xFEC00000
IOAPIC_MMIO_SIZE = 0x1000
N_PINS = 24
VERSION = 0x20 | ((N_PINS - 1) << 16)

E_VECTOR = 0xFF
E_LOGICAL = 1 << 11
E_STATUS = 1 << 12
E_POLARITY = 1 << 13
E_REMOTE_IRR = 1 << 14
E_LEVEL = 1 << 15
E_MASK = 1 << 16
E_WRITABLE = 0xFF000000_0001AFFF


def isa_gsi(irq: int) -> int:
    """The GSI an ISA IRQ arrives on (IRQ 0 -> GSI 2, the rest identity)."""
    return 2 if irq == 0 else irq


class _Pin:
    """`IrqLine` for one I/O APIC input."""

    def __init__(self, ioapic: IoApic, gsi: int) -> None:
        self._ioapic = ioapic
        self._gsi = gsi

    def set_level(self, high: bool) -> None:
        self._ioapic.set_irq(self._gsi, high)


class IoApic:
    """24-input I/O APIC on an `ApicBus`; register its `read`/`write` on the MMIO bus."""

    def __init__(self, bus: ApicBus, apic_id: int = 0) -> None:
        self.bus = bus
        self.apic_id = apic_id & 0xF
        self.ioregsel = 0
        self.entries = [E_MASK] * N_PINS
        self.levels = [False] * N_PINS
        self.sent = 0
        bus.on_eoi(self.eoi)

    # ------------------------------------------------------------------ inputs

    def irq_line(self, gsi: int) -> _Pin:
        """The `IrqLine` of input gsi (0..23)."""
        if not 0 <= gsi < N_PINS:
            raise ValueError(f"no GSI {gsi} on the I/O APIC")
        return _Pin(self, gsi)

    def set_irq(self, gsi: int, asserted: bool) -> None:
        if not 0 <= gsi < N_PINS:
            return
        was = self.levels[gsi]
        self.levels[gsi] = asserted
        e = self.entries[gsi]
        if e & E_LEVEL:
            if asserted:
                self._service(gsi)
        elif asserted and not was and not e & E_MASK:
            self._send(gsi)

    def _service(self, gsi: int) -> None:
        """A level input: send if asserted, unmasked and not already in service."""
        e = self.entries[gsi]
        if not self.levels[gsi] or e & (E_MASK | E_REMOTE_IRR):
            return
        if self._send(gsi):
            self.entries[gsi] |= E_REMOTE_IRR

    def _send(self, gsi: int) -> bool:
        e = self.entries[gsi]
        self.sent += 1
        accepted = self.bus.send(Message(
            vector=e & E_VECTOR, mode=(e >> 8) & 7, logical=bool(e & E_LOGICAL),
            dest=(e >> 56) & 0xFF, level_triggered=bool(e & E_LEVEL)))
        return accepted > 0

    def eoi(self, vector: int) -> None:
        for gsi, e in enumerate(self.entries):
            if e & E_REMOTE_IRR and e & E_VECTOR == vector:
                self.entries[gsi] = e & ~E_REMOTE_IRR
                self._service(gsi)

    # ------------------------------------------------------------------ registers

    def read_register(self, index: int) -> int:
        if index == 0:
            return self.apic_id << 24
        if index == 1:
            return VERSION
        if index == 2:
            return self.apic_id << 24
        if 0x10 <= index < 0x10 + 2 * N_PINS:
            e = self.entries[(index - 0x10) >> 1]
            return (e >> 32) & 0xFFFFFFFF if index & 1 else e & 0xFFFFFFFF
        return 0xFFFFFFFF          # no register there: reads as all ones (as QEMU's)

    def write_register(self, index: int, value: int) -> None:
        value &= 0xFFFFFFFF
        if index == 0:
            self.apic_id = (value >> 24) & 0xF
        elif 0x10 <= index < 0x10 + 2 * N_PINS:
            gsi = (index - 0x10) >> 1
            old = self.entries[gsi]
            new = ((old & 0xFFFFFFFF) | (value << 32)) if index & 1 else \
                ((old & ~0xFFFFFFFF) | value)
            new = (new & E_WRITABLE) | (old & E_REMOTE_IRR)
            if not new & E_LEVEL:
                new &= ~E_REMOTE_IRR
            self.entries[gsi] = new
            if new & E_LEVEL:
                self._service(gsi)       # unmasking an asserted level input sends it

    # ------------------------------------------------------------------ MMIO

    def read(self, offset: int, size: int) -> int:
        mask = (1 << (8 * size)) - 1
        if offset == 0x00:
            return self.ioregsel & mask
        if 0x10 <= offset < 0x14:
            return (self.read_register(self.ioregsel) >> (8 * (offset - 0x10))) & mask
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0x00:
            self.ioregsel = value & 0xFF
        elif offset == 0x10 and size == 4:
            self.write_register(self.ioregsel, value)
        elif offset == 0x40:
            self.eoi(value & 0xFF)

    # ------------------------------------------------------------------ state records

    state_version: ClassVar[int] = 1

    def save_state(self) -> dict[str, Any]:
        return {"apic_id": self.apic_id, "ioregsel": self.ioregsel,
                "entries": list(self.entries), "levels": list(self.levels)}

    def load_state(self, record: Mapping[str, Any], version: int) -> None:
        r = Reader("ioapic", record)
        apic_id = r.int("apic_id", 0, 0xF)
        ioregsel = r.int("ioregsel", 0, 0xFF)
        entries = r.ints("entries", 0, (1 << 64) - 1, length=N_PINS)
        levels = r.bools("levels", length=N_PINS)
        r.done()
        for gsi, e in enumerate(entries):
            if e & ~(E_WRITABLE | E_REMOTE_IRR):
                raise r.fail("entries", f"[{gsi}] = {e:#x} has bits no entry can hold")
        self.apic_id, self.ioregsel = apic_id, ioregsel
        self.entries, self.levels = entries, levels
