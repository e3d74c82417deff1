"""The virtio PCI transport and split virtqueues, driven by a spec-following test driver
(virtio_driver.py) through pyhv's PCI host, port bus and MMIO bus.

An echo device (queue 0: writes the reversed readable bytes into the writable buffers)
stands in for a real device so the transport's own rules are what is tested: feature
negotiation, direct and indirect chains, interrupts with and without event index, reset,
DEVICE_NEEDS_RESET on every kind of broken queue, ignored notifies, odd-width registers.
Hypothesis then throws arbitrary descriptor tables and indexes at it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from virtio_driver import Driver, TestMachine

from pyhv.devices.virtio import transport as T
from pyhv.devices.virtio.device import VirtioContext, VirtioDevice
from pyhv.devices.virtio.queue import (
    F_INDIRECT,
    F_NEXT,
    F_WRITE,
    read_buffers,
    write_buffers,
)


class Echo(VirtioDevice):
    device_type = 0x3F
    queue_sizes = (8, 4)
    features = 1 << 3
    name = "echo"

    def __init__(self, deferred: bool = False) -> None:
        super().__init__()
        self.config = bytearray(b"\x11\x22\x33\x44\x55\x66")
        self.ctx: VirtioContext | None = None
        self.deferred = deferred
        self.resets = 0

    def config_write(self, offset: int, data: bytes) -> None:
        self.config[offset:offset + len(data)] = data[:len(self.config) - offset]

    def activate(self, ctx: VirtioContext) -> None:
        self.ctx = ctx

    def queue_notify(self, index: int) -> None:
        assert self.ctx is not None
        ctx = self.ctx
        while (chain := ctx.pop(index)) is not None:
            data = read_buffers(ctx.memory, chain.readable, 1 << 20)[::-1]
            n = write_buffers(ctx.memory, chain.writable, data)
            head = chain.head
            if self.deferred:
                ctx.post(lambda head=head, n=n: ctx.complete(index, head, n))
            else:
                ctx.complete(index, head, n)

    def reset(self) -> None:
        self.resets += 1
        self.ctx = None


@pytest.fixture
def m() -> Iterator[TestMachine]:
    machine = TestMachine()
    yield machine
    machine.close()


def ready(m: TestMachine, dev: VirtioDevice | None = None, features: int | None = None,
          size: int = 8) -> tuple[Driver, Echo, T.VirtioPciFunction]:
    dev = dev or Echo()
    slot, fn = m.add(dev)
    d = Driver(m, slot)
    assert d.init(features)
    d.setup_queue(0, size)
    d.driver_ok()
    assert isinstance(dev, Echo)
    return d, dev, fn


def test_pci_identity_and_capabilities(m: TestMachine) -> None:
    slot, fn = m.add(Echo())
    assert m.cfg_read(slot, 0) == (0x1040 + 0x3F) << 16 | 0x1AF4
    assert m.cfg_read(slot, 0x08, 1) == 1                    # revision 1: modern
    assert m.cfg_read(slot, 0x2C) == 0x1100 << 16 | 0x1AF4
    caps, at, msix = {}, m.cfg_read(slot, 0x34, 1), []
    while at:
        if m.cfg_read(slot, at, 1) == 0x11:          # MSI-X: table size N-1, BAR 1
            msix.append((m.cfg_read(slot, at + 2, 2), m.cfg_read(slot, at + 4),
                         m.cfg_read(slot, at + 8)))
            at = m.cfg_read(slot, at + 1, 1)
            continue
        assert m.cfg_read(slot, at, 1) == 0x09
        cfg_type = m.cfg_read(slot, at + 3, 1)
        caps[cfg_type] = (m.cfg_read(slot, at + 4, 1), m.cfg_read(slot, at + 8),
                          m.cfg_read(slot, at + 12), m.cfg_read(slot, at + 2, 1))
        at = m.cfg_read(slot, at + 1, 1)
    assert set(caps) == {1, 2, 3, 4, 5}
    assert msix == [(len(fn.queues), 0 | 1, 0x800 | 1)]    # queues + config, disabled
    assert caps[2][3] == caps[5][3] == 20
    assert all(c[3] == 16 for t, c in caps.items() if t not in (2, 5))
    bar_size = 0x4000
    assert all(c[0] == 0 and c[1] + c[2] <= bar_size for c in caps.values())


def test_pci_configuration_access_window(m: TestMachine) -> None:
    """cfg_type 5: BAR 0 reached through configuration space alone."""
    d, dev, fn = ready(m)
    at = m.cfg_read(d.slot, 0x34, 1)
    while m.cfg_read(d.slot, at + 3, 1) != 5:
        at = m.cfg_read(d.slot, at + 1, 1)

    def window(off: int, length: int, bar: int = 0) -> None:
        m.cfg_write(d.slot, at + 4, 1, bar)
        m.cfg_write(d.slot, at + 8, 4, off)
        m.cfg_write(d.slot, at + 12, 4, length)

    window(T.COMMON + 0x12, 2)
    assert m.cfg_read(d.slot, at + 16, 2) == 2                        # num_queues
    window(T.DEVICE_CFG + 1, 1)
    assert m.cfg_read(d.slot, at + 16, 1) == 0x22
    d.q[0].add([(b"xy", False), (2, True)])
    window(T.NOTIFY, 2)
    m.cfg_write(d.slot, at + 16, 2, 0)                                # a notify
    assert len(d.q[0].take_used()) == 1
    window(T.ISR, 1)
    assert m.cfg_read(d.slot, at + 16, 1) == T.ISR_QUEUE and d.isr() == 0
    for off, length, bar in ((T.COMMON + 1, 2, 0), (0, 3, 0), (0x4000, 4, 0), (0, 4, 1)):
        window(off, length, bar)                                      # names nothing
        m.cfg_write(d.slot, at + 16, 4, 0)
        assert m.cfg_read(d.slot, at + 16, 4) == 0
    assert d.status & T.S_DRIVER_OK and not d.status & T.S_NEEDS_RESET


def test_feature_negotiation(m: TestMachine) -> None:
    slot, fn = m.add(Echo())
    d = Driver(m, slot)
    offered = d.device_features()
    assert offered == (1 << 3) | T.F_VERSION_1 | T.F_INDIRECT_DESC | T.F_EVENT_IDX
    assert not d.init(1 << 3)                       # no VERSION_1: FEATURES_OK refused
    assert not d.init(offered | 1 << 40)            # more than offered: refused
    assert d.init(T.F_VERSION_1)
    assert fn.driver_features == T.F_VERSION_1
    d.common_write(0x08, 4, 0)                      # too late to change them
    d.common_write(0x0C, 4, 0xFFFF_FFFF)
    assert fn.driver_features == T.F_VERSION_1


def test_common_config_at_odd_widths(m: TestMachine) -> None:
    slot, fn = m.add(Echo())
    d = Driver(m, slot)
    d.init()
    assert d.common_read(0x12, 2) == 2                               # num_queues
    assert d.common_read(0x11, 2) == (2 << 8) | 0xFF                 # straddles two fields
    d.common_write(0x16, 2, 1)
    assert d.common_read(0x18, 2) == 4                               # queue 1's max size
    d.common_write(0x20, 1, 0x34)                                    # queue_desc byte by byte
    d.common_write(0x21, 1, 0x12)
    d.common_write(0x22, 2, 0x0001)
    assert d.common_read(0x20, 8) == 0x0001_1234
    d.common_write(0x16, 2, 7)                                       # a queue that is not there
    assert d.common_read(0x18, 2) == 0
    d.common_write(0x18, 2, 8)                                       # ignored
    assert d.common_read(0x3A, 2) == 0 and d.common_read(0x100, 4) == 0
    assert d.device_config(1, 4) == 0x55443322 and d.device_config(5, 4) == 0x66


@pytest.mark.parametrize("indirect", [False, True])
def test_chains_complete_with_interrupt(m: TestMachine, indirect: bool) -> None:
    d, dev, fn = ready(m, features=T.F_VERSION_1 | T.F_INDIRECT_DESC)
    q = d.q[0]
    head, addrs = q.add([(b"abc", False), (b"de", False), (2, True), (8, True)], indirect)
    d.notify(0)
    assert q.take_used() == [(head, 5)]
    assert m.memory.read(addrs[2], 2) == b"ed" and m.memory.read(addrs[3], 3) == b"cba"
    irq = m.irqs[m.cfg_read(d.slot, 0x3C, 1)]
    assert irq.level and d.isr() == T.ISR_QUEUE and not irq.level and d.isr() == 0


def test_no_interrupt_flag_and_event_index(m: TestMachine) -> None:
    d, dev, fn = ready(m, features=T.F_VERSION_1)
    q = d.q[0]
    irq = m.irqs[m.cfg_read(d.slot, 0x3C, 1)]
    m.memory.write_u16(q.avail, 1)                 # VIRTQ_AVAIL_F_NO_INTERRUPT
    q.add([(b"x", False), (1, True)])
    d.notify(0)
    assert len(q.take_used()) == 1 and not irq.level
    d2, _, _ = ready(m, features=T.F_VERSION_1 | T.F_EVENT_IDX)
    q2 = d2.q[0]
    irq2 = m.irqs[m.cfg_read(d2.slot, 0x3C, 1)]
    m.memory.write_u16(q2.avail + 4 + 2 * q2.size, 1)     # used_event = 1: not the first
    q2.add([(b"x", False), (1, True)])
    d2.notify(0)
    assert len(q2.take_used()) == 1 and not irq2.level
    assert m.memory.read_u16(q2.used + 4 + 8 * q2.size) == 1   # avail_event follows
    q2.add([(b"y", False), (1, True)])
    d2.notify(0)
    assert len(q2.take_used()) == 1 and irq2.level               # used idx passed 1


def test_deferred_completion_and_reset_drops_old_ones(m: TestMachine) -> None:
    dev = Echo(deferred=True)
    d, _, fn = ready(m, dev)
    q = d.q[0]
    q.add([(b"ab", False), (2, True)])
    d.notify(0)
    assert q.take_used() == []
    assert m.deferred.run_pending() == 1
    assert len(q.take_used()) == 1
    q.add([(b"cd", False), (2, True)])
    d.notify(0)
    before = dev.resets
    d.common_write(0x14, 1, 0)                       # reset before it completes
    assert dev.resets == before + 1 and d.status == 0 and d.common_read(0x1C, 2) == 0
    m.deferred.run_pending()
    assert m.memory.read_u16(q.used + 2) == 1        # the old completion was dropped


def broken(m: TestMachine, how: str) -> tuple[Driver, T.VirtioPciFunction]:
    d, dev, fn = ready(m)
    q = d.q[0]
    if how == "loop":
        q.put_desc(0, q.alloc(4), 4, F_NEXT, 1)
        q.put_desc(1, q.alloc(4), 4, F_NEXT, 0)
        q.publish(0)
    elif how == "too long":
        big = q.alloc(16 * 20)
        for i in range(9):
            q.put_desc(i % 8, big, 4, F_NEXT, (i + 1) % 8)
        q.publish(3)
    elif how == "outside RAM":
        q.put_desc(0, 0xFFFF_0000_0000, 16, F_WRITE, 0)
        q.publish(0)
    elif how == "huge length":
        q.put_desc(0, 0x1000, 0xFFFF_FFFF, 0, 0)
        q.publish(0)
    elif how == "next out of table":
        q.put_desc(0, q.alloc(4), 4, F_NEXT, 200)
        q.publish(0)
    elif how == "head out of table":
        q.publish(8)
    elif how == "avail jumps":
        m.memory.write_u16(q.avail + 2, 100)
    elif how == "nested indirect":
        t = q.alloc(32)
        q.put_desc(0, t, 16, F_INDIRECT, 0, table=t)
        q.put_desc(0, t, 16, F_INDIRECT, 0)
        q.publish(0)
    elif how == "indirect with next":
        t = q.alloc(16)
        q.put_desc(0, t, 16, F_INDIRECT | F_NEXT, 1)
        q.publish(0)
    elif how == "indirect bad length":
        q.put_desc(0, q.alloc(16), 15, F_INDIRECT, 0)
        q.publish(0)
    elif how == "read after write":
        q.put_desc(0, q.alloc(4), 4, F_WRITE | F_NEXT, 1)
        q.put_desc(1, q.alloc(4), 4, 0, 0)
        q.publish(0)
    d.notify(0)
    return d, fn


@pytest.mark.parametrize("how", ["loop", "too long", "outside RAM", "huge length",
                                 "next out of table", "head out of table", "avail jumps",
                                 "nested indirect", "indirect with next",
                                 "indirect bad length", "read after write"])
def test_broken_queue_needs_reset(m: TestMachine, how: str) -> None:
    d, fn = broken(m, how)
    assert d.status & T.S_NEEDS_RESET, fn.failures
    assert d.q[0].take_used() == []
    assert d.isr() & T.ISR_CONFIG
    d.q[0].add([(b"x", False), (1, True)])          # nothing is served any more
    d.notify(0)
    assert d.q[0].take_used() == []
    assert d.init() and not d.status & T.S_NEEDS_RESET      # a reset recovers it
    d.setup_queue(0, 8)
    d.driver_ok()
    d.q[0].add([(b"ok", False), (2, True)])
    d.notify(0)
    assert len(d.q[0].take_used()) == 1


@pytest.mark.parametrize("size", [0, 3, 6, 16])
def test_bad_queue_size_is_refused(m: TestMachine, size: int) -> None:
    slot, fn = m.add(Echo())
    d = Driver(m, slot)
    d.init()
    d.setup_queue(0, size)
    assert d.common_read(0x1C, 2) == 0 and d.status & T.S_NEEDS_RESET


def test_rings_outside_ram_and_misaligned(m: TestMachine) -> None:
    slot, fn = m.add(Echo())
    d = Driver(m, slot)
    d.init()
    d.setup_queue(0, 8, enable=False)
    d.common_write(0x30, 8, m.memory.size - 8)
    d.common_write(0x1C, 2, 1)
    assert d.common_read(0x1C, 2) == 0 and d.status & T.S_NEEDS_RESET
    d.init()
    d.setup_queue(0, 8, enable=False)
    d.common_write(0x20, 8, 0x10008)
    d.common_write(0x1C, 2, 1)
    assert d.common_read(0x1C, 2) == 0 and d.status & T.S_NEEDS_RESET


def test_notifies_on_absent_or_disabled_queues_are_ignored(m: TestMachine) -> None:
    d, dev, fn = ready(m)
    for q in (1, 2, 500, 0x3FF):
        d.notify(q)
    m.mmio.write(d.bar + T.NOTIFY + 1, 1, 0)
    assert fn.ignored_notifies == 5 and not d.status & T.S_NEEDS_RESET


def test_driver_ok_without_features_ok_needs_reset(m: TestMachine) -> None:
    slot, fn = m.add(Echo())
    d = Driver(m, slot)
    d.common_write(0x14, 1, T.S_ACKNOWLEDGE | T.S_DRIVER | T.S_DRIVER_OK)
    assert d.status & T.S_NEEDS_RESET


descriptor = st.tuples(st.integers(0, (4 << 20) + 0x1000), st.integers(0, 1 << 32),
                       st.integers(0, 7), st.integers(0, 12))


@given(st.lists(descriptor, min_size=8, max_size=8),
       st.lists(st.integers(0, 10), min_size=1, max_size=8),
       st.integers(0, 0xFFFF), st.booleans())
def test_arbitrary_rings_give_chains_in_ram_or_needs_reset(
        descs: list[tuple[int, int, int, int]], heads: list[int], avail_idx: int,
        event_idx: bool) -> None:
    m = TestMachine()
    try:
        features = T.F_VERSION_1 | T.F_INDIRECT_DESC | (T.F_EVENT_IDX if event_idx else 0)
        d, dev, fn = ready(m, features=features)
        q = d.q[0]
        for i, (addr, length, flags, nxt) in enumerate(descs):
            q.put_desc(i, addr, length & 0xFFFF_FFFF, flags, nxt)
        for k, h in enumerate(heads):
            m.memory.write_u16(q.avail + 4 + 2 * k, h)
        m.memory.write_u16(q.avail + 2, avail_idx)
        d.notify(0)
        used = q.take_used()
        assert len(used) <= 8
        if not d.status & T.S_NEEDS_RESET:
            assert len(used) == min(avail_idx, 8) or avail_idx > 8
        for head, written in used:
            assert head < 8 and written <= 1 << 20
    finally:
        m.close()


def test_rng_fills_writable_buffers_bounded(m: TestMachine) -> None:
    from pyhv.devices.virtio.rng import MAX_REQUEST, VirtioRng
    dev = VirtioRng()
    slot, fn = m.add(dev)
    d = Driver(m, slot)
    assert m.cfg_read(slot, 0) == 0x1044_1AF4
    assert d.init(T.F_VERSION_1)
    q = d.setup_queue(0, 8, data_bytes=0x40000)
    d.driver_ok()
    h1, a1 = q.add([(64, True)])
    h2, a2 = q.add([(b"ignored", False), (0x30000, True)])
    h3, _ = q.add([(b"only readable", False)])
    d.notify(0)
    assert q.take_used() == [(h1, 64), (h2, MAX_REQUEST), (h3, 0)]
    assert m.memory.read(a1[0], 64) != bytes(64)
    assert m.memory.read(a2[1] + MAX_REQUEST, 16) == bytes(16)     # nothing past the cap


@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 0x5000), st.integers(0, 8),
                          st.integers(0, 0xFFFF_FFFF), st.booleans(), st.integers(0, 3)),
                max_size=30))
def test_hostile_config_window_never_raises(
        ops: list[tuple[int, int, int, int, bool, int]]) -> None:
    m = TestMachine()
    try:
        d, dev, fn = ready(m)
        at = m.cfg_read(d.slot, 0x34, 1)
        while m.cfg_read(d.slot, at + 3, 1) != 5:
            at = m.cfg_read(d.slot, at + 1, 1)
        for bar, off, length, value, is_write, lane in ops:
            m.cfg_write(d.slot, at + 4, 1, bar)
            m.cfg_write(d.slot, at + 8, 4, off)
            m.cfg_write(d.slot, at + 12, 4, length)
            size = (1, 2, 4, 1)[lane]
            if is_write:
                m.cfg_write(d.slot, at + 16 + (lane & 1), size, value)
            else:
                assert 0 <= m.cfg_read(d.slot, at + 16 + (lane & 1), size) < 1 << (8 * size)
    finally:
        m.close()
