"""The PC's cascaded 8259A pair (0x20/0x21 master, 0xa0/0xa1 slave) and the ELCR.

Facts (Intel 8259A datasheet, "Programming the 8259A": ICW1-4 and OCW1-3, and
"Interrupt Sequence"; the ELCR from Intel's PIIX/PIIX3 datasheet, 0x4d0/0x4d1):

    base+0 write  bit 4 = 1: ICW1 (bit 0 IC4: ICW4 follows, bit 1 SNGL: no ICW3,
                              bit 3 LTIM: all inputs level-triggered); starts init
                  bits 4:3 = 00: OCW2  bits 7:5 = R SL EOI, bits 2:0 = level
                      001 non-specific EOI   011 specific EOI      101 rotate on NS EOI
                      100 set rotate in AEOI 000 clear rotate AEOI 111 rotate on spec EOI
                      110 set priority       010 no operation
                  bits 4:3 = 01: OCW3  bits 6:5 = 11/10 set/reset special mask,
                      bit 2 poll, bits 1:0 = 10/11 read IRR/ISR on base+0
    base+0 read   IRR or ISR (per OCW3), or the poll byte (0x80 | level, or 0)
    base+1 write  during init: ICW2 (vector base, bits 7:3), ICW3, ICW4 (bit 1 AEOI,
                  bit 4 special fully nested); otherwise OCW1 (the mask, IMR)
    base+1 read   IMR
    0x4d0/0x4d1   ELCR: bit n = 1 makes IRQ n (master) / 8+n (slave) level-triggered;
                  IRQ 0, 1, 2, 8 and 13 are always edge (their bits read 0)

    master IR2 <- slave INT (the cascade);  ISA IRQ 2 is wired to IRQ 9 (PC/AT)

Design:
- Each chip keeps IRR, ISR, IMR, the last input levels, the rotation base
  (`priority_add`: the level with the highest priority), init/AEOI/special-mask state.
- Edge inputs latch a request into IRR on a low->high transition and keep it until INTA,
  so a device may `pulse()` its line; level inputs make IRR follow the line, so a request
  that goes away before INTA is gone.
- The cascade: the slave's INT output latches master IRR bit 2 like an edge input, so a
  slave request that vanishes before INTA gives the slave's spurious IRQ 15 (with the
  master's IR2 in service, as on hardware). It also re-latches whenever the slave's INT
  is high while the master's IR2 is not in service, so a slave request still pending when
  the master's IR2 is EOI'd is delivered instead of being lost for want of a new edge.
- Priority: the highest-priority unmasked request is delivered if its priority beats
  every in-service level (ISR bits masked by IMR are ignored in special mask mode; the
  master ignores its own IR2 in-service bit in special fully nested mode).
- INTA (`acknowledge()`): the master picks a level, sets its ISR bit (unless AEOI) and
  clears an edge request; for IR2 the slave does the same and gives the vector. If no
  request is left at INTA time (it was masked, or a level line dropped), the chip answers
  with its spurious vector, base + 7 (IRQ 7 or, from the slave, IRQ 15), without setting
  ISR, as the datasheet's interrupt sequence describes.
- Power-on state, as a PC BIOS would have left it (pyhv has no BIOS): vectors 0x08 and
  0x70, all inputs masked except the cascade, edge-triggered.
- `pending()` is a cached flag, recomputed on every state change, so engines may poll it
  after every exit or block cheaply. `on_intr` (optional) is called when INTR rises,
  e.g. to wake a halted vCPU.

Threading: `IrqLine.set_level` on the lines from `irq_line(n)`, the port accesses,
`pending()` and `acknowledge()` must all be called on the run-loop thread (the thread
that owns the vCPU and fires the TimerQueue). Nothing here takes a lock.

Invariants: IRR/ISR/IMR are 8-bit; ISR only gains a bit through INTA or poll; the
state a guest can create is a fixed handful of integers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from pyhv.devices.bus import BusDevice
from pyhv.devices.irq import IrqLine
from pyhv.devices.state import U8, Reader
from pyhv.errors import StateError

MASTER_PORT = 0x20
SLAVE_PORT = 0xA0
ELCR_PORT = 0x4D0
CASCADE_IRQ = 2
SPURIOUS_LEVEL = 7

# ELCR bits that can be set (Intel PIIX: IRQ 0, 1, 2, 8, 13 are edge only).
ELCR_MASK_MASTER = 0xF8
ELCR_MASK_SLAVE = 0xDE

ICW1 = 0x10
ICW1_IC4 = 0x01
ICW1_SNGL = 0x02
ICW1_LTIM = 0x08
ICW4_AEOI = 0x02
ICW4_SFNM = 0x10
OCW3 = 0x08
OCW3_RIS = 0x01
OCW3_RR = 0x02
OCW3_POLL = 0x04
OCW3_SMM = 0x20
OCW3_ESMM = 0x40


def _bit(n: int) -> int:
    return 1 << n


class Pic8259:
    """One 8259A chip (two ports). Its owner, `PicPair`, connects the cascade."""

    def __init__(self, pair: PicPair, is_master: bool, vector_base: int, imr: int) -> None:
        self._pair = pair
        self.is_master = is_master
        self.elcr_mask = ELCR_MASK_MASTER if is_master else ELCR_MASK_SLAVE
        self.vector_base = vector_base
        self.irr = 0
        self.isr = 0
        self.imr = imr
        self.elcr = 0
        self.last_levels = 0
        self.priority_add = 0          # the level with the highest priority
        self.read_isr = False
        self.poll = False
        self.special_mask = False
        self.auto_eoi = False
        self.rotate_on_aeoi = False
        self.sfnm = False
        self.ltim = False
        self.single = False
        self.icw4_needed = False
        self.init_step = 0              # 0 ready, 2/3/4: waiting for that ICW
        self.spurious = 0

    # ------------------------------------------------------------------ inputs

    def _level_mask(self) -> int:
        return 0xFF if self.ltim else self.elcr

    def set_input(self, n: int, high: bool) -> None:
        bit = _bit(n)
        if self._level_mask() & bit:
            if high:
                self.irr |= bit
            else:
                self.irr &= ~bit
        elif high and not self.last_levels & bit:
            self.irr |= bit             # rising edge: latch the request
        if high:
            self.last_levels |= bit
        else:
            self.last_levels &= ~bit

    # ------------------------------------------------------------------ priority

    def _priority(self, mask: int) -> int:
        """0 = highest priority level present in mask, 8 = none."""
        if not mask:
            return 8
        for i in range(8):
            if mask & _bit((i + self.priority_add) & 7):
                return i
        return 8

    def best_irq(self) -> int:
        """The level this chip would deliver now, or -1."""
        requests = self.irr & ~self.imr
        prio = self._priority(requests)
        if prio == 8:
            return -1
        in_service = self.isr
        if self.special_mask:
            in_service &= ~self.imr
        if self.sfnm and self.is_master:
            in_service &= ~_bit(CASCADE_IRQ)
        if prio < self._priority(in_service):
            return (prio + self.priority_add) & 7
        return -1

    def intack(self, irq: int) -> None:
        bit = _bit(irq)
        if self.auto_eoi:
            if self.rotate_on_aeoi:
                self.priority_add = (irq + 1) & 7
        else:
            self.isr |= bit
        if not self._level_mask() & bit:
            self.irr &= ~bit

    # ------------------------------------------------------------------ bus protocol

    def read(self, offset: int, size: int) -> int:
        if offset & 1:
            return self.imr
        if self.poll:
            self.poll = False
            irq = self.best_irq()
            if irq < 0:
                return 0
            self.intack(irq)
            self._pair.update()
            return 0x80 | irq
        return self.isr if self.read_isr else self.irr

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset & 1:
            self._write_data(value)
        elif value & ICW1:
            self._icw1(value)
        elif value & OCW3:
            self._ocw3(value)
        else:
            self._ocw2(value)
        self._pair.update()

    def _icw1(self, value: int) -> None:
        # Datasheet: ICW1 clears IMR and ISR, resets the edge sense latches, gives IR7
        # the lowest priority, clears special mask mode, selects IRR for reads, and clears
        # every ICW4 function if IC4 = 0.
        self.icw4_needed = bool(value & ICW1_IC4)
        self.single = bool(value & ICW1_SNGL)
        self.ltim = bool(value & ICW1_LTIM)
        self.imr = 0
        self.isr = 0
        self.irr &= self._level_mask() & self.last_levels
        self.last_levels = 0
        self.priority_add = 0
        self.special_mask = False
        self.read_isr = False
        self.poll = False
        self.auto_eoi = False
        self.rotate_on_aeoi = False
        self.sfnm = False
        self.init_step = 2

    def _write_data(self, value: int) -> None:
        if self.init_step == 2:
            self.vector_base = value & 0xF8
            self.init_step = 4 if self.single else 3
            if self.init_step == 4 and not self.icw4_needed:
                self.init_step = 0
        elif self.init_step == 3:
            # ICW3: the master's slave map / the slave's ID; the PC wiring is fixed.
            self.init_step = 4 if self.icw4_needed else 0
        elif self.init_step == 4:
            self.auto_eoi = bool(value & ICW4_AEOI)
            self.sfnm = bool(value & ICW4_SFNM)
            self.init_step = 0
        else:
            self.imr = value

    def _ocw2(self, value: int) -> None:
        cmd = value >> 5
        level = value & 7
        if cmd in (0b001, 0b101):                  # non-specific EOI (and rotate)
            in_service = self.isr
            if self.special_mask:
                in_service &= ~self.imr
            prio = self._priority(in_service)
            if prio != 8:
                irq = (prio + self.priority_add) & 7
                self.isr &= ~_bit(irq)
                if cmd == 0b101:
                    self.priority_add = (irq + 1) & 7
        elif cmd in (0b011, 0b111):                # specific EOI (and rotate)
            self.isr &= ~_bit(level)
            if cmd == 0b111:
                self.priority_add = (level + 1) & 7
        elif cmd == 0b110:                         # set priority: level is lowest
            self.priority_add = (level + 1) & 7
        elif cmd == 0b100:
            self.rotate_on_aeoi = True
        elif cmd == 0b000:
            self.rotate_on_aeoi = False
        # 0b010: no operation

    # ------------------------------------------------------------------ state records

    _BYTES = ("vector_base", "irr", "isr", "imr", "elcr", "last_levels")
    _FLAGS = ("read_isr", "poll", "special_mask", "auto_eoi", "rotate_on_aeoi", "sfnm",
              "ltim", "single", "icw4_needed")

    def save_state(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: getattr(self, k) for k in self._BYTES + self._FLAGS}
        d["priority_add"] = self.priority_add
        d["init_step"] = self.init_step
        return d

    @classmethod
    def read_state(cls, r: Reader) -> dict[str, Any]:
        """The checked fields of one chip's record (`done()` included)."""
        out: dict[str, Any] = {k: r.int(k, 0, U8) for k in cls._BYTES}
        out.update({k: r.bool(k) for k in cls._FLAGS})
        out["priority_add"] = r.int("priority_add", 0, 7)
        out["init_step"] = r.int("init_step", 0, 4)
        if out["init_step"] == 1:
            raise r.fail("init_step", "= 1 is not an initialisation step")
        r.done()
        return out

    def _ocw3(self, value: int) -> None:
        if value & OCW3_POLL:
            self.poll = True
        if value & OCW3_RR:
            self.read_isr = bool(value & OCW3_RIS)
        if value & OCW3_ESMM:
            self.special_mask = bool(value & OCW3_SMM)


