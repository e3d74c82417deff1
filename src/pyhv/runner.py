"""The vCPU run loop: a state machine that runs the guest and routes its exits.

    CREATED --start--> RUNNING <--pause/resume--> PAUSED
                          |                          |
                          +--------> STOPPED <-------+

Each turn of the loop: run the vCPU until an exit; route port I/O and MMIO to the buses;
fire due timers; move console input into the UART; act on a stop request. HLT with
interrupts enabled idles until the next timer deadline or input; HLT with interrupts off
can never wake, so it ends the run (status 0: how a bare-metal guest, or Linux's
`poweroff` on a machine without ACPI, says "done").

Time: on a hardware engine guest time is host time, and a ticker thread kicks the vCPU
when a timer falls due. On a software engine the vCPU stops itself at deadlines; when the
guest idles, its virtual clock runs at the host's rate until the next deadline, never
faster (not even to catch up a guest that lags the host), so an idle guest sleeps instead
of spinning through its timers, and a guest's timeout of T gives a host-side peer (passt,
another VM) at least T of host time to answer.

Exit statuses of `pyhv run` (pyhv's own are even, the guest's debug-exit odd):

    0    the guest halted with interrupts off, or powered off, or Ctrl-] left it
    (v << 1) | 1   the guest wrote v to the debug-exit port 0xf4 (QEMU's convention)
    4    the guest crashed: triple fault, an engine internal error, a kernel panic
         (and, from the run command, a reset loop)
    70   internal error: pyhv itself failed (a device model or the run loop raised);
         sysexits' EX_SOFTWARE. Never the guest's doing: a bug in pyhv.
    124  --timeout expired (or the `max_exits` budget of a caller's run ran out)
    130  interrupted (SIGINT); the run command maps SIGTERM/SIGHUP to 143/129
    141  (the run command) stdout was closed, as for a tool killed by SIGPIPE

Errors, one policy for every engine: every guest access to a device goes through one
function (`_access`), whether the engine calls it from inside guest execution (emu) or
returns an exit for it (kvm, trap). What the guest can cause is the guest's: an access
nowhere is all ones (or, with --strict-io, the end of the run, status 4); a triple fault
or an instruction the engine cannot run is a crash (status 4). An exception raised by
pyhv's own code (a device model, a timer callback, the run loop, an engine's Python
hooks, which re-raise it from `run()`) is a pyhv bug: the run ends with status 70 and a
`RunResult` whose `detail` says in one line what failed where and whose `traceback`
holds the Python traceback for a log.

Options for callers other than `pyhv run` (the popek probe): `max_exits` bounds the
exits routed in one run, `last_exit` keeps the exit that ended it (a Shutdown's or an
InternalError's own fields), and devices a caller registers on the machine's buses take
part like any other (a device that calls `request_stop` ends the run with its reason).

Pause (the control API, pyhv.vmcontrol): `pause()` from any thread kicks the vCPUs;
each loop stops them at its next safe point (between two exits, never inside a device
access), sets `_parked` and waits for `resume()`; stop requests and --timeout are still
honoured while paused. Guest state, counters and the virtual clock do not move while
parked.

Several vCPUs (`--cpus N`): on a software engine they take turns on this thread
(`_smp_loop`, round robin in guest-time slices); on a hardware engine each runs on its own
thread and everything but KVM_RUN happens under the machine's lock (`_threaded_loop`).

Invariants: only the thread that calls `run()` touches the vCPU, devices and timers
(other threads only kick the vCPU, feed the UART, post to `machine.deferred` and set
events), except that with several vCPUs on threads each vCPU's thread runs its vCPU and,
holding the machine lock, touches the devices and timers; every exit path stops
the ticker thread; a run always ends with a `RunResult`, never an exception (a hostile
guest gets status 4 with the reason, a pyhv bug status 70).
"""

from __future__ import annotations

import contextlib
import enum
import os
import select
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from pyhv.arch.x86.linear import code_bytes
from pyhv.clock import VirtualClock
from pyhv.devices.bus import Bus, UnhandledIo
from pyhv.exits import (
    Exit,
    Halt,
    InternalError,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
)
from pyhv.machine import Machine, StopRequest

