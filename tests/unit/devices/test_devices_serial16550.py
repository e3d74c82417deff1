"""16550A UART: the Linux 8250 probe, interrupts, FIFO bounds, host input."""

from __future__ import annotations

import threading

from pyhv.devices import serial16550 as s
from pyhv.devices.bus import Bus
from pyhv.devices.irq import RecordingIrq
from pyhv.devices.serial16550 import Serial16550

BASE = s.PORT


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def __call__(self, b: bytes) -> None:
        self.data += b


def make() -> tuple[Bus, Serial16550, RecordingIrq, Sink]:
    irq, sink = RecordingIrq(), Sink()
    uart = Serial16550(irq, sink)
    bus = Bus("pio", strict=True)
    for base, length, dev, name in uart.regions():
        bus.register(base, length, dev, name)
    return bus, uart, irq, sink


def rd(bus: Bus, off: int) -> int:
    return bus.read(BASE + off, 1)


def wr(bus: Bus, off: int, v: int) -> None:
    bus.write(BASE + off, 1, v)


def test_linux_8250_probe_finds_a_16550a() -> None:
    bus, _, _, _ = make()
    # autoconfig: IER must hold its low 4 bits and nothing else.
    wr(bus, s.IER, 0)
    assert rd(bus, s.IER) == 0
    wr(bus, s.IER, 0xFF)
    assert rd(bus, s.IER) == 0x0F
    wr(bus, s.IER, 0)
    # scratch register
    for v in (0xA5, 0x5A):
        wr(bus, s.SCR, v)
        assert rd(bus, s.SCR) == v
    # loopback: MCR = LOOP|OUT2|RTS -> MSR & 0xf0 == DCD|CTS
    wr(bus, s.MCR, s.MCR_LOOP | 0x0A)
    assert rd(bus, s.MSR) & 0xF0 == 0x90
    wr(bus, s.MCR, s.MCR_LOOP | 0x05)       # DTR|OUT1 -> DSR|RI
    assert rd(bus, s.MSR) & 0xF0 == 0x60
    wr(bus, s.MCR, 0)
    assert rd(bus, s.MSR) & 0xF0 == s.MSR_CONNECTED
    # FIFO detection: IIR >> 6 == 3 once FCR enables the FIFOs, and bit 5 stays 0.
    assert rd(bus, s.IIR) >> 6 == 0
    wr(bus, s.FCR, s.FCR_ENABLE)
    assert rd(bus, s.IIR) >> 6 == 3
    wr(bus, s.FCR, s.FCR_ENABLE | 0x20)
    assert rd(bus, s.IIR) >> 5 == 6
    # With DLAB set (the EFR probe), offset 2 still reads IIR: never 0.
    wr(bus, s.LCR, 0xBF)
    assert rd(bus, s.IIR) != 0
    wr(bus, s.LCR, 0x03)
    # LSR: transmitter empty, no data.
    assert rd(bus, s.LSR) == s.LSR_THRE | s.LSR_TEMT


def test_divisor_latch_behind_dlab() -> None:
    bus, uart, _, sink = make()
    wr(bus, s.LCR, 0x83)
    wr(bus, s.DLL, 0x01)
    wr(bus, s.DLM, 0x00)
    assert rd(bus, s.DLL) == 1 and rd(bus, s.DLM) == 0
    wr(bus, s.LCR, 0x03)
    assert uart.divisor == 1
    assert rd(bus, s.IER) == 0
    assert sink.data == b""                   # DLL writes are not transmitted


def test_transmit_goes_to_sink() -> None:
    bus, uart, _, sink = make()
    for c in b"hello\n":
        wr(bus, s.THR, c)
    assert sink.data == b"hello\n"
    assert uart.tx_bytes == 6


def test_loopback_transmits_to_receiver() -> None:
    bus, _, _, sink = make()
    wr(bus, s.MCR, s.MCR_LOOP)
    wr(bus, s.THR, 0x42)
    assert sink.data == b""
    assert rd(bus, s.LSR) & s.LSR_DR
    assert rd(bus, s.RBR) == 0x42
    assert not rd(bus, s.LSR) & s.LSR_DR


def test_thre_interrupt_raise_and_clear() -> None:
    bus, _, irq, _ = make()
    assert rd(bus, s.IIR) & 0x0F == s.IIR_NONE
    wr(bus, s.IER, s.IER_THRE)                # enabling with THR empty: interrupt
    assert irq.level
    assert rd(bus, s.IIR) & 0x0F == s.IIR_THRE
    assert not irq.level                      # reading IIR cleared it
    assert rd(bus, s.IIR) & 0x0F == s.IIR_NONE
    # Each transmitted byte re-arms it, as a fresh edge.
    raises = irq.raises
    wr(bus, s.THR, ord("x"))
    assert irq.level and irq.raises == raises + 1
    assert rd(bus, s.IIR) & 0x0F == s.IIR_THRE
    # Linux's startup test: IER=THRI, IIR, IER=0, IER=THRI, IIR -> interrupt both times.
    wr(bus, s.IER, s.IER_THRE)
    wr(bus, s.IER, 0)
    assert not irq.level
    wr(bus, s.IER, s.IER_THRE)
    assert rd(bus, s.IIR) & 0x01 == 0


