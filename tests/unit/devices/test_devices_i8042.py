"""i8042: status, self-tests, command byte, keyboard/mouse answers, IRQs, reset."""

from __future__ import annotations

from pyhv.devices import i8042 as k
from pyhv.devices.bus import Bus
from pyhv.devices.i8042 import I8042
from pyhv.devices.irq import RecordingIrq


class Rig:
    def __init__(self) -> None:
        self.kbd, self.aux = RecordingIrq(), RecordingIrq()
        self.resets = 0
        self.dev = I8042(self.kbd, self.aux, self._reset)
        self.bus = Bus("pio", strict=True)
        for base, length, d, name in self.dev.regions():
            self.bus.register(base, length, d, name)

    def _reset(self) -> None:
        self.resets += 1

    def status(self) -> int:
        return self.bus.read(k.STATUS_PORT, 1)

    def cmd(self, c: int) -> None:
        self.bus.write(k.STATUS_PORT, 1, c)

    def data(self, v: int) -> None:
        self.bus.write(k.DATA_PORT, 1, v)

    def drain(self) -> list[int]:
        out = []
        while self.status() & k.STAT_OBF:
            out.append(self.bus.read(k.DATA_PORT, 1))
        return out


def test_status_is_zero_when_empty() -> None:
    r = Rig()
    assert r.status() == 0
    assert r.bus.read(k.DATA_PORT, 1) == 0


def test_port_0x61_is_not_claimed() -> None:
    r = Rig()
    assert r.bus.find(0x61) is None


def test_self_tests() -> None:
    r = Rig()
    r.cmd(k.CMD_SELF_TEST)
    assert r.status() & k.STAT_OBF
    assert r.drain() == [0x55]
    r.cmd(k.CMD_KBD_TEST)
    assert r.drain() == [0x00]
    r.cmd(k.CMD_AUX_TEST)
    assert r.drain() == [0x00]


def test_command_byte_read_write_and_enable_bits() -> None:
    r = Rig()
    r.cmd(k.CMD_READ_RAM)
    ctr = r.drain()[0]
    assert ctr & k.CTR_KBDINT
    r.cmd(k.CMD_WRITE_RAM)
    r.data(0x47)
    r.cmd(k.CMD_READ_RAM)
    assert r.drain() == [0x47]
    assert r.status() == k.STAT_SYS           # SYS mirrors command byte bit 2
    r.cmd(k.CMD_KBD_DISABLE)
    r.cmd(k.CMD_AUX_DISABLE)
    r.cmd(k.CMD_READ_RAM)
    assert r.drain() == [0x47 | k.CTR_KBDDIS | k.CTR_AUXDIS]
    r.cmd(k.CMD_KBD_ENABLE)
    r.cmd(k.CMD_AUX_ENABLE)
    r.cmd(k.CMD_READ_RAM)
    assert r.drain() == [0x47]


def test_keyboard_commands_are_acked() -> None:
    r = Rig()
    r.data(0xFF)
    assert r.drain() == [0xFA, 0xAA]
    r.data(0xF2)
    assert r.drain() == [0xFA, 0xAB, 0x83]
    r.data(0xED)                              # set LEDs + parameter
    r.data(0x07)
    assert r.drain() == [0xFA, 0xFA]
    r.data(0xF0)                              # get scancode set
    r.data(0x00)
    assert r.drain() == [0xFA, 0xFA, 0x02]
    r.data(0xF4)
    assert r.drain() == [0xFA]
    r.data(0xEE)
    assert r.drain() == [0xEE]


def test_keyboard_irq_follows_command_byte() -> None:
    r = Rig()
    r.cmd(k.CMD_WRITE_RAM)
    r.data(k.CTR_KBDINT)
    r.data(0xFF)                              # two bytes queued
    assert r.kbd.level and r.kbd.raises == 1
    r.bus.read(k.DATA_PORT, 1)
    assert r.kbd.level and r.kbd.raises == 2  # the second byte is a new edge
    r.bus.read(k.DATA_PORT, 1)
    assert not r.kbd.level
    r.cmd(k.CMD_WRITE_RAM)
    r.data(0)                                 # interrupts off
    r.data(0xF4)
    assert not r.kbd.level and r.kbd.raises == 2
    assert r.drain() == [0xFA]


def test_aux_loop_and_irq12() -> None:
    r = Rig()
    r.cmd(k.CMD_WRITE_RAM)
    r.data(k.CTR_KBDINT | k.CTR_AUXINT)
    r.cmd(k.CMD_WRITE_AUX_OBUF)
    r.data(0x5A)
    assert r.status() & (k.STAT_OBF | k.STAT_AUXB) == k.STAT_OBF | k.STAT_AUXB
    assert r.aux.level and not r.kbd.level
    assert r.drain() == [0x5A]
    assert not r.aux.level
    r.cmd(k.CMD_WRITE_KBD_OBUF)
    r.data(0x33)
    assert r.kbd.level
    assert r.drain() == [0x33]


def test_mouse_answers() -> None:
    r = Rig()
    r.cmd(k.CMD_WRITE_AUX)
    r.data(0xFF)
    assert r.drain() == [0xFA, 0xAA, 0x00]
    r.cmd(k.CMD_WRITE_AUX)
    r.data(0xF2)
    assert r.drain() == [0xFA, 0x00]
    r.cmd(k.CMD_WRITE_AUX)
    r.data(0xF3)
    r.cmd(k.CMD_WRITE_AUX)
    r.data(100)
    assert r.drain() == [0xFA, 0xFA]


def test_reset_by_pulse_and_by_output_port() -> None:
    r = Rig()
    r.cmd(k.CMD_PULSE_RESET)
    assert r.resets == 1
    r.cmd(0xFF)                               # pulses nothing
    assert r.resets == 1
    r.cmd(k.CMD_READ_OUTPUT)
    out = r.drain()[0]
    assert out & k.OUT_RESET
    r.cmd(k.CMD_WRITE_OUTPUT)
    r.data(out | k.OUT_RESET)                 # bit 0 set: no reset
    assert r.resets == 1
    r.cmd(k.CMD_WRITE_OUTPUT)
    r.data(out & ~k.OUT_RESET & 0xFF)
    assert r.resets == 2


def test_output_buffer_is_bounded() -> None:
    r = Rig()
    for _ in range(100):
        r.cmd(k.CMD_SELF_TEST)
    assert len(r.drain()) == k.OUTPUT_MAX
    assert r.dev.dropped == 100 - k.OUTPUT_MAX