STATUS_OK = 0
STATUS_CRASH = 4
STATUS_INTERNAL = 70          # sysexits.h EX_SOFTWARE: pyhv failed, not the guest
STATUS_TIMEOUT = 124
STATUS_INTERRUPTED = 130
IDLE_SLICE_S = 0.05          # longest sleep before re-checking stop requests
TICK_MIN_S = 0.0002
SMP_SLICE_NS = 1_000_000     # a vCPU's time slice among several, in guest time
CODE_SYNC_MIN_NS = 50_000_000  # least guest time between two IPI-driven code flushes


class VmState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass
class RunResult:
    status: int
    reason: str               # "halt", "debug-exit", "reset", "crash", "internal", ...
    detail: str = ""
    rip: int | None = None
    insn: bytes = b""
    traceback: str = ""       # reason "internal": the Python traceback of pyhv's failure


class DeviceFault(Exception):
    """A device model raised while handling a guest access: a bug in pyhv, not the
    guest's doing. The message names the access and the device."""


@dataclass
class RunStats:
    exits: Counter[str] = field(default_factory=Counter)
    io_ports: Counter[int] = field(default_factory=Counter)
    t_guest: float = 0.0      # inside vcpu.run()
    t_idle: float = 0.0       # halted, waiting for a timer or input
    t_total: float = 0.0


