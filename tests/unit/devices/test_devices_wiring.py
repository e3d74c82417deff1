"""PIT and RTC wired to the 8259 pair, driven the way an engine's run loop drives them."""

from __future__ import annotations

from pyhv.clock import TimerQueue, VirtualClock
from pyhv.devices.bus import Bus
from pyhv.devices.pic8259 import PicPair
from pyhv.devices.pit8254 import Pit8254, SystemControlPortB
from pyhv.devices.rtc import Rtc

SECOND = 1_000_000_000


def test_timer_and_rtc_interrupts_through_the_pic() -> None:
    clock = VirtualClock()
    timers = TimerQueue(clock)
    pic = PicPair()
    pit = Pit8254(clock, timers, pic.irq_line(0))
    rtc = Rtc(clock, timers, pic.irq_line(8), start_epoch=0)
    bus = Bus("pio", strict=True)
    for dev in (pic, pit, SystemControlPortB(pit), rtc):
        for base, length, d, name in dev.regions():
            bus.register(base, length, d, name)
    # Guest setup: PIC at 0x20/0x28, all unmasked; PIT 100 Hz (11931 clocks); RTC 64 Hz.
    for port, v in ((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01),
                    (0xA0, 0x11), (0xA1, 0x28), (0xA1, 0x02), (0xA1, 0x01),
                    (0x21, 0x00), (0xA1, 0x00),
                    (0x43, 0x34), (0x40, 11931 & 0xFF), (0x40, 11931 >> 8),
                    (0x70, 0x0A), (0x71, 0x2A), (0x70, 0x0B), (0x71, 0x42)):
        bus.write(port, 1, v)
    vectors: dict[int, int] = {}
    while True:
        deadline = timers.next_deadline()
        assert deadline is not None
        if deadline > SECOND:
            break
        clock.skip_to(deadline)                  # the guest halts until the next timer
        timers.fire_due()
        while pic.pending():                     # IF=1: deliver everything pending
            vector = pic.acknowledge()
            vectors[vector] = vectors.get(vector, 0) + 1
            if vector == 0x28:                   # the RTC handler reads C, EOIs both
                bus.write(0x70, 1, 0x0C)
                bus.read(0x71, 1)
                bus.write(0xA0, 1, 0x20)
            bus.write(0x20, 1, 0x20)
    assert vectors == {0x20: 100, 0x28: 64}
    assert pic.spurious == 0
