"""virtio-balloon through the PCI transport, driven as Linux's virtio_balloon drives it:
the host's target reaches the config space with a configuration interrupt; inflated
frames leave the host process's RSS (MADV_DONTNEED on guest RAM) and read as zeros;
deflated frames are the guest's again; frames outside RAM are counted, never touched;
the stats buffer is kept, returned on request and parsed into the guest's view."""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from virtio_driver import Driver, TestMachine

from pyhv.devices.virtio import transport as T
from pyhv.devices.virtio.balloon import DEFLATE, F_STATS_VQ, INFLATE, STATS, VirtioBalloon

RAM = 8 << 20


@pytest.fixture
def m() -> Iterator[TestMachine]:
    machine = TestMachine(RAM)
    yield machine
    machine.close()


def rss_of(addr: int) -> int:
    """Rss (bytes) of this process's mapping that starts at host address `addr`."""
    for blk in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        if int(blk.split("-", 1)[0], 16) == addr:
            kb = re.search(r"^Rss:\s+(\d+) kB", blk, re.M)
            assert kb is not None
            return int(kb.group(1)) * 1024
    raise AssertionError("mapping not found")


def ready(m: TestMachine) -> tuple[Driver, VirtioBalloon]:
    dev = VirtioBalloon()
    slot, _fn = m.add(dev)
    d = Driver(m, slot)
    assert m.cfg_read(slot, 0) == 0x1045_1AF4
    assert d.device_features() & F_STATS_VQ
    assert d.init(T.F_VERSION_1 | F_STATS_VQ)
    for q in (INFLATE, DEFLATE, STATS):
        d.setup_queue(q, 8)
    d.driver_ok()
    return d, dev


def pfns(frames: list[int]) -> bytes:
    return b"".join(struct.pack("<I", f) for f in frames)


def test_target_reaches_the_guest_with_a_config_interrupt(m: TestMachine) -> None:
    d, dev = ready(m)
    d.isr()                                       # clear
    dev.set_target(1234)
    assert d.device_config(0, 4) == 1234
    assert d.isr() & 2                            # configuration change
    m.mmio.write(d.bar + T.DEVICE_CFG + 0, 4, 99)  # num_pages is the host's: ignored
    m.mmio.write(d.bar + T.DEVICE_CFG + 4, 4, 1200)
    assert dev.target_pages == 1234 and dev.actual_pages == 1200
    assert dev.report()["actual_pages"] == 1200


def test_inflate_gives_pages_back_and_deflate_takes_them(m: TestMachine) -> None:
    d, dev = ready(m)
    region = m.memory.regions[0]
    base = 4 << 20                                # 1 MiB of guest pages, touched
    m.memory.write(base, b"\xaa" * (1 << 20))
    before = rss_of(region.host_addr)
    frames = list(range(base >> 12, (base + (1 << 20)) >> 12))
    frames_out = [RAM >> 12, 0xFFFF_FFFF]         # outside guest RAM: skipped
    h, _ = d.q[INFLATE].add([(pfns(frames[:128] + frames_out), False)])
    h2, _ = d.q[INFLATE].add([(pfns(frames[128:]), False)])
    d.notify(INFLATE)
    assert d.q[INFLATE].take_used() == [(h, 0), (h2, 0)]
    assert before - rss_of(region.host_addr) >= 1 << 20
    assert m.memory.read(base, 1 << 20) == bytes(1 << 20)
    assert len(dev.held) == 256 and dev.bad_frames == 2 and dev.inflated == 258
    h3, _ = d.q[DEFLATE].add([(pfns(frames[:100]), False)])
    d.notify(DEFLATE)
    assert d.q[DEFLATE].take_used() == [(h3, 0)]
    assert len(dev.held) == 156 and dev.deflated == 100
    m.memory.write(base, b"\x55")                 # a deflated page is usable again
    assert m.memory.read(base, 1) == b"\x55"


def test_a_partial_entry_and_an_empty_buffer_are_harmless(m: TestMachine) -> None:
    d, dev = ready(m)
    h, _ = d.q[INFLATE].add([(pfns([0x300]) + b"\x01\x02", False)])
    h2, _ = d.q[INFLATE].add([(16, True)])        # only writable: no frames
    d.notify(INFLATE)
    assert d.q[INFLATE].take_used() == [(h, 0), (h2, 0)]
    assert dev.held == {0x300}


def test_stats_are_kept_requested_and_parsed(m: TestMachine) -> None:
    d, dev = ready(m)
    entries = struct.pack("<HQ", 4, 100 << 20) + struct.pack("<HQ", 5, 500 << 20) + \
        struct.pack("<HQ", 77, 1)
    h, addrs = d.q[STATS].add([(entries, False)])
    d.notify(STATS)
    assert d.q[STATS].take_used() == []            # the device keeps the buffer
    assert dev.report()["guest_stats"] == {"free_memory": 100 << 20,
                                           "total_memory": 500 << 20, "tag77": 1}
    dev.request_stats()
    assert d.q[STATS].take_used() == [(h, 0)]     # returned: the driver refills it
    dev.request_stats()                            # nothing held: nothing happens
    assert d.q[STATS].take_used() == []
    assert dev.stats_updates == 1


def test_a_stats_buffer_queued_before_driver_ok_is_taken_at_activation(
        m: TestMachine) -> None:
    """Linux primes statsq and kicks it during probe, before DRIVER_OK."""
    dev = VirtioBalloon()
    slot, _fn = m.add(dev)
    d = Driver(m, slot)
    assert d.init(T.F_VERSION_1 | F_STATS_VQ)
    for q in (INFLATE, DEFLATE, STATS):
        d.setup_queue(q, 8)
    d.q[STATS].add([(struct.pack("<HQ", 5, 64 << 20), False)])
    d.notify(STATS)                              # ignored: not active yet
    assert dev.stats_updates == 0
    d.driver_ok()
    assert dev.guest_stats == {"total_memory": 64 << 20} and dev.stats_updates == 1
