"""8259A pair: init, masking, priority, EOI, cascade, spurious, ELCR, poll, AEOI."""

from __future__ import annotations

from pyhv.devices.bus import Bus
from pyhv.devices.irq import pulse
from pyhv.devices.pic8259 import PicPair
from pyhv.engines.base import InterruptSource


def make() -> tuple[Bus, PicPair]:
    pic = PicPair()
    bus = Bus("pio", strict=True)
    for base, length, d, name in pic.regions():
        bus.register(base, length, d, name)
    return bus, pic


def linux_init(bus: Bus, *, aeoi: bool = False) -> None:
    """What Linux's init_8259A does (vectors 0x30/0x38), then unmask everything."""
    bus.write(0x21, 1, 0xFF)
    bus.write(0xA1, 1, 0xFF)
    bus.write(0x20, 1, 0x11)                 # ICW1: edge, cascade, ICW4
    bus.write(0x21, 1, 0x30)                 # ICW2
    bus.write(0x21, 1, 0x04)                 # ICW3: slave on IR2
    bus.write(0x21, 1, 0x03 if aeoi else 0x01)   # ICW4: 8086 (+AEOI)
    bus.write(0xA0, 1, 0x11)
    bus.write(0xA1, 1, 0x38)
    bus.write(0xA1, 1, 0x02)
    bus.write(0xA1, 1, 0x01)
    bus.write(0x21, 1, 0x00)
    bus.write(0xA1, 1, 0x00)


def eoi(bus: Bus, irq: int) -> None:
    if irq >= 8:
        bus.write(0xA0, 1, 0x20)
    bus.write(0x20, 1, 0x20)


def test_is_an_interrupt_source() -> None:
    _, pic = make()
    src: InterruptSource = pic
    assert not src.pending()


def test_power_on_state_is_bios_like() -> None:
    bus, pic = make()
    assert bus.read(0x21, 1) == 0xFB and bus.read(0xA1, 1) == 0xFF
    pulse(pic.irq_line(0))
    assert not pic.pending()                 # masked
    bus.write(0x21, 1, 0xFA)
    assert pic.pending()
    assert pic.acknowledge() == 0x08


def test_init_sets_vectors_and_clears_mask() -> None:
    bus, pic = make()
    linux_init(bus)
    assert bus.read(0x21, 1) == 0 and bus.read(0xA1, 1) == 0
    pulse(pic.irq_line(1))
    assert pic.pending()
    assert pic.acknowledge() == 0x31
    assert not pic.pending()


def test_mask_holds_request_until_unmasked() -> None:
    bus, pic = make()
    linux_init(bus)
    bus.write(0x21, 1, 0x01)
    pulse(pic.irq_line(0))
    assert not pic.pending()
    assert bus.read(0x20, 1) & 0x01          # IRR (default read) shows it
    bus.write(0x21, 1, 0x00)
    assert pic.pending()
    assert pic.acknowledge() == 0x30


def test_priority_and_nesting() -> None:
    bus, pic = make()
    linux_init(bus)
    pulse(pic.irq_line(4))
    pulse(pic.irq_line(1))
    assert pic.acknowledge() == 0x31         # 1 beats 4
    assert not pic.pending()                 # 4 waits while 1 is in service
    bus.write(0x20, 1, 0x0B)                 # OCW3: read ISR
    assert bus.read(0x20, 1) == 0x02
    pulse(pic.irq_line(0))
    assert pic.pending()                     # 0 nests above 1
    assert pic.acknowledge() == 0x30
    eoi(bus, 0)
    assert not pic.pending()
    eoi(bus, 1)
    assert pic.pending()
    assert pic.acknowledge() == 0x34
    eoi(bus, 4)
    assert bus.read(0x20, 1) == 0


def test_specific_eoi_and_rotation() -> None:
    bus, pic = make()
    linux_init(bus)
    pulse(pic.irq_line(3))
    assert pic.acknowledge() == 0x33
    bus.write(0x20, 1, 0x60 | 3)             # specific EOI 3
    assert pic.master.isr == 0
    bus.write(0x20, 1, 0xC0 | 4)             # set priority: 4 lowest, 5 highest
    pulse(pic.irq_line(0))
    pulse(pic.irq_line(6))
    assert pic.acknowledge() == 0x36
    bus.write(0x20, 1, 0xE0 | 6)             # rotate on specific EOI: 6 lowest
    assert pic.master.priority_add == 7
    assert pic.acknowledge() == 0x30


def test_cascade_delivers_slave_vectors() -> None:
    bus, pic = make()
    linux_init(bus)
    pulse(pic.irq_line(12))
    assert pic.pending()
    assert pic.acknowledge() == 0x3C
    assert pic.master.isr == 0x04 and pic.slave.isr == 0x10
    pulse(pic.irq_line(8))                   # higher on the slave, but IR2 in service
    assert not pic.pending()
    eoi(bus, 12)
    assert pic.pending()
    assert pic.acknowledge() == 0x38
    eoi(bus, 8)
    assert not pic.pending()


