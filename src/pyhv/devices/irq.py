"""Interrupt lines: the one-method link from a device to an interrupt controller.

Design (after rust-vmm's `Trigger`): a device is handed an `IrqLine` and only ever calls
`set_level(high)`. Edge-triggered users raise then lower it (`pulse`). Whether the line
ends at the Python 8259 model, at both the 8259 and the I/O APIC (`FanOutLine`) or at a
test recorder (`RecordingIrq`) is decided by whoever builds the machine; the device
cannot tell.
"""

from __future__ import annotations

from typing import Protocol


class IrqLine(Protocol):
    def set_level(self, high: bool) -> None: ...


class FanOutLine:
    """One device output wired to several controller inputs (a PC's ISA IRQ reaches both
    the 8259 and the I/O APIC)."""

    def __init__(self, *lines: IrqLine) -> None:
        self.lines = lines

    def set_level(self, high: bool) -> None:
        for line in self.lines:
            line.set_level(high)


def pulse(line: IrqLine) -> None:
    """An edge: raise then lower the line."""
    line.set_level(True)
    line.set_level(False)


class RecordingIrq:
    """A line that remembers its level and every change (for tests)."""

    def __init__(self) -> None:
        self.level = False
        self.history: list[bool] = []

    def set_level(self, high: bool) -> None:
        self.level = high
        self.history.append(high)

    @property
    def raises(self) -> int:
        return self.history.count(True)