class _Elcr:
    """The two edge/level control registers at 0x4d0 (master) and 0x4d1 (slave)."""

    def __init__(self, pair: PicPair) -> None:
        self._pair = pair

    def read(self, offset: int, size: int) -> int:
        return self._pair.chips[offset & 1].elcr

    def write(self, offset: int, size: int, value: int) -> None:
        chip = self._pair.chips[offset & 1]
        chip.elcr = value & chip.elcr_mask
        # Re-evaluate the inputs that just became level-triggered.
        for n in range(8):
            if chip.elcr & _bit(n):
                chip.set_input(n, bool(chip.last_levels & _bit(n)))
        self._pair.update()


class _Line:
    """`IrqLine` for one PC IRQ number."""

    def __init__(self, pair: PicPair, irq: int) -> None:
        self._pair = pair
        self._irq = irq

    def set_level(self, high: bool) -> None:
        self._pair.set_irq(self._irq, high)


class PicPair:
    """Master + slave 8259A and the ELCR; an `InterruptSource` for the engines."""

    def __init__(self, on_intr: Callable[[], None] | None = None) -> None:
        self.master = Pic8259(self, True, 0x08, 0xFF & ~_bit(CASCADE_IRQ))
        self.slave = Pic8259(self, False, 0x70, 0xFF)
        self.chips = (self.master, self.slave)
        self.elcr = _Elcr(self)
        self.on_intr = on_intr
        self._intr = False
        self._lines = {n: _Line(self, n) for n in range(16)}
        self.delivered = 0
        self.spurious = 0

    def regions(self) -> list[tuple[int, int, BusDevice, str]]:
        """(base, length, device, name) to register on the port bus."""
        return [(MASTER_PORT, 2, self.master, "pic-master"),
                (SLAVE_PORT, 2, self.slave, "pic-slave"),
                (ELCR_PORT, 2, self.elcr, "elcr")]

    def irq_line(self, n: int) -> IrqLine:
        """The line for PC IRQ n (0..15); IRQ 2 is the cascade, so n = 2 means IRQ 9."""
        if not 0 <= n <= 15:
            raise ValueError(f"no IRQ {n} on the 8259 pair")
        return self._lines[9 if n == CASCADE_IRQ else n]

    def set_irq(self, n: int, high: bool) -> None:
        """Drive input n (0..7 master, 8..15 slave). Run-loop thread only."""
        if n >= 8:
            self.slave.set_input(n - 8, high)
        else:
            self.master.set_input(n, high)
        self.update()

    def update(self) -> None:
        """Propagate the slave's INT to master IR2 and recompute INTR."""
        master = self.master
        slave_int = self.slave.best_irq() >= 0
        master.set_input(CASCADE_IRQ, slave_int)
        if slave_int and (master.sfnm or not master.isr & _bit(CASCADE_IRQ)):
            master.irr |= _bit(CASCADE_IRQ)      # re-latch a request still waiting
        intr = self.master.best_irq() >= 0
        rose = intr and not self._intr
        self._intr = intr
        if rose and self.on_intr is not None:
            self.on_intr()

    # ------------------------------------------------------------------ InterruptSource

    def pending(self) -> bool:
        """The INTR pin: an unmasked request beats everything in service."""
        return self._intr

    def acknowledge(self) -> int:
        """The INTA cycle: the vector to deliver (a spurious one if the request went)."""
        master = self.master
        irq = master.best_irq()
        if irq < 0:
            vector = master.vector_base + SPURIOUS_LEVEL
            master.spurious += 1
            self.spurious += 1
        else:
            master.intack(irq)
            if irq == CASCADE_IRQ:
                irq2 = self.slave.best_irq()
                if irq2 < 0:
                    vector = self.slave.vector_base + SPURIOUS_LEVEL
                    self.slave.spurious += 1
                    self.spurious += 1
                else:
                    self.slave.intack(irq2)
                    vector = self.slave.vector_base + irq2
                    self.delivered += 1
            else:
                vector = master.vector_base + irq
                self.delivered += 1
        self.update()
        return vector

    # ------------------------------------------------------------------ state records

    state_version: ClassVar[int] = 1

    def save_state(self) -> dict[str, Any]:
        return {"master": self.master.save_state(), "slave": self.slave.save_state(),
                "intr": self._intr}

    def load_state(self, record: Mapping[str, Any], version: int) -> None:
        r = Reader("pic", record)
        chips = [Pic8259.read_state(r.sub("master")), Pic8259.read_state(r.sub("slave"))]
        intr = r.bool("intr")
        r.done()
        for chip, fields in zip(self.chips, chips, strict=True):
            masked = fields["elcr"] & ~chip.elcr_mask
            if masked:
                raise StateError(f"pic: ELCR bits {masked:#x} cannot be level-triggered")
        for chip, fields in zip(self.chips, chips, strict=True):
            for k, v in fields.items():
                setattr(chip, k, v)
        self._intr = intr