def test_slave_request_pending_at_master_eoi_is_not_lost() -> None:
    bus, pic = make()
    linux_init(bus)
    pulse(pic.irq_line(8))
    assert pic.acknowledge() == 0x38
    pulse(pic.irq_line(15))
    bus.write(0xA0, 1, 0x20)                 # slave EOI: slave INT stays high (15 waits)
    assert not pic.pending()                 # the master's IR2 is still in service
    bus.write(0x20, 1, 0x20)
    assert pic.pending()
    assert pic.acknowledge() == 0x3F


def test_irq2_is_irq9() -> None:
    bus, pic = make()
    linux_init(bus)
    pulse(pic.irq_line(2))
    assert pic.acknowledge() == 0x39


def test_spurious_irq7_when_level_request_vanishes() -> None:
    bus, pic = make()
    linux_init(bus)
    bus.write(0x4D0, 1, 0x20)                # IRQ 5 level-triggered
    line = pic.irq_line(5)
    line.set_level(True)
    assert pic.pending()
    line.set_level(False)                    # gone before INTA
    assert not pic.pending()
    assert pic.acknowledge() == 0x37
    assert pic.master.isr == 0 and pic.spurious == 1


def test_spurious_irq7_when_masked_before_inta() -> None:
    bus, pic = make()
    linux_init(bus)
    pulse(pic.irq_line(3))
    bus.write(0x21, 1, 0x08)
    assert pic.acknowledge() == 0x37
    assert pic.master.isr == 0


def test_spurious_irq15_from_slave() -> None:
    bus, pic = make()
    linux_init(bus)
    bus.write(0x4D1, 1, 0x02)                # IRQ 9 level-triggered
    line = pic.irq_line(9)
    line.set_level(True)
    assert pic.pending()
    line.set_level(False)                    # gone: master IR2 stays latched
    assert pic.acknowledge() == 0x3F
    assert pic.slave.isr == 0 and pic.master.isr == 0x04
    eoi(bus, 2)                              # Linux EOIs the master for a spurious 15
    assert pic.master.isr == 0 and not pic.pending()


def test_level_triggered_stays_pending_until_line_drops() -> None:
    bus, pic = make()
    linux_init(bus)
    bus.write(0x4D1, 1, 0x08)                # IRQ 11 level
    assert bus.read(0x4D1, 1) == 0x08
    line = pic.irq_line(11)
    line.set_level(True)
    assert pic.acknowledge() == 0x3B
    eoi(bus, 11)
    assert pic.pending()                     # still high: asks again
    assert pic.acknowledge() == 0x3B
    line.set_level(False)
    eoi(bus, 11)
    assert not pic.pending()


def test_edge_needs_a_new_rising_edge() -> None:
    bus, pic = make()
    linux_init(bus)
    line = pic.irq_line(4)
    line.set_level(True)
    assert pic.acknowledge() == 0x34
    eoi(bus, 4)
    line.set_level(True)                     # still high: no new edge
    assert not pic.pending()
    line.set_level(False)
    line.set_level(True)
    assert pic.pending()


def test_elcr_reserved_bits_read_zero() -> None:
    bus, _ = make()
    bus.write(0x4D0, 1, 0xFF)
    bus.write(0x4D1, 1, 0xFF)
    assert bus.read(0x4D0, 1) == 0xF8
    assert bus.read(0x4D1, 1) == 0xDE


def test_auto_eoi() -> None:
    bus, pic = make()
    linux_init(bus, aeoi=True)
    pulse(pic.irq_line(1))
    assert pic.acknowledge() == 0x31
    assert pic.master.isr == 0
    pulse(pic.irq_line(3))
    assert pic.acknowledge() == 0x33


def test_poll_command() -> None:
    bus, pic = make()
    linux_init(bus)
    bus.write(0x20, 1, 0x0C)                 # OCW3 poll
    assert bus.read(0x20, 1) == 0
    pulse(pic.irq_line(6))
    bus.write(0x20, 1, 0x0C)
    assert bus.read(0x20, 1) == 0x86
    assert pic.master.isr == 0x40
    assert not pic.pending()


def test_special_mask_mode() -> None:
    bus, pic = make()
    linux_init(bus)
    pulse(pic.irq_line(1))
    assert pic.acknowledge() == 0x31
    pulse(pic.irq_line(5))
    assert not pic.pending()
    bus.write(0x21, 1, 0x02)                 # mask the level in service
    bus.write(0x20, 1, 0x68)                 # OCW3: set special mask
    assert pic.pending()                     # lower priorities now get through
    assert pic.acknowledge() == 0x35


def test_on_intr_called_when_intr_rises() -> None:
    bus, _ = make()
    calls: list[int] = []
    pic = PicPair(on_intr=lambda: calls.append(1))
    bus = Bus("pio")
    for base, length, d, name in pic.regions():
        bus.register(base, length, d, name)
    linux_init(bus)
    pulse(pic.irq_line(0))
    pulse(pic.irq_line(1))
    assert calls == [1]
    pic.acknowledge()
    assert calls == [1]


def test_reinit_clears_state() -> None:
    bus, pic = make()
    linux_init(bus)
    pulse(pic.irq_line(1))
    pic.acknowledge()
    linux_init(bus)
    assert pic.master.isr == 0 and not pic.pending()