def test_rda_interrupt_raise_clear_and_priority() -> None:
    bus, uart, irq, _ = make()
    wr(bus, s.IER, s.IER_RDA | s.IER_THRE)
    assert rd(bus, s.IIR) & 0x0F == s.IIR_THRE
    assert uart.feed(b"ab") == 2
    assert not irq.level                      # feed alone never touches the line
    uart.poll()
    assert irq.level
    assert rd(bus, s.IIR) & 0x0F == s.IIR_RDA  # RDA outranks THRE
    assert rd(bus, s.RBR) == ord("a")
    assert irq.level
    assert rd(bus, s.RBR) == ord("b")
    assert not irq.level                      # reading RBR empty cleared RDA
    assert rd(bus, s.IIR) & 0x0F == s.IIR_NONE


def test_fifo_trigger_level_and_timeout() -> None:
    bus, uart, _, _ = make()
    wr(bus, s.FCR, s.FCR_ENABLE | 0xC0)       # trigger at 14
    wr(bus, s.IER, s.IER_RDA)
    uart.feed(b"x" * 3)
    uart.poll()
    assert rd(bus, s.IIR) == 0xC0 | s.IIR_TIMEOUT
    uart.feed(b"x" * 11)
    uart.poll()
    assert rd(bus, s.IIR) == 0xC0 | s.IIR_RDA
    wr(bus, s.FCR, s.FCR_ENABLE | s.FCR_CLEAR_RX)
    assert not rd(bus, s.LSR) & s.LSR_DR
    assert rd(bus, s.IIR) == 0xC1


def test_rx_fifo_and_pending_are_bounded() -> None:
    bus, uart, _, _ = make()
    big = bytes(range(256)) * 40              # 10240 bytes
    accepted = uart.feed(big)
    assert accepted == s.PENDING_MAX
    assert uart.rx_dropped == len(big) - s.PENDING_MAX
    uart.poll()
    assert len(uart._rx) == s.RX_FIFO_SIZE
    # Nothing is lost between pending and the FIFO: reads drain in order.
    got = bytearray()
    while rd(bus, s.LSR) & s.LSR_DR:
        got.append(rd(bus, s.RBR))
    assert bytes(got) == big[:accepted]


def test_loopback_overrun_sets_oe_and_line_status_interrupt() -> None:
    bus, uart, irq, _ = make()
    wr(bus, s.MCR, s.MCR_LOOP)
    wr(bus, s.IER, s.IER_RLS)
    for i in range(s.RX_FIFO_SIZE + 5):
        wr(bus, s.THR, i & 0xFF)
    assert len(uart._rx) == s.RX_FIFO_SIZE
    assert uart.rx_overruns == 5
    assert irq.level
    assert rd(bus, s.IIR) & 0x0F == s.IIR_RLS
    assert rd(bus, s.LSR) & s.LSR_OE
    assert not irq.level
    assert not rd(bus, s.LSR) & s.LSR_OE


def test_modem_status_interrupt_in_loopback() -> None:
    bus, _, irq, _ = make()
    wr(bus, s.MCR, s.MCR_LOOP)
    rd(bus, s.MSR)                            # clear deltas from entering loopback
    wr(bus, s.IER, s.IER_MS)
    wr(bus, s.MCR, s.MCR_LOOP | s.MCR_RTS)
    assert irq.level
    assert rd(bus, s.IIR) & 0x0F == s.IIR_MS
    msr = rd(bus, s.MSR)
    assert msr & s.MSR_DCTS and msr & s.MSR_CTS
    assert not irq.level


def test_feed_from_another_thread() -> None:
    bus, uart, _, _ = make()
    data = b"0123456789" * 20

    def writer() -> None:
        for i in range(0, len(data), 7):
            uart.feed(data[i:i + 7])

    t = threading.Thread(target=writer)
    t.start()
    t.join()
    uart.poll()
    got = bytearray()
    while rd(bus, s.LSR) & s.LSR_DR:
        got.append(rd(bus, s.RBR))
    assert bytes(got) == data


def test_rbr_read_when_empty_returns_zero() -> None:
    bus, _, _, _ = make()
    assert rd(bus, s.RBR) == 0


def test_interrupt_driven_output_like_linux_user_space() -> None:
    """start_tx sets IER.THRI; each interrupt: read IIR, write a FIFO's worth, repeat."""
    bus, _, irq, sink = make()
    wr(bus, s.FCR, s.FCR_ENABLE | s.FCR_CLEAR_RX | s.FCR_CLEAR_TX)
    text = b"the quick brown fox jumps over the lazy dog\n" * 3
    pos = 0
    wr(bus, s.IER, s.IER_RDA | s.IER_THRE)       # __start_tx
    interrupts = 0
    while irq.level:                              # the PIC saw an edge: run the handler
        interrupts += 1
        iir = rd(bus, s.IIR)
        assert iir & 0x0F == s.IIR_THRE and not irq.level
        if rd(bus, s.LSR) & s.LSR_THRE:
            chunk, pos = text[pos:pos + 16], pos + 16
            for c in chunk:
                wr(bus, s.THR, c)
            if pos >= len(text):
                wr(bus, s.IER, s.IER_RDA)         # __stop_tx
        assert interrupts < 100
    assert bytes(sink.data) == text
    assert interrupts == -(-len(text) // 16)
    # The last chunk raises the line once more before __stop_tx drops it (as on the chip).
    assert irq.raises == interrupts + 1
