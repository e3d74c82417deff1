"""Faults during a live migration lose nothing (pyhv.migration).

One counting source VM (tests/guests/core/counter.S on emu, in this process: LiveVm)
is migrated again and again through a proxy (faultproxy.py) that breaks the stream at
a deterministic list of points named by the record structure: a flipped byte (the
record's type, padding, length, checksum, payload; in the header, the first and last
RAM records, a round marker, the final state) or a cut connection at the same places,
both directions. Each time: the destination (an in-process `Incoming` with a fresh
machine) refuses with a MigrationError and runs nothing; the source's migration fails
with a reason, and the VM is running again (a fault in the STATE record hits while it
is paused). At the end one clean migration moves it; the source's output followed by
the destination's is one unbroken count through all of it.

Process-level faults (a killed destination, a killed source after the switch-over, a
forged header) are in test_migration_kill.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultproxy import Fault, FaultProxy
from guestbuild import GuestBuilder, engine_unavailable
from livevm import LiveVm
from migrationkit import assert_counts_on

from pyhv.errors import PyhvError
from pyhv.machine import MachineConfig
from pyhv.migration import Incoming, MigrationError, Options, OutgoingMigration
from pyhv.migration.source import TERMINAL
from pyhv.migration.stream import HELLO, PAGES, REPLY, ROUND, STATE

pytestmark = pytest.mark.skipif(engine_unavailable("emu") is not None,
                                reason=f"{engine_unavailable('emu')}")

# 16 MiB of RAM: round 1 is 16 PAGES records of 256 pages
FAULTS = [
    Fault("out", HELLO, 1, 0), Fault("out", HELLO, 1, 2), Fault("out", HELLO, 1, 5),
    Fault("out", HELLO, 1, 9), Fault("out", HELLO, 1, 13), Fault("out", HELLO, 1, 16),
    Fault("out", HELLO, 1, -1),
    Fault("out", HELLO, 1, 0, "cut"), Fault("out", HELLO, 1, 7, "cut"),
    Fault("out", HELLO, 1, -1, "cut"),
    Fault("out", PAGES, 1, 3), Fault("out", PAGES, 1, 14), Fault("out", PAGES, 1, 20),
    Fault("out", PAGES, 1, None), Fault("out", PAGES, 1, -1),
    Fault("out", PAGES, 1, None, "cut"), Fault("out", PAGES, 16, -1),
    Fault("out", PAGES, 16, 11, "cut"),
    Fault("out", ROUND, 1, 16), Fault("out", ROUND, 1, 4, "cut"),
    Fault("out", STATE, 1, 0), Fault("out", STATE, 1, 8), Fault("out", STATE, 1, None),
    Fault("out", STATE, 1, -1), Fault("out", STATE, 1, 15, "cut"),
    Fault("out", STATE, 1, -1, "cut"),
    Fault("back", REPLY, 1, 16), Fault("back", REPLY, 1, -1),
    Fault("back", REPLY, 1, 0, "cut"),
]
DEFAULT_RUN = {"flip-out-HELLO1@5", "cut-out-HELLO1@7", "flip-out-PAGES1@mid",
               "cut-out-PAGES1@mid", "flip-out-ROUND1@16", "flip-out-STATE1@mid",
               "cut-out-STATE1@-1", "flip-back-REPLY1@16"}


@pytest.fixture(scope="module")
def counting_source(guests: GuestBuilder) -> Iterator[LiveVm]:
    cfg = MachineConfig(kernel=Path(guests("counter")), engine="emu", mem_size=16 << 20)
    vm = LiveVm(cfg)
    vm.runner.timeout = 600.0
    vm.start().wait_for(b"count 3\n")
    yield vm
    vm.close()


def migrate_through(src: LiveVm, fault: Fault | None, dst: LiveVm
                    ) -> tuple[dict[str, object], BaseException | None, FaultProxy]:
    incoming = Incoming("tcp:127.0.0.1:0")
    proxy = FaultProxy(incoming.uri, fault)
    got: list[BaseException | None] = []

    def receive() -> None:
        try:
            session = incoming.receive(dst.machine, 30.0)
        except PyhvError as e:
            got.append(e)
            return
        session.announce(dst.runner)
        dst.start()
        got.append(None)
    t = threading.Thread(target=receive, daemon=True)
    t.start()
    mig = OutgoingMigration(src.runner, src.machine, Options(proxy.uri))
    mig.start()
    deadline = time.monotonic() + 60
    while (p := mig.progress())["status"] not in TERMINAL:
        assert time.monotonic() < deadline, f"the migration did not end: {p}"
        time.sleep(0.01)
    mig.cancel()
    t.join(30)
    assert not t.is_alive(), "the destination did not end"
    proxy.close()
    incoming.close()
    return p, got[0], proxy


def check_fault(src: LiveVm, fault: Fault, guests: GuestBuilder) -> None:
    cfg = MachineConfig(kernel=Path(guests("counter")), engine="emu", mem_size=16 << 20)
    dst = LiveVm(cfg)
    try:
        p, dst_error, proxy = migrate_through(src, fault, dst)
        assert proxy.fired, f"the stream never reached {fault}"
        assert p["status"] == "failed" and p["error"], p
        assert isinstance(dst_error, MigrationError), dst_error
        assert "nothing ran" in str(dst_error)
        assert dst.runner.state.value == "created" and not dst.output()
        assert src.runner.state.value == "running", (fault, p)
        n = assert_counts_on(src.output())
        src.wait_for(b"count %d\n" % (n + 2))       # it counts on, no gap
    finally:
        dst.close()


@pytest.mark.parametrize("fault", [
    pytest.param(f, id=str(f), marks=() if str(f) in DEFAULT_RUN else pytest.mark.slow)
    for f in FAULTS])
def test_a_broken_stream_leaves_the_source_running(
        counting_source: LiveVm, fault: Fault, guests: GuestBuilder) -> None:
    check_fault(counting_source, fault, guests)


def test_after_all_the_faults_a_clean_migration_moves_the_count_on(
        counting_source: LiveVm, guests: GuestBuilder) -> None:
    """Runs after the fault cases (same module source): one unbroken count."""
    src = counting_source
    cfg = MachineConfig(kernel=Path(guests("counter")), engine="emu", mem_size=16 << 20)
    dst = LiveVm(cfg)
    try:
        p, dst_error, _ = migrate_through(src, None, dst)
        assert dst_error is None and p["status"] == "completed", (p, dst_error)
        assert src._thread is not None
        src._thread.join(15)
        assert src.result is not None and src.result.reason == "migrated"
        before = src.output()
        n = assert_counts_on(before)
        dst.wait_for(b"count %d\n" % (n + 3))
        dst.stop()
        assert assert_counts_on(before + dst.output()) >= n + 3
    finally:
        dst.close()
