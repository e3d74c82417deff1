"""One PCI function: its configuration space, its BARs and their decoding, INTx.

Facts (PCI Local Bus Specification 3.0, 6.2.5 "Base Addresses"): a BAR's low bits say
what it is (bit 0: 1 = I/O space; memory: bits 2:1 type, 00 = 32-bit, bit 3
prefetchable); the size is a power of two and the address bits below it are hardwired to
zero, so software sizes a BAR by writing all ones and reading back ~(size - 1) | flags.
The command register's bit 0 (I/O space) and bit 1 (memory space) switch decoding of
every BAR of that kind; bit 10 disables INTx; status bit 3 shows an INTx request.

Design: a BAR is (index, size, kind, handler): the handler is a bus device whose
offsets are relative to the BAR's base. The address bits live in configuration space
(config.py) with a write mask of ~(size - 1), so sizing needs no special case. After
every guest write to the command register or a BAR, `_remap` compares where each BAR
should decode with where it is registered and moves it on the port or MMIO bus. A BAR
decodes only if its kind is enabled in the command register, its address is not zero,
it lies wholly in the bus's space, it does not meet guest RAM (a guest that moves a
BAR onto RAM gets nothing there: RAM wins, as it does on a chipset), and its range is
free on the bus (a BAR moved onto another device's range, or another BAR, decodes
nothing until it moves away). So a hostile guest can make a device unreachable, never
make two devices answer one address or hide RAM.

INTx: the device calls `set_intx(level)`; the line follows level unless the command
register disables INTx; status bit 3 always shows the device's request. Which 8259 input
the pin reaches is the host bridge's routing (host.py).

Invariants: a BAR is registered on at most one address at a time; registration never
overlaps anything else on the bus; only offsets inside a BAR reach its handler.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from pyhv.devices.bus import Bus, BusDevice
from pyhv.devices.irq import IrqLine
from pyhv.devices.pci import config as C
from pyhv.devices.state import Reader
from pyhv.memory import GuestMemory

IO_SPACE_END = 0x1_0000
MEM32_END = 1 << 32


@dataclass
class Bar:
    index: int
    size: int                  # a power of two: >= 16 (memory), >= 4 (I/O)
    io: bool                   # True: I/O space; False: 32-bit memory space
    handler: BusDevice
    name: str
    mapped_at: int | None = None   # where it is registered now, None when not decoding


class PciFunction:
    """A type 0 function: IDs, class, BARs, an interrupt pin."""

    def __init__(self, *, vendor: int, device: int, class_code: int, revision: int = 0,
                 subsys_vendor: int = 0, subsys_id: int = 0, interrupt_pin: int = 0,
                 name: str = "pci") -> None:
        self.name = name
        self.config = cs = C.ConfigSpace()
        cs.set(C.VENDOR_ID, 2, vendor)
        cs.set(C.DEVICE_ID, 2, device)
        cs.set(C.REVISION, 1, revision)
        cs.set(C.CLASS_PROG, 3, class_code)
        cs.set(C.SUBSYS_VENDOR, 2, subsys_vendor)
        cs.set(C.SUBSYS_ID, 2, subsys_id)
        cs.set(C.COMMAND, 2, 0, wmask=C.CMD_IO | C.CMD_MEMORY | C.CMD_MASTER | C.CMD_PARITY
               | C.CMD_SERR | C.CMD_INTX_DISABLE)
        cs.set_w1c(C.STATUS, 2, C.STATUS_W1C)
        cs.set(C.CACHE_LINE, 1, 0, wmask=0xFF)
        cs.set(C.LATENCY, 1, 0, wmask=0xFF)
        cs.set(C.INTERRUPT_LINE, 1, 0, wmask=0xFF if interrupt_pin else 0)
        cs.set(C.INTERRUPT_PIN, 1, interrupt_pin)
        self.bars: dict[int, Bar] = {}
        self._pio: Bus | None = None
        self._mmio: Bus | None = None
        self._memory: GuestMemory | None = None
        self._intx: IrqLine | None = None
        self._intx_level = False
        self.refused_maps = 0          # BAR placements refused (RAM, overlap, out of space)

    # ------------------------------------------------------------------ building

    def add_bar(self, index: int, size: int, handler: BusDevice, *, io: bool = False,
                name: str = "") -> Bar:
        if not 0 <= index < 6 or index in self.bars:
            raise ValueError(f"BAR {index} is taken or does not exist")
        if size & (size - 1) or size < (4 if io else 16):
            raise ValueError(f"BAR size {size:#x} is not a power of two of the minimum")
        bar = Bar(index, size, io, handler, name or f"{self.name} BAR{index}")
        self.bars[index] = bar
        flags = 1 if io else 0
        self.config.set(C.BAR0 + 4 * index, 4, flags, wmask=~(size - 1) & 0xFFFFFFFF
                        & (0xFFFFFFFC if io else 0xFFFFFFF0))
        return bar

    def attach(self, pio: Bus, mmio: Bus, memory: GuestMemory | None,
               intx: IrqLine | None) -> None:
        """Connect to the machine (the host bridge calls this when the function is added)."""
        self._pio, self._mmio, self._memory, self._intx = pio, mmio, memory, intx

    def place_bar(self, index: int, address: int) -> None:
        """The firmware's assignment (pyhv acts as the firmware): set the BAR's address."""
        bar = self.bars[index]
        low = self.config.get(C.BAR0 + 4 * index, 4) & (3 if bar.io else 0xF)
        self.config.set(C.BAR0 + 4 * index, 4, (address & ~(bar.size - 1)) | low)
        self._remap()

    def enable_decoding(self) -> None:
        cmd = self.config.get(C.COMMAND, 2)
        for bar in self.bars.values():
            cmd |= C.CMD_IO if bar.io else C.CMD_MEMORY
        self.config.set(C.COMMAND, 2, cmd)
        self._remap()

    # ------------------------------------------------------------------ guest accesses

    def config_read(self, offset: int, size: int) -> int:
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.config.write(offset, size, value)
        end = offset + size
        if offset < C.COMMAND + 2 and end > C.COMMAND:
            self._update_intx()
            self._remap()
        elif offset < C.BAR0 + 24 and end > C.BAR0:
            self._remap()

    # ------------------------------------------------------------------ BAR decoding

    def bar_address(self, index: int) -> int:
        bar = self.bars[index]
        return self.config.get(C.BAR0 + 4 * index, 4) & ~(bar.size - 1) & \
            (0xFFFFFFFC if bar.io else 0xFFFFFFF0)

    def _wanted(self, bar: Bar) -> int | None:
        cmd = self.config.get(C.COMMAND, 2)
        if not cmd & (C.CMD_IO if bar.io else C.CMD_MEMORY):
            return None
        base = self.bar_address(bar.index)
        if base == 0 or base + bar.size > (IO_SPACE_END if bar.io else MEM32_END):
            return None
        return base

    def _remap(self) -> None:
        for bar in self.bars.values():
            bus = self._pio if bar.io else self._mmio
            if bus is None:
                continue
            want = self._wanted(bar)
            if want == bar.mapped_at:
                continue
            if bar.mapped_at is not None:
                bus.unregister(bar.mapped_at, bar.handler)
                bar.mapped_at = None
            if want is None:
                continue
            if not bar.io and self._meets_ram(want, bar.size) \
                    or not bus.is_free(want, bar.size):
                self.refused_maps += 1
                continue
            bus.register(want, bar.size, bar.handler, bar.name)
            bar.mapped_at = want

    def _meets_ram(self, base: int, size: int) -> bool:
        if self._memory is None:
            return False
        return any(r.gpa < base + size and base < r.end for r in self._memory.regions)

    def unmap_all(self) -> None:
        for bar in self.bars.values():
            bus = self._pio if bar.io else self._mmio
            if bar.mapped_at is not None and bus is not None:
                bus.unregister(bar.mapped_at, bar.handler)
            bar.mapped_at = None

    # ------------------------------------------------------------------ INTx

    def set_intx(self, level: bool) -> None:
        """The device's interrupt request (run-loop thread only)."""
        self._intx_level = level
        st = self.config.get(C.STATUS, 2)
        st = st | C.STATUS_INTERRUPT if level else st & ~C.STATUS_INTERRUPT
        self.config.set(C.STATUS, 2, st)
        self._update_intx()

    def _update_intx(self) -> None:
        if self._intx is None:
            return
        disabled = self.config.get(C.COMMAND, 2) & C.CMD_INTX_DISABLE
        self._intx.set_level(self._intx_level and not disabled)

    # ------------------------------------------------------------------ state records

    state_version: ClassVar[int] = 1

    def save_state(self) -> dict[str, Any]:
        """The configuration space (BARs, command, capabilities as the guest left them)
        and the INTx request; a subclass with more state adds its fields."""
        return {"config": bytes(self.config.data).hex(), "intx_level": self._intx_level}

    def load_state(self, record: Mapping[str, Any], version: int) -> None:
        r = Reader(f"pci {self.name}", record)
        fields = self.read_pci_fields(r)
        r.done()
        self.take_pci_fields(fields)

    def read_pci_fields(self, r: Reader) -> tuple[bytes, bool]:
        """Check this class's fields in `r` (the caller calls `r.done()`): the guest can
        only have changed writable bits, so every other bit must be as this function
        has it. `take_pci_fields` then takes them."""
        data = r.hex("config", length=C.CONFIG_SIZE)
        intx_level = r.bool("intx_level")
        cs = self.config
        for i, (new, old) in enumerate(zip(data, cs.data, strict=True)):
            fixed = ~(cs.wmask[i] | cs.w1cmask[i]) & 0xFF
            if C.STATUS <= i < C.STATUS + 2:
                fixed &= ~(C.STATUS_INTERRUPT >> (8 * (i - C.STATUS))) & 0xFF
            if i == C.INTERRUPT_LINE:
                fixed = 0
            if (new ^ old) & fixed:
                raise r.fail("config", f"byte {i:#x} = {new:#04x}: read-only bits differ "
                             f"from this device's ({old:#04x}): another device's record")
        return data, intx_level

    def take_pci_fields(self, fields: tuple[bytes, bool]) -> None:
        """Take checked fields; the BARs are decoded again (mapped where they were)."""
        self.config.data[:], self._intx_level = fields
        self._remap()
