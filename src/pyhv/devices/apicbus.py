"""The APIC bus: interrupt messages between local APICs and the I/O APIC.

Facts (Intel SDM Vol. 3A, 10.6 "Issuing Interprocessor Interrupts", 10.6.2 "Determining
IPI Destination", 10.12.9 for x2APIC; 82093AA I/O APIC datasheet, 3.2.4):

    delivery mode   0 fixed  1 lowest priority  2 SMI  4 NMI  5 INIT  6 SIPI  7 ExtINT
    destination     physical: the APIC ID (0xff xAPIC / 0xffffffff x2APIC = everyone)
                    logical, flat (DFR 0xf...):    (LDR >> 24) & dest != 0
                    logical, cluster (DFR 0x0...): cluster (high nibble) equal and
                                                    low nibbles intersect
                    logical, x2APIC:               LDR[31:16] == dest[31:16] and
                                                    LDR[15:0] & dest[15:0] != 0
    shorthand       0 none (use the destination)  1 self  2 all  3 all but self

Design: a `Message` names its destination; `ApicBus.send` picks the local APICs that
match and hands the message to each (`LocalApic.accept`). Lowest priority goes to one
APIC only: the matching one with the lowest arbitration priority (PPR), ties broken by
the lowest APIC ID, so the choice is deterministic. Delivery is synchronous and lands in
bounded state (IRR bitmaps, flags), so a storm of messages cannot grow anything. EOIs of
level-triggered interrupts are broadcast to every I/O APIC registered with `on_eoi`.

Invariants: the bus holds at most one entry per local APIC (by index); it never raises
for a destination nobody matches (the message is dropped, and `send` returns 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyhv.devices.lapic import LocalApic

FIXED, LOWEST, SMI, NMI, INIT, SIPI, EXTINT = 0, 1, 2, 4, 5, 6, 7
SH_NONE, SH_SELF, SH_ALL, SH_OTHERS = 0, 1, 2, 3


@dataclass(frozen=True)
class Message:
    vector: int
    mode: int = FIXED
    logical: bool = False
    dest: int = 0
    level_triggered: bool = False
    assert_level: bool = True          # INIT level de-assert carries False
    shorthand: int = SH_NONE
    source: int | None = None          # the sender's index (None: the I/O APIC)


class ApicBus:
    """Every local APIC of a machine, and the EOI listeners (I/O APICs)."""

    def __init__(self) -> None:
        self.apics: list[LocalApic] = []
        self._eoi_listeners: list[Callable[[int], None]] = []
        self.sent = 0
        self.dropped = 0

    def attach(self, apic: LocalApic) -> None:
        self.apics.append(apic)

    def on_eoi(self, listener: Callable[[int], None]) -> None:
        self._eoi_listeners.append(listener)

    def eoi(self, vector: int) -> None:
        """A local APIC retired a level-triggered interrupt: tell the I/O APICs."""
        for f in self._eoi_listeners:
            f(vector)

    def targets(self, msg: Message) -> list[LocalApic]:
        """The local APICs the message reaches (before lowest-priority arbitration)."""
        src = msg.source
        if msg.shorthand == SH_SELF:
            return [a for a in self.apics if a.index == src]
        if msg.shorthand == SH_ALL:
            return list(self.apics)
        if msg.shorthand == SH_OTHERS:
            return [a for a in self.apics if a.index != src]
        return [a for a in self.apics if a.matches(msg.dest, msg.logical)]

    def send(self, msg: Message) -> int:
        """Deliver msg; returns how many local APICs accepted it."""
        self.sent += 1
        targets = self.targets(msg)
        if msg.mode == LOWEST and len(targets) > 1:
            targets = [min(targets, key=lambda a: (a.ppr(), a.apic_id))]
        n = 0
        for a in targets:
            if a.accept(msg):
                n += 1
        if n == 0:
            self.dropped += 1
        return n
