"""The 16550A UART: COM1 at I/O port 0x3f8, IRQ 4.

Register map (National Semiconductor PC16550D datasheet, "Register Description" /
table II; offsets from the base port; DLAB = LCR bit 7):

    off  read                      write                     DLAB=1
    0    RBR receive buffer        THR transmit holding      DLL divisor latch, low
    1    IER interrupt enable      IER                       DLM divisor latch, high
    2    IIR interrupt ident       FCR FIFO control
    3    LCR line control          LCR
    4    MCR modem control         MCR
    5    LSR line status           (ignored: factory test)
    6    MSR modem status          (ignored)
    7    SCR scratch               SCR

Design:
- Transmission is instant: a byte written to THR goes straight to the output sink
  (`Callable[[bytes], None]`, given at construction), so LSR always shows THRE and TEMT
  and the transmitter is always empty.
- Receive is a FIFO bounded at 64 bytes (RX_FIFO_SIZE). Host input reaches it in two
  steps, because it comes from another thread (the stdin reader):
    1. `feed(data)` (any thread) only appends to a bounded pending buffer under a lock
       and returns how many bytes it accepted; the rest is dropped and counted
       (`rx_dropped`). It never touches the IRQ line.
    2. `poll()` (run-loop thread only) moves pending bytes into the FIFO while there is
       room and updates the IRQ line. The run loop calls it whenever it services I/O or
       timers; a guest read of RBR also refills the FIFO from the pending buffer.
  So every register access and every `set_level` call happens on the run-loop thread.
  (vm-superio bounds its FIFO for the same reason: CVE-2020-27173, a guest must never
  be able to make the VMM's memory grow.)
- Loopback (MCR bit 4): transmitted bytes go to the receive FIFO instead of the sink
  (a full FIFO sets the overrun bit, LSR bit 1), and MSR's status bits mirror MCR
  (datasheet, MCR bit 4): CTS=RTS, DSR=DTR, RI=OUT1, DCD=OUT2. Linux's 8250 probe
  writes MCR=0x1a and expects MSR&0xf0 == 0x90. Outside loopback the modem lines read
  as a connected terminal: DCD, DSR and CTS high (MSR = 0xb0).
- FIFO detection: IIR bits 7:6 read 11 while FCR bit 0 has enabled the FIFOs, which is
  how Linux tells a 16550A; IIR bit 5 (the 16750's 64-byte FIFO) is always 0. IER keeps
  only its 4 defined bits, so the probes for the XScale/16750 variants fail cleanly.
- Interrupts (datasheet table IV, highest priority first):
      IIR 0x06 receiver line status (overrun)   cleared by reading LSR
      IIR 0x04 received data available           cleared when the FIFO drops below the
      IIR 0x0c character timeout (FIFO mode)       trigger level / empties (reading RBR)
      IIR 0x02 THR empty                         cleared by reading IIR (when it is the
                                                  source shown) or by writing THR
      IIR 0x00 modem status                      cleared by reading MSR
  RDA is reported as 0x04 when the FIFO holds at least the trigger level (FCR bits 7:6)
  and as 0x0c (timeout) below it: with no notion of character time, a partial FIFO
  times out at once. The THRE interrupt is armed when the guest enables it (IER bit 1
  going 0 -> 1) while the transmitter is empty, and after every transmitted byte, as
  Linux's startup test ("real 16550s should always reassert this interrupt") and its
  interrupt-driven console output from user space expect.
- The interrupt output is not gated by MCR.OUT2 (QEMU does not gate it either), so
  bare-metal guests that never set OUT2 still get interrupts.
- The IRQ line is driven as a level (the chip's INTRPT pin): `set_level` is only called
  when the level changes, so after the guest has serviced an interrupt (read IIR, RBR,
  LSR or MSR) the next one appears as a fresh low->high edge for an edge-triggered PIC.

Invariants: at most RX_FIFO_SIZE bytes in the FIFO and PENDING_MAX bytes pending,
whatever the guest or the host sends; IER & 0xf0 == 0; LSR THRE and TEMT always set.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from pyhv.devices.bus import BusDevice
from pyhv.devices.irq import IrqLine
from pyhv.devices.state import Reader

PORT = 0x3F8          # COM1
LENGTH = 8
IRQ = 4

RX_FIFO_SIZE = 64     # vm-superio's bound; a 16550A's real FIFO is 16 bytes
PENDING_MAX = 4096    # host input waiting for FIFO room

# Register offsets.
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

# IER bits.
IER_RDA = 0x01
IER_THRE = 0x02
IER_RLS = 0x04
IER_MS = 0x08

# IIR values.
IIR_NONE = 0x01
IIR_RLS = 0x06
IIR_RDA = 0x04
IIR_TIMEOUT = 0x0C
IIR_THRE = 0x02
IIR_MS = 0x00
IIR_FIFO_ENABLED = 0xC0

# FCR bits.
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
_TRIGGER_LEVELS = (1, 4, 8, 14)

# LCR bits.
LCR_DLAB = 0x80

# MCR bits.
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10

# LSR bits.
LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

# MSR bits.
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_CONNECTED = MSR_DCD | MSR_DSR | MSR_CTS


class Serial16550:
    """One 16550A UART. Register accesses, `poll()` and the IRQ: run-loop thread only."""

    def __init__(self, irq: IrqLine, output: Callable[[bytes], None]) -> None:
        self.irq = irq
        self.output = output
        self._lock = threading.Lock()
        self._pending = bytearray()      # host input, guarded by _lock
        self._rx: deque[int] = deque()
        self.ier = 0
        self.lcr = 0x03                  # 8N1
        self.mcr = MCR_OUT2
        self.scr = 0
        self.divisor = 12                # 9600 baud
        self.fifo_enabled = False
        self.trigger = 1
        self.overrun = False
        self.msr_delta = 0
        self.thre_pending = False
        self._irq_level = False
        # Counters for --stats.
        self.tx_bytes = 0
        self.rx_bytes = 0
        self.rx_dropped = 0              # host input refused by feed()
        self.rx_overruns = 0             # loopback bytes lost to a full FIFO

    def regions(self) -> list[tuple[int, int, BusDevice, str]]:
        """(base, length, device, name) to register on the port bus."""
        return [(PORT, LENGTH, self, "serial16550")]

    # ------------------------------------------------------------------ host side

    def feed(self, data: bytes) -> int:
        """Queue host input (any thread). Returns how many bytes were accepted."""
        with self._lock:
            room = PENDING_MAX - len(self._pending)
            take = min(room, len(data))
            self._pending += data[:take]
            self.rx_dropped += len(data) - take
        return take

    def poll(self) -> None:
        """Move queued host input into the FIFO and update the IRQ (run-loop thread)."""
        if self._pending:                # unlocked peek: a race only delays to the next poll
            self._refill()
        self._update_irq()

    def _refill(self) -> None:
        with self._lock:
            room = RX_FIFO_SIZE - len(self._rx)
            if room <= 0 or not self._pending:
                return
            chunk = bytes(self._pending[:room])
            del self._pending[:room]
        self._rx.extend(chunk)
        self.rx_bytes += len(chunk)

    # ------------------------------------------------------------------ bus protocol

    def read(self, offset: int, size: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR:
            if dlab:
                return self.divisor & 0xFF
            value = self._rx.popleft() if self._rx else 0
            if self._pending:
                self._refill()
            self._update_irq()
            return value
        if offset == IER:
            return (self.divisor >> 8) & 0xFF if dlab else self.ier
        if offset == IIR:
            iir = self._iir()
            if iir == IIR_THRE:
                self.thre_pending = False
                self._update_irq()
            return iir | (IIR_FIFO_ENABLED if self.fifo_enabled else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            lsr = LSR_THRE | LSR_TEMT
            if self._rx:
                lsr |= LSR_DR
            if self.overrun:
                lsr |= LSR_OE
                self.overrun = False
                self._update_irq()
            return lsr
        if offset == MSR:
            value = self._msr_status() | self.msr_delta
            if self.msr_delta:
                self.msr_delta = 0
                self._update_irq()
            return value
        if offset == SCR:
            return self.scr
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        dlab = self.lcr & LCR_DLAB
        if offset == THR:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
                return
            self._transmit(value)
        elif offset == IER:
            if dlab:
                self.divisor = (self.divisor & 0x00FF) | (value << 8)
                return
            old = self.ier
            self.ier = value & 0x0F
            if self.ier & IER_THRE and not old & IER_THRE:
                self.thre_pending = True      # the transmitter is always empty
            self._update_irq()
        elif offset == FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self._write_mcr(value & 0x1F)
        elif offset == SCR:
            self.scr = value
        # LSR and MSR writes (factory test) are ignored.

    # ------------------------------------------------------------------ internals

    def _transmit(self, value: int) -> None:
        self.tx_bytes += 1
        if self.mcr & MCR_LOOP:
            if len(self._rx) < RX_FIFO_SIZE:
                self._rx.append(value)
            else:
                self.overrun = True
                self.rx_overruns += 1
        else:
            self.output(bytes((value,)))
        # THR was written (clearing THRE) and is empty again at once. If the line was
        # still high (the guest never read IIR), it stays high: no new edge, as on the
        # chip; Linux reads IIR first, which drops it.
        self.thre_pending = True
        self._update_irq()

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & FCR_ENABLE)
        if enable != self.fifo_enabled:
            self._rx.clear()              # changing FCR bit 0 resets both FIFOs
        self.fifo_enabled = enable
        if value & FCR_CLEAR_RX:
            self._rx.clear()
        self.trigger = _TRIGGER_LEVELS[value >> 6] if enable else 1
        if self._pending:
            self._refill()
        self._update_irq()

    def _write_mcr(self, value: int) -> None:
        before = self._msr_status()
        self.mcr = value
        after = self._msr_status()
        changed = before ^ after
        if changed & MSR_CTS:
            self.msr_delta |= MSR_DCTS
        if changed & MSR_DSR:
            self.msr_delta |= MSR_DDSR
        if changed & MSR_DCD:
            self.msr_delta |= MSR_DDCD
        if before & MSR_RI and not after & MSR_RI:
            self.msr_delta |= MSR_TERI      # trailing edge of RI
        self._update_irq()

    def _msr_status(self) -> int:
        """MSR bits 7:4 (the line states)."""
        if not self.mcr & MCR_LOOP:
            return MSR_CONNECTED
        m = self.mcr
        return ((MSR_CTS if m & MCR_RTS else 0) | (MSR_DSR if m & MCR_DTR else 0)
                | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))

    def _iir(self) -> int:
        """The highest-priority pending interrupt (IIR bits 3:0)."""
        ier = self.ier
        if ier & IER_RLS and self.overrun:
            return IIR_RLS
        if ier & IER_RDA and self._rx:
            return IIR_RDA if len(self._rx) >= self.trigger else IIR_TIMEOUT
        if ier & IER_THRE and self.thre_pending:
            return IIR_THRE
        if ier & IER_MS and self.msr_delta:
            return IIR_MS
        return IIR_NONE

    def _update_irq(self) -> None:
        self._set_irq(self._iir() != IIR_NONE)

    def _set_irq(self, high: bool) -> None:
        if high != self._irq_level:
            self._irq_level = high
            self.irq.set_level(high)

    # ------------------------------------------------------------------ state records

    state_version: ClassVar[int] = 1

    def save_state(self) -> dict[str, Any]:
        """The registers, the receive FIFO and the host input not yet in it (bytes the
        user typed are the guest's once accepted)."""
        with self._lock:
            pending = bytes(self._pending)
        return {"ier": self.ier, "lcr": self.lcr, "mcr": self.mcr, "scr": self.scr,
                "divisor": self.divisor, "fifo_enabled": self.fifo_enabled,
                "trigger": self.trigger, "overrun": self.overrun,
                "msr_delta": self.msr_delta, "thre_pending": self.thre_pending,
                "irq_level": self._irq_level, "rx": bytes(self._rx).hex(),
                "pending": pending.hex()}

    def load_state(self, record: Mapping[str, Any], version: int) -> None:
        r = Reader("serial", record)
        ier = r.int("ier", 0, 0x0F)
        lcr = r.int("lcr", 0, 0xFF)
        mcr = r.int("mcr", 0, 0x1F)
        scr = r.int("scr", 0, 0xFF)
        divisor = r.int("divisor", 0, 0xFFFF)
        fifo_enabled = r.bool("fifo_enabled")
        trigger = r.int("trigger", 1, 14)
        if trigger not in _TRIGGER_LEVELS:
            raise r.fail("trigger", f"= {trigger} is not a trigger level "
                         f"{_TRIGGER_LEVELS}")
        overrun = r.bool("overrun")
        msr_delta = r.int("msr_delta", 0, MSR_DCTS | MSR_DDSR | MSR_TERI | MSR_DDCD)
        thre_pending = r.bool("thre_pending")
        irq_level = r.bool("irq_level")
        rx = r.hex("rx", max_len=RX_FIFO_SIZE)
        pending = r.hex("pending", max_len=PENDING_MAX)
        r.done()
        self.ier, self.lcr, self.mcr, self.scr = ier, lcr, mcr, scr
        self.divisor, self.fifo_enabled, self.trigger = divisor, fifo_enabled, trigger
        self.overrun, self.msr_delta, self.thre_pending = overrun, msr_delta, thre_pending
        self._irq_level = irq_level
        self._rx = deque(rx)
        with self._lock:
            self._pending = bytearray(pending)
