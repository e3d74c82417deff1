"""MSI-X (devices/pci/msix.py) and the virtio transport's use of it: the capability,
the table and PBA in BAR 1, masking and pending bits, message decoding onto the APIC bus
(a real LocalApic receives the vector), and hostile accesses: odd sizes, straddling,
reserved bits, writes to the PBA, addresses that are not the APIC's, vectors the
function does not have."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_devices_virtio import ready
from virtio_driver import TestMachine

from pyhv.clock import TimerQueue, VirtualClock
from pyhv.devices.apicbus import FIXED, LOWEST, NMI, ApicBus, Message
from pyhv.devices.lapic import LocalApic
from pyhv.devices.pci import config as C
from pyhv.devices.pci.msix import PBA_OFFSET, Msix, decode
from pyhv.devices.virtio import transport as T


def make(n: int = 4) -> tuple[Msix, list[Message]]:
    sent: list[Message] = []
    return Msix(C.ConfigSpace(), n, 1, sent.append), sent


def enable(x: Msix, mask: bool = False) -> None:
    x.config.write(x.cap + 2, 2, C_ENABLE | (C_MASK if mask else 0))
    x.control_written()


C_ENABLE, C_MASK = 1 << 15, 1 << 14


def program(x: Msix, v: int, vector: int, dest: int = 0, masked: bool = False) -> None:
    x.write(v * 16, 4, 0xFEE00000 | dest << 12)
    x.write(v * 16 + 4, 4, 0)
    x.write(v * 16 + 8, 4, vector)
    x.write(v * 16 + 12, 4, int(masked))


def test_decode() -> None:
    assert decode(0xFEE01000, 0x41) == Message(vector=0x41, mode=FIXED, dest=1)
    assert decode(0xFEE0300C, 0x141) == Message(vector=0x41, mode=LOWEST, logical=True,
                                                dest=3)
    assert decode(0xFEE00000, 0x400) == Message(vector=0, mode=NMI, dest=0)
    assert decode(0xFED00000, 0x41) is None                 # not the APIC's window
    assert decode(0x1_FEE00000, 0x41) is None               # above 4 GiB
    for mode in (2, 3, 5, 6, 7):                            # SMI, reserved, INIT, SIPI..
        assert decode(0xFEE00000, mode << 8 | 0x41) is None


def test_capability_and_reset_state() -> None:
    x, _ = make(3)
    assert x.config.get(x.cap, 1) == C.CAP_ID_MSIX
    assert x.config.get(x.cap + 2, 2) == 2                  # N-1, disabled, unmasked
    assert x.config.get(x.cap + 4, 4) == 1 and x.config.get(x.cap + 8, 4) == PBA_OFFSET | 1
    x.config.write(x.cap + 2, 2, 0xFFFF)                    # only enable + mask stick
    assert x.config.get(x.cap + 2, 2) == 0xC002
    assert all(x.read(v * 16 + 12, 4) == 1 for v in range(3))   # every entry masked


def test_send_mask_pending_unmask() -> None:
    x, sent = make()
    enable(x)
    program(x, 1, 0x41, dest=2, masked=True)
    assert x.signal(1) and sent == [] and x.read(PBA_OFFSET, 8) == 0b10
    x.write(16 + 12, 4, 0)                                  # unmask: the held message
    assert sent == [Message(vector=0x41, dest=2)] and x.read(PBA_OFFSET, 8) == 0
    assert x.signal(1) and len(sent) == 2
    enable(x, mask=True)                                    # function mask
    assert x.signal(1) and len(sent) == 2 and x.pending == 0b10
    enable(x)
    assert len(sent) == 3 and x.pending == 0


def test_hostile_accesses() -> None:
    x, sent = make(2)
    enable(x)
    x.write(0, 4, 0xFEE00003)                               # address bits 1:0 read 0
    assert x.read(0, 4) == 0xFEE00000
    x.write(12, 4, 0xFFFFFFFE)                              # reserved control bits
    assert x.read(12, 4) == 0
    x.write(14, 4, 0x12345678)                              # straddles entries 0 and 1
    assert x.read(16, 4) == 0 and x.read(12, 4) == 0
    x.write(PBA_OFFSET, 8, ~0)                              # the PBA is read-only
    assert x.read(PBA_OFFSET, 8) == 0
    x.write(0x7F0, 4, 1)                                    # beyond the table
    assert x.read(0x7F0, 4) == 0 and x.read(0xFFC, 4) == 0
    assert not x.signal(2) and not x.signal(-1) and x.ignored == 2
    x.write(8, 4, 0x500)                                    # INIT: goes nowhere
    x.signal(0)
    x.write(0, 4, 0xFED00000)                               # not the APIC: dropped
    x.write(8, 4, 0x41)
    x.signal(0)
    assert sent == [] and x.dropped == 2


@given(st.lists(st.tuples(st.integers(0, 0xFFF), st.sampled_from([1, 2, 4, 8]),
                          st.integers(0, (1 << 64) - 1)), max_size=40),
       st.lists(st.integers(-2, 6), max_size=10))
def test_random_accesses_stay_bounded(writes: list[tuple[int, int, int]],
                                      signals: list[int]) -> None:
    x, sent = make(4)
    enable(x)
    for off, size, value in writes:
        x.write(off, size, value)
        x.read(off, size)
    for v in signals:
        x.signal(v)
    assert len(x.table) == 64 and x.pending < 16
    assert all(0 <= m.vector < 256 and m.mode in (FIXED, LOWEST, NMI) for m in sent)


def test_a_message_reaches_the_local_apic() -> None:
    bus = ApicBus()
    clock = VirtualClock()
    apic = LocalApic(0, bus, clock, TimerQueue(clock), bsp=True)
    apic.write(0xF0, 4, 0x1FF)                              # software-enabled
    x = Msix(C.ConfigSpace(), 2, 1, bus.send)
    enable(x)
    program(x, 0, 0x51)
    x.signal(0)
    assert apic.pending() and apic.acknowledge() == 0x51


@pytest.fixture
def m() -> Iterator[TestMachine]:
    machine = TestMachine()
    yield machine
    machine.close()


def test_virtio_uses_msix_once_enabled(m: TestMachine) -> None:
    d, dev, fn = ready(m)
    sent: list[Message] = []
    fn.attach_msi(sent.append)
    x = fn.msix
    assert x.n == len(fn.queues) + 1
    d.common_write(0x16, 2, 0)                              # queue 0 -> vector 1
    d.common_write(0x1A, 2, 1)
    assert d.common_read(0x1A, 2) == 1
    d.common_write(0x1A, 2, 7)                              # no such vector
    assert d.common_read(0x1A, 2) == T.NO_VECTOR
    d.common_write(0x1A, 2, 1)
    d.common_write(0x10, 2, 0)                              # config -> vector 0
    program(x, 0, 0x40)
    program(x, 1, 0x41)
    fn.interrupt(T.ISR_QUEUE, 1)                            # MSI-X off: INTx
    assert fn.isr == T.ISR_QUEUE and sent == []
    fn.isr_read()
    enable(x)
    fn.interrupt(T.ISR_QUEUE, 1)
    fn.config_changed()
    fn.interrupt(T.ISR_QUEUE, T.NO_VECTOR)                  # no vector: no interrupt
    assert [s.vector for s in sent] == [0x41, 0x40] and fn.isr == 0
    assert dev is not None
