"""The destination side: `pyhv run --incoming tcp:ADDR:PORT`.

Design: `Incoming(uri)` listens (before the machine is built, so the printed address is
ready as soon as it is printed); `receive(machine, timeout)` accepts one source, checks
its header against this machine (pyhv.migration.header; a refusal is answered with the
reason and raised), writes the PAGES records into RAM, and on the STATE record checks
and applies the VmState (pyhv.vmstate.apply). It returns a `Session`; the caller builds
the Runner, and `Session.announce(runner)` answers REPLY running with t_first, the
time.monotonic() at which the run loop started the guest, from a thread, as soon as it
has.

Invariants: nothing runs before the whole stream (pages, then state) arrived intact:
with --copy-storage (the header says "storage": "copy") this side's own images are
opened at once and the DISK records written into them (pyhv.migration.storage);
otherwise the disks (shared storage, the same paths) are opened, locked, only when STATE arrived
(pyhv.disk.handover: the source released them just before sending it). Any failure
(the source gave up, a cut, a corrupt record, a refused header or state) is
a MigrationError and the machine never runs (the caller closes it). The source keeps
its VM until the "running" answer; if that answer cannot be sent (the source died
after the switch-over) this side runs on regardless.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyhv.errors import ImageError, PyhvError
from pyhv.migration import handover, header, storage, uri
from pyhv.migration.pages import PageReader, apply_record
from pyhv.migration.stream import (
    ABORT,
    DISK,
    HELLO,
    NAMES,
    PAGES,
    REPLY,
    ROUND,
    STATE,
    Channel,
    MigrationError,
    decode_json,
)
from pyhv.vmstate import VmState, apply

if TYPE_CHECKING:
    from pyhv.machine import Machine
    from pyhv.runner import Runner

IO_TIMEOUT_S = 30.0
START_WAIT_S = 30.0


@dataclass
class Session:
    channel: Channel
    rounds: int = 0
    pages: int = 0
    t_pause: float = 0.0
    t_received: float = 0.0      # the STATE record read
    t_applied: float = 0.0       # the state applied
    disk_chunks: int = 0         # DISK records written (--copy-storage)
    stats: dict[str, Any] = field(default_factory=dict)

    def announce(self, runner: Runner) -> threading.Thread:
        """Answer "running" once `runner` has started the guest (from a thread)."""
        def run() -> None:
            deadline = time.monotonic() + START_WAIT_S
            while runner.t_start == 0.0 and time.monotonic() < deadline:
                time.sleep(0.0005)
            ok = runner.t_start != 0.0
            with contextlib.suppress(PyhvError, OSError):
                self.channel.send_json(REPLY, {"ok": ok, "running": ok,
                                               "t_first": runner.t_start,
                                               "t_received": self.t_received,
                                               "t_applied": self.t_applied,
                                               "error": None if ok else
                                               "the destination's run did not start"})
            self.channel.close()
        t = threading.Thread(target=run, name="pyhv-migrate-ack", daemon=True)
        t.start()
        return t


class Incoming:
    def __init__(self, address: str) -> None:
        self.sock = uri.listen(address)
        self.uri = uri.bound(self.sock)

    def close(self) -> None:
        self.sock.close()

    def receive(self, machine: Machine, timeout: float | None) -> Session:
        self.sock.settimeout(timeout)
        try:
            conn, peer = self.sock.accept()
        except TimeoutError:
            raise MigrationError(f"no source connected to {self.uri} within "
                                 f"{timeout:g} s") from None
        finally:
            self.sock.close()            # one source per destination
        conn.settimeout(IO_TIMEOUT_S)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ch = Channel(conn, f"the source {peer[0]}:{peer[1]}")
        try:
            return self._receive(machine, ch)
        except MigrationError as e:
            with contextlib.suppress(PyhvError, OSError):
                ch.sock.settimeout(1.0)
                ch.send_json(REPLY, {"ok": False, "error": str(e)})
            ch.close()
            raise MigrationError(f"the incoming migration failed: {e}; nothing ran") \
                from None

    def _receive(self, machine: Machine, ch: Channel) -> Session:
        assert machine.memory is not None
        _, hello = ch.recv_json((HELLO,))
        why = header.check(header.describe(machine), hello)
        copy = hello.get("storage") == "copy"
        if why is None and copy:
            why = storage.check_target(machine, hello.get("disks"))
        if why is not None:
            raise MigrationError(f"refused at the header: {why}")
        devs = handover.blk_devices(machine)
        if copy:                                 # its own images: written from now on
            try:
                handover.take(machine)
            except PyhvError as e:
                raise MigrationError(f"--copy-storage: cannot open this side's disk: "
                                     f"{e}") from None
        ch.send_json(REPLY, {"ok": True})
        s = Session(ch)
        reader = PageReader(machine.memory)
        while True:
            kind, payload = ch.recv()
            if kind == PAGES:
                s.pages += apply_record(reader, payload)
            elif kind == DISK and copy:
                try:
                    storage.write_record(devs, payload)
                except (ImageError, OSError) as e:
                    raise MigrationError(f"--copy-storage: writing this side's disk "
                                         f"failed: {e}") from None
                s.disk_chunks += 1
            elif kind == ROUND:
                s.rounds += 1
                obj = decode_json(kind, payload, ch.peer)
                ch.send_json(REPLY, {"ok": True, "round": obj.get("round")})
            elif kind == ABORT:
                obj = decode_json(kind, payload, ch.peer)
                raise MigrationError(f"the source gave up: {obj.get('error')}")
            elif kind == STATE:
                s.t_received = time.monotonic()
                obj = decode_json(kind, payload, ch.peer)
                try:
                    state = VmState.from_json(obj.get("vmstate"))
                    handover.take(machine)       # the source has released its disks
                    apply(machine, state)
                except PyhvError as e:
                    raise MigrationError(f"the VM's state does not apply here: {e}") \
                        from None
                s.t_applied = time.monotonic()
                t_pause = obj.get("t_pause")
                s.t_pause = float(t_pause) if isinstance(t_pause, int | float) else 0.0
                s.stats = {"bytes": ch.received, "rounds": s.rounds, "pages": s.pages}
                return s
            else:
                raise MigrationError(f"{ch.peer} sent a {NAMES[kind]} record mid-stream")


def say(text: str) -> None:
    sys.stderr.write(f"pyhv: {text}\n")
    sys.stderr.flush()