class Runner:
    """Runs one Machine's vCPU to its end."""

    def __init__(self, machine: Machine, *, timeout: float | None = None,
                 on_turn: Callable[[], None] = lambda: None,
                 max_exits: int | None = None) -> None:
        if machine.vcpu is None:
            raise ValueError("machine has no vCPU")
        self.m = machine
        self.vcpu = machine.vcpu
        self.timeout = timeout
        self.max_exits = max_exits    # route at most this many exits; the next one ends it
        self.last_exit: Exit | None = None
        self.on_turn = on_turn        # run-loop thread hook, after every exit and idle pass
        # called from each thread about to run vCPUs, with their indices (vCPU pinning,
        # pyhv.sched.pin); an exception from it ends the run like any pyhv error
        self.on_vcpu_thread: Callable[[tuple[int, ...]], None] | None = None
        self.state = VmState.CREATED
        self.stats = RunStats()
        self.engine_stats: dict[str, int | float] = {}
        self.wake = threading.Event()         # input arrived / stop requested
        self._resume = threading.Event()
        self._resume.set()
        self._parked = threading.Event()      # paused, and no vCPU is in guest code
        self._done = threading.Event()
        self._deadline: float | None = None
        self._timed_out = False
        self._t0 = 0.0
        self._guest0_ns = 0     # guest time when run() began (not 0 after a restore)
        self.virtual = isinstance(machine.clock, VirtualClock)
        self.vcpus = list(machine.vcpus) or [self.vcpu]
        for v in self.vcpus:
            v.attach_io(self._pio, self._mmio)
            if isinstance(machine.clock, VirtualClock):
                v.attach_clock(machine.clock, machine.timers)
        machine.deferred.waker = self.kick    # a device I/O thread finished something
        self.slices: Counter[int] = Counter()  # slices run per vCPU (several vCPUs)

    # ------------------------------------------------------------------ control (any thread)

    def pause(self) -> None:
        """Ask the vCPUs to stop at their next safe point (between exits); the run loop
        then waits. `wait_parked` tells when they have stopped."""
        if self.state is VmState.RUNNING:
            self._resume.clear()
            self._parked.clear()
            self.state = VmState.PAUSED
            self.wake.set()
            self._kick_vcpus()

    def wait_parked(self, timeout: float) -> bool:
        """After `pause()`: True once no vCPU runs guest code (until `resume()`); also
        True when the run has ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._done.is_set() or self._parked.wait(IDLE_SLICE_S):
                return True
        return False

    def resume(self) -> None:
        if self.state is VmState.PAUSED:
            self._parked.clear()
            self.state = VmState.RUNNING
            self._resume.set()

    @property
    def t_start(self) -> float:
        """time.monotonic() when `run()` began (0 before)."""
        return self._t0

    def stop(self, req: StopRequest) -> None:
        self.m.request_stop(req)
        self.wake.set()
        self._resume.set()

    def kick(self) -> None:
        """Input arrived: wake an idle loop and make a running vCPU look at it."""
        self.wake.set()
        self._kick_vcpus()

    def _kick_vcpus(self) -> None:
        for v in self.vcpus:
            v.kick()

    # ------------------------------------------------------------------ the loop

    def run(self) -> RunResult:
        if self.state is not VmState.CREATED:
            raise RuntimeError(f"run() in state {self.state.value}")
        self.state = VmState.RUNNING
        self._t0 = time.monotonic()
        self._guest0_ns = self.m.clock.now_ns()
        if self.timeout is not None:
            self._deadline = self._t0 + self.timeout
        ticker = threading.Thread(target=self._ticker, name="pyhv-ticker", daemon=True)
        ticker.start()
        undo_signals = self._kick_on_signals()
        try:
            result = self._loop()
        except KeyboardInterrupt:
            result = RunResult(STATUS_INTERRUPTED, "interrupted", "interrupted by SIGINT")
        except Exception as e:  # noqa: BLE001 - the one policy: a pyhv bug, reported
            result = self._internal(e)
        finally:
            self._done.set()
            undo_signals()
            ticker.join(timeout=1.0)
            self.state = VmState.STOPPED
            self.engine_stats = self.vcpu.stats()
            self.stats.t_total = time.monotonic() - self._t0
            self.m.poll_devices()
        return result

    def _kick_on_signals(self) -> Callable[[], None]:
        """Make SIGINT/SIGTERM/SIGHUP reach Python promptly while the vCPU runs.

        Python runs signal handlers only between bytecodes of the main thread; a software
        CPU spinning inside unicorn may not return for a long time. The C-level handler
        writes the signal number to a wakeup pipe; a thread reading it kicks the vCPU, so
        `run()` returns and the handler (KeyboardInterrupt, or the run command's stop
        request) runs. Other signals (SIGUSR1 is the KVM engine's own kick) are ignored
        here. Only possible on the main thread; elsewhere a no-op.
        """
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        try:
            old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:
            os.close(r)
            os.close(w)
            return lambda: None
        wanted = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}

        def watch() -> None:
            while not self._done.is_set():
                ready, _, _ = select.select([r], [], [], IDLE_SLICE_S)
                if not ready:
                    continue
                try:
                    data = os.read(r, 64)
                except BlockingIOError:
                    continue
                if any(n in wanted for n in data):
                    self.wake.set()
                    self._kick_vcpus()

        t = threading.Thread(target=watch, name="pyhv-signals", daemon=True)
        t.start()

        def undo() -> None:
            signal.set_wakeup_fd(old)
            with contextlib.suppress(BlockingIOError):
                os.write(w, b"\0")         # not a signal number: only wakes the watcher
            t.join(timeout=1.0)
            os.close(r)
            os.close(w)
        return undo

    def _between_runs(self) -> RunResult | None:
        """Before each run of the vCPU(s) on the run loop's thread: the result when a stop
        request or the timeout ends the run; while paused, park (`_parked` tells pause()
        the vCPUs are stopped) until resumed or stopped; None: run on."""
        m = self.m
        while True:
            if m.stop_request is not None:
                return self._stopped(m.stop_request)
            if self._expired():
                return self._timeout()
            if self.state is not VmState.PAUSED:
                return None
            self._parked.set()
            self._resume.wait(IDLE_SLICE_S)

    def _loop(self) -> RunResult:
        m = self.m
        if len(self.vcpus) > 1:
            return self._smp_loop() if self.virtual else self._threaded_loop()
        vcpu = self.vcpu
        st = self.stats
        timers = m.timers
        if self.on_vcpu_thread is not None:
            self.on_vcpu_thread((0,))
        while True:
            ended = self._between_runs()
            if ended is not None:
                return ended
            t = time.perf_counter()
            try:
                ex = vcpu.run()
            except OSError as e:              # KVM_RUN itself failed (e.g. EFAULT)
                return RunResult(STATUS_CRASH, "crash", f"the engine failed to run the "
                                 f"vCPU: {e.strerror or e}", rip=self._rip())
            st.t_guest += time.perf_counter() - t
            kind = type(ex).__name__
            st.exits[kind] += 1
            self.last_exit = ex
            if self.max_exits is not None and st.exits.total() > self.max_exits:
                return RunResult(STATUS_TIMEOUT, "exit-limit",
                                 f"no result after {self.max_exits} exits", rip=self._rip())
            result = self._handle(ex)
            if result is not None:
                return result
            timers.fire_due()
            m.poll_devices()
            self.on_turn()

    def _smp_loop(self) -> RunResult:
        """Several vCPUs on this one thread (the software CPU: LOCK-prefixed
        instructions stay atomic because only one vCPU executes at a time).

        Round robin over the vCPUs that have something to do: not waiting for a SIPI,
        and not halted unless an interrupt they can take is pending (an idle vCPU costs
        nothing). Each runs until its next exit or the end of its slice, SMP_SLICE_NS of
        guest time (a timer on the queue; a vCPU that sends an IPI ends its slice at
        once, so the target runs next). Guest time is the machine's one clock, so the
        order and length of slices do not depend on the host: deterministic. When no
        vCPU can run, the loop idles as for one vCPU; when none can ever run again
        (every one halted with IF=0 or waiting for a SIPI) the run ends with status 0.
        Cross-modifying code: each software vCPU has its own translation cache and sees
        only its own stores to code. A vCPU restarted by INIT/SIPI drops its translated
        code before it runs; one that accepted an IPI from another drops it before it
        next runs, at most once per CODE_SYNC_MIN_NS of guest time (a flush costs tens
        of milliseconds of retranslation), so code another vCPU changed and announced
        with an IPI (Linux's text_poke_sync) is seen within that bound, not at once.
        """
        m = self.m
        st = self.stats
        timers = m.timers
        n = len(self.vcpus)
        halted = [False] * n
        if_on = [True] * n
        ipis_seen = [0] * n
        stale = [False] * n              # an IPI arrived since the last code flush
        flushed_at = [0] * n
        nxt = 0
        last = -1

        def noop() -> None:
            pass

        def ready() -> bool:
            return any(m.runnable(i, halted[i], if_on[i]) for i in range(n))

        if self.on_vcpu_thread is not None:
            self.on_vcpu_thread(tuple(range(n)))      # every vCPU runs on this thread
        while True:
            ended = self._between_runs()
            if ended is not None:
                return ended
            for i in range(n):
                if m.restarted[i]:
                    m.restarted[i] = False
                    halted[i], if_on[i] = False, True
                    self.vcpus[i].invalidate_code()
            runnable = [j % n for j in range(nxt, nxt + n)
                        if m.runnable(j % n, halted[j % n], if_on[j % n])]
            if not runnable:
                if all(m.wait_sipi[i] or not if_on[i] for i in range(n)):
                    return RunResult(STATUS_OK, "halt",
                                     "every vCPU halted with interrupts off", rip=self._rip())
                self._idle(ready)
                continue
            # a halted vCPU woken by an interrupt (its timer tick, an IPI) runs first, so
            # that its interrupt is not late by the others' slices (Linux counts jiffies
            # with them); the round robin order of the rest is kept, and no vCPU is
            # preferred twice in a row (an interrupt storm cannot starve the others)
            woken = [k for k in runnable if halted[k] and k != last]
            if woken:
                i = woken[0]
            else:
                i = runnable[0]
                nxt = (i + 1) % n
            last = i
            vcpu = self.vcpus[i]
            self.vcpu = vcpu
            m.current_cpu = i
            lapic = m.lapics[i]
            now = m.clock.now_ns()
            if lapic.ipis_from_others != ipis_seen[i]:
                ipis_seen[i] = lapic.ipis_from_others
                stale[i] = True
            if stale[i] and now - flushed_at[i] >= CODE_SYNC_MIN_NS:
                stale[i] = False
                flushed_at[i] = now
                vcpu.invalidate_code()
            handle = (timers.schedule(m.clock.now_ns() + SMP_SLICE_NS, noop)
                      if len(runnable) > 1 else None)
            vcpu.set_others_runnable(len(runnable) > 1)
            t = time.perf_counter()
            try:
                ex = vcpu.run()
            finally:
                if handle is not None:
                    timers.cancel(handle)
            st.t_guest += time.perf_counter() - t
            self.slices[i] += 1
            kind = type(ex).__name__
            st.exits[kind] += 1
            self.last_exit = ex
            if self.max_exits is not None and st.exits.total() > self.max_exits:
                return RunResult(STATUS_TIMEOUT, "exit-limit",
                                 f"no result after {self.max_exits} exits", rip=self._rip())
            if isinstance(ex, Halt):
                halted[i], if_on[i] = True, ex.interrupts_enabled
            else:
                halted[i] = False
                result = self._handle(ex)
                if result is not None:
                    return result
            timers.fire_due()
            m.poll_devices()
            self.on_turn()

    def _threaded_loop(self) -> RunResult:
        """Several vCPUs of a hardware engine (kvm): one host thread per vCPU around
        `run()` (KVM_RUN releases the GIL, so guest code runs in parallel), everything
        else under one machine lock: exits are routed to the devices, timers fired and
        interrupts acknowledged by one thread at a time (the devices' one-thread rule
        holds because the lock serialises them). A vCPU thread waits on the lock's
        condition while its vCPU is halted without an interrupt it can take or waits for
        a SIPI; an IPI or an I/O APIC message wakes it (the local APIC's `on_wake` kicks
        the vCPU out of KVM_RUN and notifies the condition). This thread fires timers
        at their deadlines (the ticker kicks the vCPUs) and watches stops and --timeout.
        """
        m = self.m
        n = len(self.vcpus)
        lock = m.lock
        cond = threading.Condition(lock)
        halted = [False] * n
        if_on = [True] * n
        in_guest = [False] * n          # inside v.run() (set and cleared under the lock)
        results: list[RunResult] = []
        errors: list[BaseException] = []
        done = threading.Event()

        def finish(r: RunResult) -> None:
            if not results:
                results.append(r)
            done.set()
            self._kick_vcpus()
            cond.notify_all()

        def wake(i: int) -> None:
            self.vcpus[i].kick()
            cond.notify_all()

        for i, lapic in enumerate(m.lapics):
            lapic.on_wake = lambda i=i: wake(i)             # type: ignore[misc]

        def worker(i: int) -> None:
            v = self.vcpus[i]
            try:
                if self.on_vcpu_thread is not None:
                    self.on_vcpu_thread((i,))
                while not done.is_set():
                    with lock:
                        while not done.is_set() and (self.state is VmState.PAUSED or
                                                     not m.runnable(i, halted[i], if_on[i])):
                            cond.wait(IDLE_SLICE_S)
                        if done.is_set():
                            return
                        if m.restarted[i]:
                            m.restarted[i] = False
                            halted[i], if_on[i] = False, True
                        in_guest[i] = True
                    try:
                        ex = v.run()
                    finally:
                        with lock:
                            in_guest[i] = False
                    with lock:
                        m.current_cpu = i
                        self.stats.exits[type(ex).__name__] += 1
                        self.slices[i] += 1
                        if isinstance(ex, Halt):
                            halted[i], if_on[i] = True, ex.interrupts_enabled
                            if all(m.wait_sipi[j] or (halted[j] and not if_on[j])
                                   for j in range(n)):
                                finish(RunResult(STATUS_OK, "halt", "every vCPU halted "
                                                 "with interrupts off"))
                        else:
                            halted[i] = False
                            self.vcpu = v
                            r = self._handle(ex)
                            if r is not None:
                                finish(r)
                        m.timers.fire_due()
                        m.poll_devices()
                        cond.notify_all()
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                with lock:
                    errors.append(e)
                    finish(RunResult(STATUS_INTERNAL, "internal", str(e)))

        threads = [threading.Thread(target=worker, args=(i,), name=f"pyhv-vcpu{i}",
                                    daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        try:
            while not done.is_set():
                with lock:
                    m.timers.fire_due()
                    m.poll_devices()
                    if m.stop_request is not None:
                        finish(self._stopped(m.stop_request))
                    elif self._expired():
                        finish(self._timeout())
                    else:
                        if self.state is VmState.PAUSED and not any(in_guest):
                            self._parked.set()
                        cond.notify_all()
                nxt = m.timers.next_deadline()
                wait = IDLE_SLICE_S if nxt is None else \
                    max(0.0, min(IDLE_SLICE_S, (nxt - m.clock.now_ns()) / 1e9))
                done.wait(max(wait, TICK_MIN_S))
        finally:
            done.set()
            self._kick_vcpus()
            with lock:
                cond.notify_all()
            for t in threads:
                t.join(timeout=5.0)
        if errors:
            raise errors[0]
        return results[0]

    def _handle(self, ex: Exit) -> RunResult | None:
        m = self.m
        if m.stop_request is not None:
            return None          # the loop ends with the request (e.g. debug-exit; cli; hlt)
        if isinstance(ex, IoOut):
            self.stats.io_ports[ex.port] += 1
            size = ex.size
            for i in range(ex.count):
                value = int.from_bytes(ex.data[i * size:(i + 1) * size], "little")
                self._access(m.pio, ex.port, size, value)
        elif isinstance(ex, IoIn):
            self.stats.io_ports[ex.port] += 1
            size = ex.size
            for i in range(ex.count):
                value = self._access(m.pio, ex.port, size, None)
                ex.data[i * size:(i + 1) * size] = value.to_bytes(size, "little")
        elif isinstance(ex, MmioWrite):
            self._access(m.mmio, ex.addr, len(ex.data), int.from_bytes(ex.data, "little"))
        elif isinstance(ex, MmioRead):
            size = len(ex.data)
            ex.data[:] = self._access(m.mmio, ex.addr, size, None).to_bytes(size, "little")
        elif isinstance(ex, Halt):
            if not ex.interrupts_enabled:
                return RunResult(STATUS_OK, "halt", "the guest halted with interrupts off",
                                 rip=self._rip())
            self._idle()
        elif isinstance(ex, Shutdown):
            return RunResult(STATUS_CRASH, "crash", f"guest {ex.reason}", rip=ex.rip,
                             insn=self._insn(ex.rip))
        elif isinstance(ex, InternalError):
            return RunResult(STATUS_CRASH, "crash", ex.reason, rip=ex.rip,
                             insn=ex.insn or self._insn(ex.rip))
        return None              # Interrupted: timers and input are looked at by the loop

    def _idle(self, ready: Callable[[], bool] | None = None) -> None:
        """HLT with IF=1: wait for an interrupt (timer, input) or a stop (`ready`: the
        wake condition, by default the vCPU's interrupt controller)."""
        m = self.m
        wake_up = ready or m.interrupt_pending
        timers = m.timers
        t_start = time.perf_counter()
        # a software engine's guest time while idle runs at the host's rate, never faster
        # (QEMU's icount with sleep=on): from this idle's start it may reach
        # guest0 + host time since then. Skipping at once to the next deadline (catching
        # up a guest that lags the host) let a guest's timeouts (udhcpc's 1 s, ARP's, ping's
        # wait for a reply) expire before a host-side peer (passt, another VM) had any time
        # to answer: on a loaded host the answer then came "too late".
        idle_host0 = time.monotonic()
        idle_guest0 = m.clock.now_ns()
        try:
            while True:
                # cleared before the devices are polled, never after: a device thread that
                # posts while they are polled then leaves the event set and the wait below
                # returns at once (clearing later lost such a wake-up for a whole slice)
                self.wake.clear()
                timers.fire_due()
                m.poll_devices()
                if wake_up() or m.stop_request is not None or self._expired():
                    return
                if self.state is VmState.PAUSED:
                    return
                self.on_turn()
                nxt = timers.next_deadline()
                now = m.clock.now_ns()
                if self.virtual:
                    assert isinstance(m.clock, VirtualClock)
                    host_ns = idle_guest0 + int((time.monotonic() - idle_host0) * 1e9)
                    if nxt is None:
                        self.wake.wait(IDLE_SLICE_S)
                    elif nxt <= host_ns:
                        m.clock.skip_to(nxt)       # the host's time reached it: fire it
                    else:
                        if host_ns > now:
                            m.clock.skip_to(host_ns)
                        self.wake.wait(min((nxt - host_ns) / 1e9, IDLE_SLICE_S))
                else:
                    wait = IDLE_SLICE_S if nxt is None else (nxt - now) / 1e9
                    if wait > 0:
                        self.wake.wait(min(wait, IDLE_SLICE_S))
        finally:
            self.stats.t_idle += time.perf_counter() - t_start

    def _ticker(self) -> None:
        """Kick the vCPU when a host-clock timer falls due or the timeout expires."""
        m = self.m
        last_kicked: int | None = None
        while not self._done.is_set():
            sleep = IDLE_SLICE_S
            if self._deadline is not None:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    self._timed_out = True
                    self.kick()
                    self._done.wait(IDLE_SLICE_S)
                    continue
                sleep = min(sleep, left)
            if not self.virtual:
                nxt = m.timers.next_deadline()
                if nxt is not None:
                    due = (nxt - m.clock.now_ns()) / 1e9
                    if due <= 0:
                        if nxt != last_kicked:
                            last_kicked = nxt
                            self._kick_vcpus()
                        sleep = TICK_MIN_S * 5
                    else:
                        sleep = min(sleep, max(due, TICK_MIN_S))
            self._done.wait(sleep)

    # ------------------------------------------------------------------ endings

    def _expired(self) -> bool:
        if self._timed_out:
            return True
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self._timed_out = True
        return self._timed_out

    def _timeout(self) -> RunResult:
        assert self.timeout is not None
        return RunResult(STATUS_TIMEOUT, "timeout",
                         f"the guest was still running after --timeout {self.timeout:g} s",
                         rip=self._rip())

    def _stopped(self, req: StopRequest) -> RunResult:
        return RunResult(req.status, req.kind, req.detail)

    def _internal(self, e: Exception) -> RunResult:
        """A pyhv bug ended the run: one line for the user, the traceback for a log."""
        detail = str(e) if isinstance(e, DeviceFault) else f"{type(e).__name__}: {e}"
        tb = "".join(traceback.format_exception(e))
        return RunResult(STATUS_INTERNAL, "internal", detail.splitlines()[0] if detail
                         else type(e).__name__, rip=self._rip(), traceback=tb)

    def _rip(self) -> int | None:
        try:
            return self.vcpu.get_state().rip
        except Exception:  # noqa: BLE001 - best effort, for a message
            return None

    def _insn(self, rip: int | None) -> bytes:
        """Up to 15 instruction bytes at the reported `rip` (not wherever the vCPU is
        now), through the guest's paging when it is on: what a crash report prints next
        to that RIP. Empty when nothing there is RAM."""
        if rip is None or self.m.memory is None:
            return b""
        try:
            st = self.vcpu.get_state()
        except Exception:  # noqa: BLE001 - best effort, for a message
            return b""
        return code_bytes(self.m.memory, st, rip)

    # ------------------------------------------------------------------ device I/O for
    # engines that handle accesses synchronously (emu)

    def _pio(self, port: int, size: int, value: int | None) -> int:
        self.stats.io_ports[port] += 1
        return self._access(self.m.pio, port, size, value)

    def _mmio(self, addr: int, size: int, value: int | None) -> int:
        return self._access(self.m.mmio, addr, size, value)

    def _access(self, bus: Bus, addr: int, size: int, value: int | None) -> int:
        """One guest access to a device, for every engine (the one I/O path).

        A miss reads as all ones; --strict-io turns it into a stop request. An exception
        from the device is a pyhv bug: it becomes a DeviceFault naming the access, which
        ends the run as an internal error (raised through the engine's `run()` when the
        engine called this from inside guest execution)."""
        try:
            if value is None:
                return bus.read(addr, size) & ((1 << (8 * size)) - 1)
            bus.write(addr, size, value)
            return 0
        except UnhandledIo as e:
            self._strict_stop(e)
        except Exception as e:  # noqa: BLE001 - a device model failed
            hit = bus.find(addr)
            where = f"{hit[2] or 'a device'}" if hit is not None else "no device"
            what = (f"{size}-byte read" if value is None
                    else f"{size}-byte write of {value:#x}")
            raise DeviceFault(f"{where} raised {type(e).__name__}: {e} on a {what} at "
                              f"{bus.name} {addr:#x}") from e
        return 0 if value is not None else (1 << (8 * size)) - 1

    def _strict_stop(self, e: UnhandledIo) -> None:
        """--strict-io: the access ends the run (the engine stops at its next check)."""
        self.m.request_stop(StopRequest("crash", STATUS_CRASH, f"--strict-io: {e}"))
