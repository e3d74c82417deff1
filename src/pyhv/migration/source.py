"""The source side of a pre-copy live migration: rounds of RAM, then the switch-over.

Design: `OutgoingMigration(runner, machine, options)` runs on its own thread (`start()`),
beside the VM's run loop, and speaks to it only through the Runner's controls (pause,
wait_parked, resume, stop). The steps:

1. connect, send the header (HELLO); the destination answers REPLY ok, or why not;
2. start tracking what to send again (pyhv.migration.dirty: kvm's dirty log; on emu a
   comparison with a copy of what was sent), then send every RAM page while the guest
   runs (round 1), zero pages as markers;
3. each next round takes the pages dirtied since the last one and estimates the
   downtime: their transfer at the measured bandwidth plus the tracker's own pass
   (measured: it runs once more inside the pause); while that is over
   `max_downtime_ms`, send them and go on (when the pass alone nearly fills the target,
   the pages may still take FLOOR_SHARE of it) (at most `max_rounds`; auto-converge throttles
   the vCPUs when the guest dirties faster than the link carries, pyhv.migration.throttle);
4. switch-over: pause (t_pause), send the last dirty pages, `vmstate.capture`, send the
   STATE record (with t_pause); the destination applies it, starts its run loop and
   answers REPLY running with t_first (time.monotonic() of its run start: one host
   clock, CLOCK_MONOTONIC, so downtime = t_first - t_pause across the two processes);
5. only then the source's run ends (StopRequest "migrated", status 0).

--copy-storage (pyhv.migration.storage): the disks are copied before round 1 of RAM
with block-layer dirty tracking on, what the guest wrote is sent again after each round
and, inside the pause, after the capture; the source's images are not released (the
destination has its own). Shared storage (pyhv.disk.handover): after the capture (the
disks quiesced) the source flushes and closes its images, releasing their locks, and
only then sends STATE; the destination opens them when STATE arrives. A failure after
that takes them back before the guest resumes; when they cannot be taken back (the
destination has them) the source stops instead of resuming: two writers on one image
would corrupt it.

Invariants: until the destination's "running" arrives, every failure (connection cut,
destination gone, a refusal, a corrupt answer, cancel) turns dirty tracking off and
resumes the guest where it was paused: the source VM keeps running and loses nothing.
The guest's RAM is read while it runs only before the pause; the last pass and the
capture happen inside one pause (one instant). The progress (`progress()`) is a
JSON-able dict, read from other threads; the source run ends only once the final report
was read (and REPORT_GRACE_S more, for the answer to leave the process) or REPORT_WAIT_S
passed.

The one window left open: the destination runs and its "running" answer is lost (the
connection cut just then): the source resumes too. The answer is sent at the
destination's first guest instruction, so the window is one round trip.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyhv.errors import PyhvError
from pyhv.machine import StopRequest
from pyhv.memory import PAGE_SIZE
from pyhv.migration import handover, header, storage, uri
from pyhv.migration.bandwidth import MB, Limiter, Meter
from pyhv.migration.dirty import tracker_for
from pyhv.migration.pages import PageReader
from pyhv.migration.stream import (
    ABORT,
    DISK,
    HELLO,
    PAGES,
    REPLY,
    ROUND,
    STATE,
    Channel,
    MigrationError,
)
from pyhv.vmstate import capture, check_savable

if TYPE_CHECKING:
    from pyhv.machine import Machine
    from pyhv.runner import Runner

CONNECT_TIMEOUT_S = 10.0
IO_TIMEOUT_S = 30.0         # a peer silent this long ends the migration
PARK_TIMEOUT_S = 10.0
REPORT_WAIT_S = 3.0         # how long a finished source waits for its report to be read
REPORT_GRACE_S = 0.5        # then the time the API's answer has to reach the client
DEFAULT_DOWNTIME_MS = 50.0
FLOOR_SHARE = 0.2           # the pages' least share of the target (see _main)
DEFAULT_MAX_ROUNDS = 30
TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class Options:
    uri: str
    max_downtime_ms: float = DEFAULT_DOWNTIME_MS
    bandwidth_mbps: float | None = None      # 10^6 bytes per second; None: no limit
    max_rounds: int = DEFAULT_MAX_ROUNDS
    auto_converge: bool = True
    copy_storage: bool = False               # mirror the disks over the connection

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Options:
        """The control API's PUT /migrate body; MigrationError naming a bad field."""
        known = {"uri", "max_downtime_ms", "bandwidth_mbps", "max_rounds", "auto_converge",
                 "copy_storage"}
        extra = sorted(set(body) - known)
        if extra:
            raise MigrationError(f"unknown field(s) in the body: {', '.join(extra)}")
        target = body.get("uri")
        if not isinstance(target, str):
            raise MigrationError("the body needs 'uri' as a string (tcp:HOST:PORT)")
        uri.parse(target)
        opts = cls(target)
        for name, lo, hi in (("max_downtime_ms", 1.0, 3.6e6), ("bandwidth_mbps", 0.001, 1e6)):
            v = body.get(name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
                raise MigrationError(f"{name} must be a number from {lo:g} to {hi:g}")
            setattr(opts, name, float(v))
        rounds = body.get("max_rounds")
        if rounds is not None:
            if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= 1000:
                raise MigrationError("max_rounds must be an integer from 1 to 1000")
            opts.max_rounds = rounds
        for name in ("auto_converge", "copy_storage"):
            flag = body.get(name)
            if flag is not None:
                if not isinstance(flag, bool):
                    raise MigrationError(f"{name} must be true or false")
                setattr(opts, name, flag)
        return opts


class OutgoingMigration:
    def __init__(self, runner: Runner, machine: Machine, options: Options) -> None:
        check_savable(machine)                 # a device without a record: refuse now
        self.runner = runner
        self.m = machine
        self.opts = options
        self._cancel = threading.Event()
        self.report_taken = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._p: dict[str, Any] = {
            "status": "setup", "uri": options.uri, "round": 0, "round_pages": 0,
            "round_sent": 0, "pages": 0, "zero_pages": 0, "bytes": 0,
            "bandwidth_bps": 0.0, "dirty_rate_pps": 0.0, "expected_downtime_ms": None,
            "max_downtime_ms": options.max_downtime_ms, "throttle": 0.0,
            "downtime_ms": None, "total_s": None, "error": None, "history": [],
            "storage": "copy" if options.copy_storage else "shared",
            "disk_chunks": 0, "disk_bytes": 0, "disk_again": 0,
        }
        self._t0 = time.monotonic()
        self._sent: Callable[[int, bytes], None] | None = None

    # ------------------------------------------------------------------ other threads

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="pyhv-migrate", daemon=True)
        self._thread.start()

    def progress(self) -> dict[str, Any]:
        with self._lock:
            p = dict(self._p)
            p["history"] = list(p["history"])
        if p["status"] in TERMINAL:
            self.report_taken.set()
        return p

    def active(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def cancel(self, join_s: float = 15.0) -> None:
        self._cancel.set()
        self.report_taken.set()
        if self._thread is not None:
            self._thread.join(join_s)

    def _set(self, **kv: Any) -> None:
        with self._lock:
            self._p.update(kv)

    # ------------------------------------------------------------------ the migration

    def _main(self) -> None:
        from pyhv.migration.throttle import Throttle
        assert self.m.memory is not None
        tracker = tracker_for(self.m)
        ch: Channel | None = None
        paused = False
        released = False
        throttle = Throttle(self.runner)
        mirror = storage.Mirror(self.m) if self.opts.copy_storage else None
        try:
            ch = Channel(uri.connect(self.opts.uri, CONNECT_TIMEOUT_S), self.opts.uri)
            ch.sock.settimeout(IO_TIMEOUT_S)
            hello = header.describe(self.m)
            if mirror is not None:
                hello["storage"] = "copy"
                hello["disks"] = storage.sizes(self.m)
            ch.send_json(HELLO, hello)
            _, reply = ch.recv_json((REPLY,))
            if not reply.get("ok"):
                raise MigrationError(f"the destination refused: {reply.get('error')}")
            reader = PageReader(self.m.memory)
            limiter = Limiter(None if self.opts.bandwidth_mbps is None
                              else self.opts.bandwidth_mbps * MB)
            if mirror is not None:                # the disks first, the guest running
                mirror.start()
                self._set(status="storage")
                mirror.bulk(self._disk_sender(ch, mirror, limiter), self._check_running)
                self._set(status="active")
            tracker.start()
            self._sent = tracker.sent
            pfns = reader.frames()
            rnd = 0
            bandwidth = 0.0
            while True:
                rnd += 1
                if mirror is not None:            # what the guest wrote meanwhile
                    mirror.dirty(self._disk_sender(ch, mirror, limiter), self._check_running)
                meter = self._send_round(ch, reader, limiter, rnd, pfns)
                bandwidth = meter.rate()
                t_dirty = time.monotonic()
                pfns = tracker.dirty()
                scan_ms = (time.monotonic() - t_dirty) * 1000.0
                dirty_rate = len(pfns) / max(t_dirty - meter.t0, 1e-6)
                transfer_ms = len(pfns) * PAGE_SIZE / bandwidth * 1000.0
                # the pause also holds one more pass of the tracker (emu: a RAM scan):
                # the estimate includes it; when that pass alone nearly fills the target,
                # the pages' share may still use a fifth of it (else it never converges)
                expected_ms = transfer_ms + scan_ms
                target = self.opts.max_downtime_ms
                budget = max(target - scan_ms, target * FLOOR_SHARE)
                self._set(bandwidth_bps=bandwidth, dirty_rate_pps=dirty_rate,
                          expected_downtime_ms=expected_ms, scan_ms=scan_ms)
                self._log(rnd, meter, dirty_rate, expected_ms)
                if transfer_ms <= budget or rnd >= self.opts.max_rounds:
                    break
                if self.opts.auto_converge:
                    throttle.adjust(dirty_rate * PAGE_SIZE, bandwidth)
                    self._set(throttle=throttle.fraction)
            # ---- switch-over: one pause covers the last pages and the capture
            self._set(status="switchover")
            t_pause = time.monotonic()
            throttle.stop()
            self.runner.pause()
            paused = True
            if not self.runner.wait_parked(PARK_TIMEOUT_S):
                raise MigrationError(f"the vCPUs did not reach a safe point within "
                                     f"{PARK_TIMEOUT_S:g} s")
            self._check_running()
            t_parked = time.monotonic()
            last = sorted(set(pfns) | set(tracker.dirty()))   # pfns: found, not sent
            t_scanned = time.monotonic()
            meter = self._send_round(ch, reader, Limiter(None), rnd + 1, last)
            self._log(rnd + 1, meter, 0.0, None)
            t_pages = time.monotonic()
            state = capture(self.m)
            if mirror is not None:                # the disks quiesced: the last chunks
                mirror.dirty(self._disk_sender(ch, mirror, Limiter(None)),
                             self._check_running)
            else:
                handover.release(self.m)          # flushed, unlocked: the destination opens it
                released = True
            t_state = time.monotonic()
            ch.send_json(STATE, {"vmstate": state.to_json(), "t_pause": t_pause,
                                 "t_state": t_state, "rounds": rnd + 1})
            _, ack = ch.recv_json((REPLY,))
            if not ack.get("ok") or not ack.get("running"):
                raise MigrationError(f"the destination could not start the VM: "
                                     f"{ack.get('error')}")
            t_first = ack.get("t_first")
            downtime = ((t_first - t_pause) * 1000.0 if isinstance(t_first, int | float)
                        else None)
            total = time.monotonic() - self._t0
            self._set(status="completed", downtime_ms=downtime, total_s=total,
                      rounds=rnd + 1, bytes=ch.sent, switchover_ms=_breakdown(
                          [("park", t_pause), ("scan", t_parked), ("pages", t_scanned),
                           ("capture", t_pages), ("state_transfer", t_state),
                           ("apply", ack.get("t_received")),
                           ("start", ack.get("t_applied")), ("", t_first)]))
            ch.close()
            ch = None
            if self.report_taken.wait(REPORT_WAIT_S):
                time.sleep(REPORT_GRACE_S)
            self.runner.stop(StopRequest(
                "migrated", 0, f"migrated to {self.opts.uri} (downtime "
                f"{downtime if downtime is not None else float('nan'):.1f} ms, "
                f"{rnd + 1} rounds, {ch_bytes(self._p)} bytes, {total:.2f} s)"))
        except (PyhvError, OSError) as e:
            cancelled = self._cancel.is_set()
            msg = str(e) if isinstance(e, PyhvError) else f"{type(e).__name__}: {e}"
            if ch is not None:
                with contextlib.suppress(PyhvError, OSError):
                    ch.sock.settimeout(1.0)
                    ch.send_json(ABORT, {"error": msg})
            self._set(status="cancelled" if cancelled else "failed", error=msg,
                      total_s=time.monotonic() - self._t0)
        finally:
            throttle.stop()
            if ch is not None:
                ch.close()
            if mirror is not None:
                mirror.stop()
            if self.m.engine is not None:
                with contextlib.suppress(PyhvError, NotImplementedError):
                    tracker.close()
            if paused and self._p["status"] != "completed":
                self._resume(released)

    def _disk_sender(self, ch: Channel, mirror: storage.Mirror,
                     limiter: Limiter) -> Callable[[bytes], None]:
        def send(payload: bytes) -> None:
            size = ch.send(DISK, payload)
            limiter.throttle(size)
            with self._lock:
                self._p["disk_chunks"] = mirror.chunks + 1
                self._p["disk_bytes"] = mirror.bytes
                self._p["disk_again"] = mirror.again
                self._p["bytes"] = ch.sent
        return send

    def _resume(self, released: bool) -> None:
        """Back to running after a failed migration: the disks first (shared storage).
        An image this side cannot take again is held by the destination, which then
        runs the guest: this side must not, and its run ends."""
        if released:
            try:
                handover.take(self.m)
            except PyhvError as e:
                msg = (f"the migration failed after the switch-over and the disks cannot "
                       f"be taken back ({e}): the destination may run the VM; this side "
                       "stops")
                self._set(error=msg)
                self.runner.stop(StopRequest("migration-failed", 1, msg))
                return
        self.runner.resume()

    def _log(self, rnd: int, meter: Meter, dirty_rate: float,
             expected_ms: float | None) -> None:
        with self._lock:
            self._p["history"].append({
                "round": rnd, "pages": self._p["round_sent"], "bytes": meter.bytes,
                "seconds": meter.elapsed(), "dirty_rate_pps": dirty_rate,
                "expected_downtime_ms": expected_ms, "throttle": self._p["throttle"]})

    def _check_running(self) -> None:
        if self._cancel.is_set():
            raise MigrationError("the migration was cancelled")
        if self.runner.state.value == "stopped":
            raise MigrationError("the VM's run ended during the migration")

    def _send_round(self, ch: Channel, reader: PageReader, limiter: Limiter, rnd: int,
                    pfns: list[int]) -> Meter:
        meter = Meter()
        limiter.start()
        self._set(status="active" if self._p["status"] == "setup" else self._p["status"],
                  round=rnd, round_pages=len(pfns), round_sent=0)
        sent = zeros = 0
        for payload, n, z in reader.pack(pfns, self._sent):
            self._check_running()
            size = ch.send(PAGES, payload)
            meter.add(size)
            limiter.throttle(size)
            sent += n
            zeros += z
            with self._lock:
                self._p["round_sent"] = sent
                self._p["pages"] += n
                self._p["zero_pages"] += z
                self._p["bytes"] = ch.sent
        ch.send_json(ROUND, {"round": rnd, "pages": sent, "zero_pages": zeros})
        self._round_acked(ch, rnd)
        return meter

    def _round_acked(self, ch: Channel, rnd: int) -> None:
        """Wait until the destination has written the round into its RAM: the meter
        then measures what the link and the destination carry end to end (not what the
        socket buffers took), and no backlog of old rounds is left for the pause."""
        _, reply = ch.recv_json((REPLY,))
        if not reply.get("ok") or reply.get("round") != rnd:
            raise MigrationError(f"the destination did not take round {rnd}: "
                                 f"{reply.get('error') or reply}")


def _breakdown(marks: list[tuple[str, object]]) -> dict[str, float]:
    """Where the downtime went: ms from each mark to the next (one host clock)."""
    out: dict[str, float] = {}
    for (name, t), (_, t_next) in zip(marks, marks[1:], strict=False):
        if isinstance(t, int | float) and isinstance(t_next, int | float):
            out[name] = round((t_next - t) * 1000.0, 3)
    return out


def ch_bytes(p: dict[str, Any]) -> int:
    return int(p.get("bytes") or 0)
