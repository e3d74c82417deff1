"""ACPI fixed hardware: the PM1a event and control blocks, the PM timer, the reset
register (the ports the FADT names, arch/x86/acpi.py: 0x600-0x60c by default).

Facts (ACPI spec 6.x, 4.8 "ACPI Hardware Features": PM1 event, PM1 control, PM timer;
5.2.9 FADT RESET_REG):

    PM1a_EVT  +0 PM1_STS (16 bits, write 1 to clear): bit 0 TMR_STS, 8 PWRBTN_STS,
                 15 WAK_STS
              +2 PM1_EN  (16 bits): bit 0 TMR_EN, 8 PWRBTN_EN
    PM1a_CNT  16 bits: bit 0 SCI_EN (reads 1: there is no SMI command port, the machine
              is always in ACPI mode), 10-12 SLP_TYP, 13 SLP_EN (write-only)
    PM_TMR    32 bits (FADT TMR_VAL_EXT), 3.579545 MHz, read-only
    RESET     8 bits: writing the FADT's RESET_VALUE resets the machine

Design: writing SLP_EN with SLP_TYP = 5 (the DSDT's \\_S5) powers the machine off
(`on_poweroff`); other sleep types are not offered by the DSDT and are ignored. The PM
timer is computed from the machine's clock when read; TMR_STS is set when bit 31 of the
timer has changed since the last clear, and the SCI (level, ISA IRQ 9) follows
PM1_STS & PM1_EN, evaluated on every access (the overflow happens every ~20 minutes of
guest time, so no timer is armed for it). The power button is the fixed-feature one
(the FADT's PWR_BUTTON flag is clear): `press_power_button()` sets PWRBTN_STS, which
raises the SCI when the guest's OSPM enabled PWRBTN_EN (Linux's button driver does; it
then tells user space, whose handler powers off through S5).

Invariants: a handful of integers; no write raises; a wrong reset value is ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from pyhv.clock import Clock
from pyhv.devices.bus import BusDevice
from pyhv.devices.irq import IrqLine
from pyhv.devices.state import Reader

PM_TIMER_HZ = 3_579_545
STS_TMR = 1 << 0
STS_PWRBTN = 1 << 8
STS_WAK = 1 << 15
STS_WRITABLE = STS_TMR | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | STS_WAK
EN_WRITABLE = STS_TMR | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 10)
CNT_SCI_EN = 1 << 0
CNT_SLP_EN = 1 << 13
CNT_WRITABLE = 0x1C06            # SLP_TYP, GBL_RLS, BM_RLS (SCI_EN fixed at 1)


class AcpiPm:
    """PM1a event/control, PM timer and reset register, on the port bus."""

    def __init__(self, clock: Clock, sci: IrqLine, *, on_poweroff: Callable[[], None],
                 on_reset: Callable[[], None], evt: int = 0x600, cnt: int = 0x604,
                 tmr: int = 0x608, reset: int = 0x60C, reset_value: int = 0x01,
                 s5_slp_typ: int = 5) -> None:
        self.clock = clock
        self.sci = sci
        self.on_poweroff = on_poweroff
        self.on_reset = on_reset
        self.ports = (evt, cnt, tmr, reset)
        self.reset_value = reset_value
        self.s5 = s5_slp_typ
        self.sts = 0
        self.en = 0
        self.cnt = CNT_SCI_EN
        self._tmr_mark = 0        # bit 31 of the timer at the last TMR_STS update
        self._sci = False

    def regions(self) -> list[tuple[int, int, BusDevice, str]]:
        evt, cnt, tmr, reset = self.ports
        return [(evt, 4, _Block(self, 0), "acpi-pm1-evt"),
                (cnt, 2, _Block(self, 1), "acpi-pm1-cnt"),
                (tmr, 4, _Block(self, 2), "acpi-pm-timer"),
                (reset, 1, _Block(self, 3), "acpi-reset")]

    def press_power_button(self) -> None:
        """Run-loop thread: the user pressed the power button (PWRBTN_STS; the SCI
        follows if the guest enabled PWRBTN_EN)."""
        self.sts |= STS_PWRBTN
        self._update()

    @property
    def power_button_enabled(self) -> bool:
        """Whether the guest's OSPM listens to the power button (PWRBTN_EN)."""
        return bool(self.en & STS_PWRBTN)

    def timer(self) -> int:
        return (self.clock.now_ns() * PM_TIMER_HZ // 1_000_000_000) & 0xFFFFFFFF

    def _update(self) -> None:
        top = self.timer() >> 31
        if top != self._tmr_mark:
            self._tmr_mark = top
            self.sts |= STS_TMR
        level = bool(self.sts & self.en)
        if level != self._sci:
            self._sci = level
            self.sci.set_level(level)

    def read(self, block: int, offset: int, size: int) -> int:
        self._update()
        if block == 0:
            value = self.sts | (self.en << 16)
        elif block == 1:
            value = self.cnt
        elif block == 2:
            value = self.timer()
        else:
            return 0
        return (value >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write(self, block: int, offset: int, size: int, value: int) -> None:
        self._update()
        mask = ((1 << (8 * size)) - 1) << (8 * offset)
        value = (value << (8 * offset)) & mask
        if block == 0:
            self.sts &= ~(value & STS_WRITABLE)              # write 1 to clear
            en_mask = mask >> 16
            if en_mask:
                self.en = (self.en & ~en_mask) | ((value >> 16) & en_mask & EN_WRITABLE)
        elif block == 1:
            self.cnt = (self.cnt & ~(mask & CNT_WRITABLE)) | (value & CNT_WRITABLE) \
                | CNT_SCI_EN
            if value & CNT_SLP_EN and (value >> 10) & 7 == self.s5:
                self.on_poweroff()
        elif block == 3 and value & 0xFF == self.reset_value:
            self.on_reset()
        self._update()

    # ------------------------------------------------------------------ state records

    state_version: ClassVar[int] = 1

    def save_state(self) -> dict[str, Any]:
        return {"sts": self.sts, "en": self.en, "cnt": self.cnt,
                "tmr_mark": self._tmr_mark, "sci": self._sci}

    def load_state(self, record: Mapping[str, Any], version: int) -> None:
        r = Reader("acpi-pm", record)
        sts = r.int("sts", 0, STS_WRITABLE)
        en = r.int("en", 0, EN_WRITABLE)
        cnt = r.int("cnt", 0, 0xFFFF)
        tmr_mark = r.int("tmr_mark", 0, 1)
        sci = r.bool("sci")
        r.done()
        for name, v, ok in (("sts", sts, STS_WRITABLE), ("en", en, EN_WRITABLE),
                            ("cnt", cnt, CNT_WRITABLE | CNT_SCI_EN)):
            if v & ~ok:
                raise r.fail(name, f"= {v:#x} has bits the register cannot hold")
        self.sts, self.en, self.cnt, self._tmr_mark, self._sci = sts, en, cnt, tmr_mark, sci


class _Block:
    """One of the four port ranges of `AcpiPm`."""

    def __init__(self, pm: AcpiPm, block: int) -> None:
        self._pm = pm
        self._block = block

    def read(self, offset: int, size: int) -> int:
        return self._pm.read(self._block, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._pm.write(self._block, offset, size, value)
