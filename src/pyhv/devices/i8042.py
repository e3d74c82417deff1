"""The i8042 PS/2 controller: data port 0x60, status/command port 0x64, IRQ 1 and 12.

Facts (IBM PC/AT Technical Reference, "Keyboard Controller"; Intel 8042 data sheet;
the command list below is what Linux's drivers/input/serio/i8042.c and bare-metal code
send):

    0x60 read   output buffer: the next byte from the controller, keyboard or mouse
    0x60 write  data: a parameter of the last controller command, else a byte for the
                keyboard
    0x64 read   status: bit 0 OBF output buffer full, bit 2 SYS (command byte bit 2),
                bit 5 AUXB (the byte in the output buffer came from the aux port)
    0x64 write  controller command

    command byte ("CTR", controller RAM byte 0): bit 0 keyboard interrupt (IRQ 1),
    bit 1 aux interrupt (IRQ 12), bit 2 SYS flag, bit 4 keyboard disabled, bit 5 aux
    disabled, bit 6 scancode translation.

    0x20-0x3f read RAM byte n (0x20: the command byte)   0x60-0x7f write RAM byte n
    0xa7/0xa8 aux disable/enable      0xa9 aux interface test   -> 0x00 (ok)
    0xaa self-test                    -> 0x55                   0xab keyboard test -> 0x00
    0xad/0xae keyboard disable/enable 0xd0 read output port     0xd1 write output port
    0xd2 write keyboard output buffer 0xd3 write aux output buffer (Linux's AUX loop test)
    0xd4 write to the aux device      0xdd/0xdf A20 off/on
    0xf0-0xff pulse output lines low for 6 us: a 0 in bit 0 pulses the reset line
              (0xfe is the classic reboot)

Design:
- Status reads 0 when there is nothing to read (and SYS is clear): Linux's flush loop
  wants 0, never 0xff (docs/host.md). IBF is never set: commands complete at once.
- The output buffer is a queue bounded at OUTPUT_MAX bytes (each tagged keyboard or aux);
  anything beyond is dropped and counted (`dropped`), so no guest loop grows it.
- A keyboard answers its commands at once (0xfa ACK; 0xff reset -> 0xfa 0xaa; 0xf2
  identify -> 0xfa 0xab 0x83; 0xee echo -> 0xee; 0xed/0xf3/0xf0 take a parameter byte,
  0xf0 0 reads back the scancode set). A minimal PS/2 mouse on the aux port does the
  same (0xff -> 0xfa 0xaa 0x00; 0xf2 -> 0xfa 0x00; 0xe9 status -> 0xfa + 3 bytes), so
  probes never wait for a timeout. No host keystrokes or mouse motion are modelled.
- Reset: writing the output port with bit 0 clear (0xd1) or a pulse command with bit 0
  clear (0xfe) calls `on_reset()`; the machine decides to stop or restart.
- IRQ 1 (keyboard byte at the head of the queue, CTR bit 0) and IRQ 12 (aux byte, CTR
  bit 1) are levels that drop when the guest reads port 0x60; a following byte raises
  the line again, a fresh edge for an edge-triggered PIC.

Invariants: len(queue) <= OUTPUT_MAX; all state changes and `set_level` calls happen in
`read`/`write`, on the run-loop thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from pyhv.devices.bus import BusDevice
from pyhv.devices.irq import IrqLine
from pyhv.devices.state import Reader

DATA_PORT = 0x60
STATUS_PORT = 0x64
KBD_IRQ = 1
AUX_IRQ = 12
OUTPUT_MAX = 32

# Offsets, relative to DATA_PORT, seen by `read`/`write`.
DATA = 0
STATUS = 4

# Status register bits.
STAT_OBF = 0x01
STAT_SYS = 0x04
STAT_AUXB = 0x20

# Command byte bits.
CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYS = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40

# Output port bits.
OUT_RESET = 0x01      # active low: 0 holds the CPU in reset
OUT_A20 = 0x02

# Controller commands.
CMD_READ_RAM = 0x20
CMD_WRITE_RAM = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPUT = 0xD0
CMD_WRITE_OUTPUT = 0xD1
CMD_WRITE_KBD_OBUF = 0xD2
CMD_WRITE_AUX_OBUF = 0xD3
CMD_WRITE_AUX = 0xD4
CMD_A20_OFF = 0xDD
CMD_A20_ON = 0xDF
CMD_PULSE_RESET = 0xFE

ACK = 0xFA

# Device commands that take one parameter byte.
_KBD_PARAM_CMDS = frozenset({0xED, 0xF0, 0xF3})
_AUX_PARAM_CMDS = frozenset({0xE8, 0xF3})


class _Alias:
    """The controller seen at another base: adds a fixed delta to offsets."""

    def __init__(self, dev: I8042, delta: int) -> None:
        self._dev = dev
        self._delta = delta

    def read(self, offset: int, size: int) -> int:
        return self._dev.read(offset + self._delta, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._dev.write(offset + self._delta, size, value)


class I8042:
    """The PS/2 controller with a keyboard and a minimal mouse that only answer commands."""

    def __init__(self, kbd_irq: IrqLine, aux_irq: IrqLine,
                 on_reset: Callable[[], None]) -> None:
        self.kbd_irq = kbd_irq
        self.aux_irq = aux_irq
        self.on_reset = on_reset
        self.ram = bytearray(32)
        self.ram[0] = CTR_KBDINT | CTR_AUXINT | CTR_XLATE
        self.output_port = OUT_RESET | OUT_A20
        self._queue: deque[tuple[int, bool]] = deque()   # (byte, from aux)
        self._pending_cmd: int | None = None     # controller command awaiting its data
        self._kbd_cmd: int | None = None         # keyboard command awaiting its parameter
        self._aux_cmd: int | None = None         # mouse command awaiting its parameter
        self.scancode_set = 2
        self._levels = [False, False]            # kbd, aux
        self.dropped = 0
        self.resets = 0
        self.unknown_commands = 0

    @property
    def ctr(self) -> int:
        return self.ram[0]

    def regions(self) -> list[tuple[int, int, BusDevice, str]]:
        """(base, length, device, name) to register on the port bus (0x61 is not ours)."""
        return [(DATA_PORT, 1, self, "i8042-data"),
                (STATUS_PORT, 1, _Alias(self, STATUS), "i8042-cmd")]

    # ------------------------------------------------------------------ bus protocol

    def read(self, offset: int, size: int) -> int:
        if offset == STATUS:
            status = STAT_SYS if self.ctr & CTR_SYS else 0
            if self._queue:
                status |= STAT_OBF
                if self._queue[0][1]:
                    status |= STAT_AUXB
            return status
        if offset == DATA:
            if not self._queue:
                return 0
            value, _ = self._queue.popleft()
            self._set_levels(False, False)       # the guest took it: drop the line
            self._update_irqs()                  # the next byte is a fresh edge
            return value
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == STATUS:
            self._command(value)
        elif offset == DATA:
            self._data(value)

    # ------------------------------------------------------------------ controller

    def _command(self, cmd: int) -> None:
        self._pending_cmd = None
        if CMD_READ_RAM <= cmd < CMD_READ_RAM + 0x20:
            self._push(self.ram[cmd & 0x1F])
        elif CMD_WRITE_RAM <= cmd < CMD_WRITE_RAM + 0x20:
            self._pending_cmd = cmd
        elif cmd == CMD_AUX_DISABLE:
            self.ram[0] |= CTR_AUXDIS
        elif cmd == CMD_AUX_ENABLE:
            self.ram[0] &= ~CTR_AUXDIS
        elif cmd in (CMD_AUX_TEST, CMD_KBD_TEST):
            self._push(0x00)
        elif cmd == CMD_SELF_TEST:
            self._push(0x55)
        elif cmd == CMD_KBD_DISABLE:
            self.ram[0] |= CTR_KBDDIS
        elif cmd == CMD_KBD_ENABLE:
            self.ram[0] &= ~CTR_KBDDIS
        elif cmd == CMD_READ_OUTPUT:
            self._push(self.output_port)
        elif cmd in (CMD_WRITE_OUTPUT, CMD_WRITE_KBD_OBUF, CMD_WRITE_AUX_OBUF, CMD_WRITE_AUX):
            self._pending_cmd = cmd
        elif cmd == CMD_A20_OFF:
            self.output_port &= ~OUT_A20
        elif cmd == CMD_A20_ON:
            self.output_port |= OUT_A20
        elif cmd >= 0xF0:
            if not cmd & 0x01:                   # a 0 bit pulses that output line
                self._reset()
        else:
            self.unknown_commands += 1
        self._update_irqs()

    def _data(self, value: int) -> None:
        cmd, self._pending_cmd = self._pending_cmd, None
        if cmd is None:
            self._keyboard(value)
        elif CMD_WRITE_RAM <= cmd < CMD_WRITE_RAM + 0x20:
            self.ram[cmd & 0x1F] = value
        elif cmd == CMD_WRITE_OUTPUT:
            self.output_port = value
            if not value & OUT_RESET:
                self._reset()
        elif cmd == CMD_WRITE_KBD_OBUF:
            self._push(value)
        elif cmd == CMD_WRITE_AUX_OBUF:
            self._push(value, aux=True)
        elif cmd == CMD_WRITE_AUX:
            self._mouse(value)
        self._update_irqs()

    def _reset(self) -> None:
        self.resets += 1
        self.on_reset()

    # ------------------------------------------------------------------ devices

    def _keyboard(self, value: int) -> None:
        """A byte sent to the keyboard (writing port 0x60 with no controller command)."""
        cmd, self._kbd_cmd = self._kbd_cmd, None
        if cmd is not None:                      # the parameter of an earlier command
            self._push(ACK)
            if cmd == 0xF0:
                if value == 0:
                    self._push(self.scancode_set)
                elif value in (1, 2, 3):
                    self.scancode_set = value
            return
        if value == 0xFF:                        # reset: ACK, then self-test passed
            self.scancode_set = 2
            self._push(ACK)
            self._push(0xAA)
        elif value == 0xF2:                      # identify: an MF2 keyboard
            self._push(ACK)
            self._push(0xAB)
            self._push(0x83)
        elif value == 0xEE:                      # echo
            self._push(0xEE)
        else:
            if value in _KBD_PARAM_CMDS:
                self._kbd_cmd = value
            self._push(ACK)

    def _mouse(self, value: int) -> None:
        """A byte sent to the aux device (0xd4 then port 0x60)."""
        cmd, self._aux_cmd = self._aux_cmd, None
        if cmd is not None:
            self._push(ACK, aux=True)
            return
        self._push(ACK, aux=True)
        if value == 0xFF:                        # reset: self-test passed, ID 0
            self._push(0xAA, aux=True)
            self._push(0x00, aux=True)
        elif value == 0xF2:                      # identify: standard PS/2 mouse
            self._push(0x00, aux=True)
        elif value == 0xE9:                      # status: stream mode, res 2, 100/s
            for b in (0x00, 0x02, 0x64):
                self._push(b, aux=True)
        elif value == 0xEB:                      # read data: no motion
            for b in (0x08, 0x00, 0x00):
                self._push(b, aux=True)
        elif value in _AUX_PARAM_CMDS:
            self._aux_cmd = value

    # ------------------------------------------------------------------ output buffer

    def _push(self, value: int, aux: bool = False) -> None:
        if len(self._queue) >= OUTPUT_MAX:
            self.dropped += 1
            return
        self._queue.append((value & 0xFF, aux))

    def _update_irqs(self) -> None:
        kbd = aux = False
        if self._queue:
            if self._queue[0][1]:
                aux = bool(self.ctr & CTR_AUXINT)
            else:
                kbd = bool(self.ctr & CTR_KBDINT)
        self._set_levels(kbd, aux)

    def _set_levels(self, kbd: bool, aux: bool) -> None:
        if kbd != self._levels[0]:
            self._levels[0] = kbd
            self.kbd_irq.set_level(kbd)
        if aux != self._levels[1]:
            self._levels[1] = aux
            self.aux_irq.set_level(aux)

    # ------------------------------------------------------------------ state records

    state_version: ClassVar[int] = 1

    def save_state(self) -> dict[str, Any]:
        return {"ram": self.ram.hex(), "output_port": self.output_port,
                "queue": [[b, aux] for b, aux in self._queue],
                "pending_cmd": self._pending_cmd, "kbd_cmd": self._kbd_cmd,
                "aux_cmd": self._aux_cmd, "scancode_set": self.scancode_set,
                "levels": list(self._levels)}

    def load_state(self, record: Mapping[str, Any], version: int) -> None:
        r = Reader("i8042", record)
        ram = r.hex("ram", length=32)
        output_port = r.int("output_port", 0, 0xFF)
        items = r.subs_list("queue", max_len=OUTPUT_MAX)
        queue: list[tuple[int, bool]] = []
        for i, item in enumerate(items):
            if not (isinstance(item, list) and len(item) == 2 and type(item[0]) is int
                    and 0 <= item[0] <= 0xFF and type(item[1]) is bool):
                raise r.fail("queue", f"[{i}] is not a [byte, from-mouse] pair")
            queue.append((item[0], item[1]))
        cmds = [r.opt_int(k, 0, 0xFF) for k in ("pending_cmd", "kbd_cmd", "aux_cmd")]
        scancode_set = r.int("scancode_set", 0, 0xFF)
        levels = r.bools("levels", length=2)
        r.done()
        self.ram[:] = ram
        self.output_port = output_port
        self._queue = deque(queue)
        self._pending_cmd, self._kbd_cmd, self._aux_cmd = cmds
        self.scancode_set = scancode_set
        self._levels = levels
