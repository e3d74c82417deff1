"""The PCI host bridge: configuration mechanism #1, slots, firmware BAR and IRQ setup.

Facts (PCI Local Bus Specification 3.0, 3.2.2.3.2 "Software Generation of Configuration
Transactions"): CONFIG_ADDRESS is the dword at port 0xcf8, and only a dword access there
is CONFIG_ADDRESS (byte and word accesses to 0xcf8-0xcfb are ordinary I/O, which no
device claims here):

    bit 31 enable | 30:24 reserved | 23:16 bus | 15:11 device | 10:8 function | 7:2 register

CONFIG_DATA is 0xcfc-0xcff: an access of any width at 0xcfc + n reaches the selected
function's configuration bytes (register & 0xfc) + n, for the bytes that fall inside the
four data ports; bytes of an access that stick out past 0xcff read as all ones. A
function that does not exist (another bus, an empty slot, functions 1-7) reads as all
ones and ignores writes, which is how software finds that nothing is there.

Linux (arch/x86/pci/direct.c) takes mechanism #1 only after a sanity check that some
function on bus 0 is a host bridge, a VGA device or an Intel or Compaq part: slot 0 is a
host bridge with the IDs of QEMU's i440FX (8086:1237, class 06 00 00), which Linux knows.

Design, pyhv acting as the firmware (there is no BIOS): `add()` puts a function in the
next free slot, assigns its memory BARs bottom-up in the MMIO hole (layout.PCI_MMIO_*,
each aligned to its size) and its I/O BARs from layout.PCI_IO_START, turns decoding on,
and routes its interrupt pin: slot s, pin p (1 = INTA) uses link (s + p - 1) mod 4
(the usual swizzle), links A-D go to 8259 IRQs PCI_IRQS. The IRQ is written into the
Interrupt Line register, which is where Debian's kernel finds it without ACPI (docs/pci.md
explains why, and why neither a $PIR table nor an MP table is needed), and the firmware
makes those IRQs level-triggered in the ELCR, as PC firmware does for PCI interrupts.
Functions routed to one IRQ share it: the line is the OR of their requests (`SharedIrq`).

Invariants: config accesses never raise, whatever the width or alignment; BAR
assignments never overlap and never leave the MMIO hole (a function that does not fit is
refused at build time with a ConfigError).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from pyhv.arch.x86 import layout
from pyhv.devices.bus import Bus, BusDevice
from pyhv.devices.irq import IrqLine
from pyhv.devices.pci import config as C
from pyhv.devices.pci.function import PciFunction
from pyhv.devices.state import Reader
from pyhv.errors import ConfigError
from pyhv.memory import GuestMemory

SLOTS = 32
PCI_IRQS = (10, 11, 10, 11)      # links A, B, C, D -> 8259 inputs (SeaBIOS's defaults)
ENABLE = 1 << 31
ADDRESS_MASK = 0x80FF_FFFC       # enable, bus, device, function, register (dword)


class SharedIrq:
    """An 8259 input shared by several functions: high while any of them requests."""

    def __init__(self, line: IrqLine) -> None:
        self._line = line
        self._high: set[int] = set()

    def input(self, key: int) -> IrqLine:
        shared = self

        class _In:
            def set_level(self, high: bool) -> None:
                was = bool(shared._high)
                if high:
                    shared._high.add(key)
                else:
                    shared._high.discard(key)
                now = bool(shared._high)
                if now != was:
                    shared._line.set_level(now)
        return _In()


class HostBridge(PciFunction):
    def __init__(self) -> None:
        super().__init__(vendor=0x8086, device=0x1237, class_code=0x060000, revision=2,
                         name="host bridge")


class PciHost:
    """Bus 0: the host bridge in slot 0 and the functions `add()` places; ports 0xcf8-0xcff."""

    def __init__(self, pio: Bus, mmio: Bus, memory: GuestMemory | None,
                 irq_line: Callable[[int], IrqLine],
                 set_level_triggered: Callable[[int], None] = lambda _irq: None) -> None:
        self.pio, self.mmio, self.memory = pio, mmio, memory
        self._irq_line = irq_line
        self._set_level_triggered = set_level_triggered
        self._shared: dict[int, SharedIrq] = {}
        self.slots: dict[int, PciFunction] = {}
        self.address = 0
        self._next_mem = layout.PCI_MMIO_START
        self._next_io = layout.PCI_IO_START
        self.add(HostBridge(), slot=0)

    def regions(self) -> list[tuple[int, int, BusDevice, str]]:
        return [(layout.PCI_CONFIG_PORT, 8, self, "pci config")]

    # ------------------------------------------------------------------ firmware

    def add(self, fn: PciFunction, slot: int | None = None) -> int:
        """Place `fn` in a slot (the next free one by default); returns the slot."""
        if slot is None:
            free = [s for s in range(1, SLOTS) if s not in self.slots]
            if not free:
                raise ConfigError("no free PCI slot (32 per bus)")
            slot = free[0]
        if slot in self.slots or not 0 <= slot < SLOTS:
            raise ConfigError(f"PCI slot {slot} is taken or does not exist")
        intx: IrqLine | None = None
        pin = fn.config.get(C.INTERRUPT_PIN, 1)
        if 1 <= pin <= 4:
            irq = PCI_IRQS[(slot + pin - 1) % 4]
            if irq not in self._shared:
                self._shared[irq] = SharedIrq(self._irq_line(irq))
                self._set_level_triggered(irq)
            intx = self._shared[irq].input(slot)
            fn.config.set(C.INTERRUPT_LINE, 1, irq)
        fn.attach(self.pio, self.mmio, self.memory, intx)
        for bar in sorted(fn.bars.values(), key=lambda b: -b.size):
            if bar.io:
                at = -(-self._next_io // bar.size) * bar.size
                if at + bar.size > layout.PCI_IO_END:
                    raise ConfigError(f"{fn.name}: PCI I/O space is full")
                self._next_io = at + bar.size
            else:
                at = -(-self._next_mem // bar.size) * bar.size
                if at + bar.size > layout.PCI_MMIO_END:
                    raise ConfigError(f"{fn.name}: the PCI MMIO hole is full")
                self._next_mem = at + bar.size
            fn.place_bar(bar.index, at)
        if fn.bars:
            fn.enable_decoding()
        self.slots[slot] = fn
        return slot

    # ------------------------------------------------------------------ ports 0xcf8-0xcff

    def _target(self) -> PciFunction | None:
        a = self.address
        if not a & ENABLE or (a >> 16) & 0xFF or (a >> 8) & 7:
            return None
        return self.slots.get((a >> 11) & 0x1F)

    def read(self, offset: int, size: int) -> int:
        if offset == 0 and size == 4:
            return self.address
        value = 0
        for lo, n, shift in self._data_span(offset, size):
            fn = self._target()
            part = fn.config_read((self.address & 0xFC) + lo, n) if fn is not None \
                else (1 << (8 * n)) - 1
            value |= part << shift
        # bytes outside the data ports (0xcf8-0xcfb by a non-dword access, past 0xcff)
        covered = 0
        for _lo, n, shift in self._data_span(offset, size):
            covered |= ((1 << (8 * n)) - 1) << shift
        return value | (((1 << (8 * size)) - 1) & ~covered)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            self.address = value & ADDRESS_MASK
            return
        fn = self._target()
        if fn is None:
            return
        for lo, n, shift in self._data_span(offset, size):
            fn.config_write((self.address & 0xFC) + lo, n,
                            (value >> shift) & ((1 << (8 * n)) - 1))

    @staticmethod
    def _data_span(offset: int, size: int) -> list[tuple[int, int, int]]:
        """The part of an access at 0xcf8 + offset inside the data ports 0xcfc-0xcff:
        [(byte in the dword, length, bit shift in the access's value)] (empty or one)."""
        lo = max(offset, 4)
        hi = min(offset + size, 8)
        if lo >= hi:
            return []
        return [(lo - 4, hi - lo, 8 * (lo - offset))]

    # ------------------------------------------------------------------ state records

    state_version: ClassVar[int] = 1

    def save_state(self) -> dict[str, Any]:
        """The config address register and which slots hold each shared line high
        (the functions' own records are separate: `pci.SLOT`)."""
        return {"address": self.address,
                "shared_high": {str(irq): sorted(s._high) for irq, s in self._shared.items()}}

    def load_state(self, record: Mapping[str, Any], version: int) -> None:
        r = Reader("pci-host", record)
        address = r.int("address", 0, ADDRESS_MASK)
        if address & ~ADDRESS_MASK:
            raise r.fail("address", f"= {address:#x} has bits the register cannot hold")
        shared = r.sub("shared_high")
        highs = {irq: shared.ints(str(irq), 0, SLOTS - 1, max_len=SLOTS)
                 for irq in self._shared}
        shared.done()
        r.done()
        self.address = address
        for irq, slots in highs.items():
            self._shared[irq]._high = set(slots)
