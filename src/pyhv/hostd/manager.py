"""The host daemon's logic: VM lifecycle, admission, the monitor, adoption after a restart.

Operations (each raises `HostError(status, message)` for what the API maps to HTTP):
    define(d)      host checks (kernel/initrd files exist; memory fits the host's
                   capacity; the name fits a socket path), then stored, stopped
    undefine(n)    only a stopped or crashed VM; its logs go with it
    start(n)       admission (the memory of the VMs that run plus this one fits the
                   capacity), spawn (pyhv.hostd.vmproc), wait until its control API answers
                   and its console socket exists; a start that fails kills what it
                   started and leaves the VM stopped, with an event saying why
    shutdown(n)    the ACPI power button (the VM stops when its guest powers off)
    destroy(n)     hard stop through the control API, SIGKILL of its process group when
                   the VM does not end within DESTROY_GRACE_S; returns once it has ended
    pause/resume   the control API's PUT /state
    stats(n)       the control API's GET /stats

States: stopped -> starting -> running <-> paused -> stopped | crashed. A VM process that
ends is noticed by the monitor thread (every MONITOR_PERIOD_S): an exit the daemon asked
for, a guest power-off (status 0) or a guest's own exit status (odd) is "stopped"; a
signal it did not send (a VM killed behind its back), a guest crash or a pyhv error is
"crashed"; the event says which. A VM the daemon did not start (one it adopted) is not
its child, so its status is unknown: "stopped", with that said in the event.

Adoption (`open`): every VM the inventory says is live is checked by its rundir lock
(the kernel's word that the process lives); a live one is adopted with the state its
control API reports, a dead one marked stopped with an event.

Concurrency: API requests run on a thread pool; `_lock` makes admission and the choice
of which operation may act on a VM atomic; a VM with an operation in flight (`_busy`) is
refused other operations (409) and left alone by the monitor, which checks each VM under
the lock (a check is a waitpid or a flock probe: no operation is refused for it). Waits
happen outside the lock.

CPU (pyhv.hostd.cpu over pyhv.sched): define checks a VM's CPU settings on their own
(422), start admits it next to the VMs that run (their reservations must fit: 409) and
puts its process in its own cgroup right after spawning it; every start, end and
adoption rewrites every running VM's weight (reservations become minimum weights) and
limit. A VM's group is removed when it ends.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from pyhv import __version__
from pyhv.errors import ConfigError, PyhvError
from pyhv.hostd import cpu, vmproc
from pyhv.hostd.inventory import LIVE, Inventory
from pyhv.hostd.models import HostStats, Vm, VmDefinition
from pyhv.hostd.statedir import StateDir
from pyhv.vmclient import VmError

START_TIMEOUT_S = 120.0
SNAPSHOT_TIMEOUT_S = 120.0
MIGRATE_TIMEOUT_S = 300.0
DESTROY_GRACE_S = 10.0
MONITOR_PERIOD_S = 0.25
MIB = 1 << 20
STATUS_CRASH = 4
STATUS_INTERNAL = 70


class HostError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out: dict[str, int] = {}
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        words = rest.split()
        if words and words[0].isdigit():
            out[key] = int(words[0]) * (1024 if words[1:] == ["kB"] else 1)
    return out


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of the process `pid` (all its threads), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def describe_exit(rc: int | None, expected: str | None) -> tuple[str, str]:
    """(state, text) for a VM process that ended with `rc` (None: not our child)."""
    if expected == "destroy":
        return "stopped", "destroyed"
    if expected == "migrate":
        return "stopped", "migrated away"
    if rc is None:
        how = "shut down" if expected == "shutdown" else "ended"
        return "stopped", f"{how} (the VM was adopted: its exit status is unknown)"
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
        return "crashed", f"the VM process was killed by {name}"
    if rc == 0:
        return "stopped", "shut down" if expected == "shutdown" else "powered off (status 0)"
    if rc % 2 == 1:
        return "stopped", f"the guest exited with status {rc} (debug-exit port)"
    if rc == STATUS_CRASH:
        return "crashed", "the guest crashed (status 4; see the VM's .err file)"
    if rc == STATUS_INTERNAL:
        return "crashed", "pyhv failed (internal error, status 70; see the VM's .err file)"
    return "crashed", f"the VM process ended with status {rc}"


class Manager:
    def __init__(self, state: StateDir, inventory: Inventory,
                 memory_capacity: int | None = None) -> None:
        self.state = state
        self.inv = inventory
        total = meminfo().get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf(
            "SC_PHYS_PAGES")
        self.memory_capacity = memory_capacity or total
        self.started = time.time()
        self._lock = threading.Lock()
        self._busy: set[str] = set()
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._expect: dict[str, str] = {}
        self._incoming: dict[str, subprocess.Popen[bytes]] = {}   # migrations in
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self.cpu = cpu.CpuPlacer(state.path)

    # ------------------------------------------------------------------ daemon life

    def open(self) -> None:
        self.adopt()
        self._monitor = threading.Thread(target=self._watch, name="pyhv-hostd-monitor",
                                         daemon=True)
        self._monitor.start()

    def close(self) -> None:
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5.0)

    def adopt(self) -> None:
        for vm in self.inv.all():
            if vm.state not in LIVE:
                continue
            pid = vmproc.holder(self.state, vm.name)
            if pid is None:
                self.inv.set_state(vm.name, "stopped", kind="lost",
                                   message=f"the VM process (pid {vm.pid}) ended while the "
                                           "daemon was not running",
                                   last_exit="ended while the daemon was not running")
                vmproc.clean_stale(self.state, vm.name)
                try:
                    self.cpu.remove(vm.name)
                except PyhvError as e:
                    self.inv.event(vm.name, "cpu-error", f"cannot remove its cgroup: {e}")
                continue
            info = vmproc.probe(self.state, vm.name)
            live = info.get("state") if info else None
            new = live if live in ("running", "paused") else (
                "running" if vm.state == "starting" else vm.state)
            self.inv.set_state(vm.name, new, pid=pid, kind="adopted",
                               message=f"adopted the running VM (pid {pid}, {new})"
                                       + ("" if info else "; its control API does not "
                                                          "answer"))
            try:
                self.cpu.place(vm.definition, pid)
            except PyhvError as e:
                self.inv.event(vm.name, "cpu-error", f"cannot put it back in its cgroup: "
                                                     f"{e}")
        self._reweigh()

    def _running_defs(self, but: str | None = None) -> list[VmDefinition]:
        return [v.definition for v in self.inv.all() if v.state in LIVE and v.name != but]

    def _reweigh(self, but: str | None = None) -> None:
        """Every running VM's weight and limit, written again (one joined or left)."""
        try:
            self.cpu.reweigh(self._running_defs(but))
        except PyhvError as e:
            self.inv.event(None, "cpu-error", f"cannot write the VMs' CPU weights: {e}")

    # ------------------------------------------------------------------ inventory

    def get(self, name: str) -> Vm:
        vm = self.inv.get(name)
        if vm is None:
            raise HostError(404, f"no VM named {name!r}")
        return vm

    def list_vms(self) -> list[Vm]:
        return self.inv.all()

    def define(self, d: VmDefinition) -> Vm:
        for field in ("kernel", "initrd"):
            path = getattr(d, field)
            if path is not None and not Path(path).is_file():
                raise HostError(422, f"{field} {path}: no such file on the host")
        mem = d.memory_mib * MIB
        if mem > self.memory_capacity:
            raise HostError(422, f"{d.memory_mib} MiB does not fit this host: its "
                                 f"capacity is {self.memory_capacity // MIB} MiB")
        try:
            self.state.check_vm_name(d.name)
        except ConfigError as e:
            raise HostError(422, str(e)) from None
        try:
            self.cpu.check(d)
        except ConfigError as e:
            raise HostError(422, str(e)) from None
        try:
            return self.inv.define(d)
        except KeyError:
            raise HostError(409, f"a VM named {d.name!r} is already defined") from None

    def undefine(self, name: str) -> None:
        with self._lock:
            vm = self.get(name)
            if vm.state not in ("stopped", "crashed") or name in self._busy:
                raise HostError(409, f"the VM {name!r} is {vm.state}; stop it first "
                                     "(destroy or shutdown)")
            self.inv.undefine(name)
        for suffix in ("log", "err", "console"):
            with contextlib.suppress(FileNotFoundError):
                self.state.vm_path(name, suffix).unlink()

    def events(self, vm: str | None, since: int, limit: int) -> list[Any]:
        return self.inv.events(vm, since, limit)

    # ------------------------------------------------------------------ lifecycle

    def _admit(self, d: VmDefinition, refusal: str) -> None:
        """Admission control for running `d` here (the caller holds the lock): 409 when
        its memory would pass the host's capacity (`refusal`, then what is committed) or
        when the CPU reservations would not fit."""
        committed, _ = self._committed()
        if committed + d.memory_mib * MIB > self.memory_capacity:
            raise HostError(409, f"{refusal}: {committed // MIB} MiB of "
                                 f"{self.memory_capacity // MIB} MiB are committed")
        try:
            self.cpu.admit(self._running_defs(), d)
        except ConfigError as e:
            raise HostError(409, str(e)) from None

    def _committed(self) -> tuple[int, int]:
        mem = cpus = 0
        for vm in self.inv.all():
            if vm.state in LIVE:
                mem += vm.definition.memory_mib * MIB
                cpus += vm.definition.vcpus
        return mem, cpus

    def start(self, name: str) -> Vm:
        with self._lock:
            vm = self.get(name)
            if name in self._busy or vm.state not in ("stopped", "crashed"):
                raise HostError(409, f"the VM {name!r} is {vm.state}"
                                     + (" (an operation is in progress)"
                                        if name in self._busy else ""))
            d = vm.definition
            self._admit(d, f"starting {name!r} ({d.memory_mib} MiB) would pass the "
                           "host's memory capacity")
            if cpu.wants_cgroup(d) and self.cpu.fs is None:
                raise HostError(409, f"{name!r} has CPU settings, but the CPU controller "
                                     f"is {self.cpu.describe()}")
            held = vmproc.holder(self.state, name)
            if held is not None:
                raise HostError(409, f"a process (pid {held}) still holds the name "
                                     f"{name!r}")
            vmproc.clean_stale(self.state, name)
            proc = self._spawn(d, ())
            self._expect.pop(name, None)
            self._record_or_kill(name, proc, "starting", kind="starting",
                                 message=f"starting (pid {proc.pid})")
            self._busy.add(name)
        try:
            why: str | None
            try:
                self.cpu.place(d, proc.pid)
                self.cpu.reweigh(self._running_defs())
                why = self._wait_ready(name, proc)
            except PyhvError as e:
                why = f"cannot place it in its cgroup: {e}"
            if why is None:
                self._record_or_kill(name, proc, "running", kind="started",
                                     message=f"started (pid {proc.pid})")
                self._children[name] = proc
                return self.get(name)
            self._reap(name, proc)
            self.inv.set_state(name, "stopped", expect_pid=proc.pid, kind="start-failed",
                               message=f"start failed: {why}", last_exit=f"start failed: "
                                                                         f"{why}")
            raise HostError(422 if proc.returncode == 2 else 500,
                            f"the VM {name!r} did not start: {why}")
        finally:
            with self._lock:
                self._busy.discard(name)

    def _spawn(self, d: VmDefinition, extra: tuple[str, ...]) -> subprocess.Popen[bytes]:
        try:
            return vmproc.spawn(self.state, d, extra)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise HostError(507, f"cannot start {d.name!r}: its log files cannot be "
                                     f"created in {self.state.vms}: {e.strerror} (free "
                                     "space there)") from None
            raise HostError(500, f"cannot start the VM process: {e}") from None

    def _reap(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        """End a VM process that must not live on (its process group killed, waited
        for up to DESTROY_GRACE_S), then remove what it leaves: a stale name claim and
        socket, its CPU cgroup (errors there ignored)."""
        vmproc.kill_group(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=DESTROY_GRACE_S)
        vmproc.clean_stale(self.state, name)
        with contextlib.suppress(PyhvError):
            self.cpu.remove(name)

    def _record_or_kill(self, name: str, proc: subprocess.Popen[bytes], state: str, *,
                        kind: str, message: str) -> None:
        """Record that `proc` runs `name` (state starting or running); when the
        inventory cannot be written (a full disk: sqlite3.Error, answered 507) the
        process is killed and reaped first, so no VM runs that the inventory does not
        know of, and the error goes on."""
        try:
            self.inv.set_state(name, state, pid=proc.pid, kind=kind, message=message,
                               started=state == "starting",
                               expect_pid=proc.pid if state == "running" else None)
        except sqlite3.Error:
            self._reap(name, proc)
            with contextlib.suppress(sqlite3.Error):     # space may have come back
                self.inv.set_state(name, "stopped", expect_pid=proc.pid,
                                   kind="start-failed", message="start failed: the "
                                   "inventory could not be written",
                                   last_exit="start failed: the inventory could not be "
                                             "written")
            raise

    def _wait_ready(self, name: str, proc: subprocess.Popen[bytes]) -> str | None:
        """None once the VM answers on its control API and its console socket exists;
        else why not."""
        console = self.state.vm_path(name, "console")
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            rc = proc.poll()
            if rc is not None:
                tail = vmproc.err_tail(self.state, name)
                return f"pyhv run exited with status {rc}" + (f": {tail}" if tail else "")
            if console.exists() and vmproc.probe(self.state, name, timeout=2.0):
                return None
            time.sleep(0.05)
        return f"its control API did not answer within {START_TIMEOUT_S:g} s"

    def _claim_live(self, name: str, verb: str) -> Vm:
        with self._lock:
            vm = self.get(name)
            if name in self._busy:
                raise HostError(409, f"the VM {name!r} is {vm.state} (an operation is in "
                                     "progress)")
            if vm.state not in ("running", "paused"):
                raise HostError(409, f"cannot {verb} the VM {name!r}: it is {vm.state}")
            self._busy.add(name)
            return vm

    def _release(self, name: str) -> None:
        with self._lock:
            self._busy.discard(name)

    def _control(self, name: str, method: str, path: str,
                 body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            return vmproc.control(self.state, name, method, path, body)
        except VmError as e:
            raise HostError(409, f"the VM {name!r} refused: {e}") from None

    def destroy(self, name: str) -> Vm:
        vm = self._claim_live(name, "destroy")
        try:
            self._expect[name] = "destroy"
            proc = self._children.get(name)
            if proc is not None and proc.pid != vm.pid:
                proc = None
            with contextlib.suppress(VmError):   # unresponsive: the kill below ends it
                vmproc.control(self.state, name, "PUT", "/actions", {"action": "stop"},
                               timeout=5.0)
            if not vmproc.wait_gone(self.state, name, proc, DESTROY_GRACE_S):
                if proc is not None:
                    vmproc.kill_group(proc.pid)
                elif vm.pid is not None and vmproc.holder(self.state, name) == vm.pid:
                    vmproc.kill_group(vm.pid)
                vmproc.wait_gone(self.state, name, proc, DESTROY_GRACE_S)
            self._ended(vm, proc.poll() if proc is not None else None)
        finally:
            self._release(name)
        return self.get(name)

    def shutdown(self, name: str) -> Vm:
        vm = self._claim_live(name, "shut down")
        try:
            if vm.state == "paused":
                raise HostError(409, f"the VM {name!r} is paused: resume it first (its "
                                     "guest cannot see the power button while paused)")
            self._control(name, "PUT", "/actions", {"action": "shutdown"})
            self._expect[name] = "shutdown"
            self.inv.event(name, "shutdown", "ACPI power button pressed")
        finally:
            self._release(name)
        return self.get(name)

    def set_paused(self, name: str, paused: bool) -> Vm:
        vm = self._claim_live(name, "pause" if paused else "resume")
        try:
            want = "paused" if paused else "running"
            if vm.state == want:
                return vm
            self._control(name, "PUT", "/state", {"state": want})
            self.inv.set_state(name, want, expect_pid=vm.pid,
                               kind="paused" if paused else "resumed",
                               message="paused" if paused else "resumed")
        finally:
            self._release(name)
        return self.get(name)

    def stats(self, name: str) -> dict[str, Any]:
        vm = self.get(name)
        if vm.state not in ("running", "paused"):
            raise HostError(409, f"the VM {name!r} is {vm.state}")
        return self._control(name, "GET", "/stats")

    def sched_info(self, name: str) -> dict[str, Any]:
        """The VM's CPU settings, and its cgroup as the kernel reports it."""
        return self.cpu.info(self.get(name).definition)

    # ------------------------------------------------------------------ snapshots

    def snapshots(self, name: str) -> dict[str, Any]:
        vm = self.get(name)
        if vm.state not in ("running", "paused"):
            raise HostError(409, f"the VM {name!r} is {vm.state}: its snapshots are "
                                 "listed by its running process")
        return self._control(name, "GET", "/snapshots")

    def snapshot(self, name: str, op: str, snap: str) -> dict[str, Any]:
        """create, revert or delete the snapshot `snap` through the VM's control API."""
        self._claim_live(name, f"{op} a snapshot of")
        try:
            try:
                out = vmproc.control(self.state, name, "PUT", f"/snapshot/{op}",
                                     {"name": snap}, timeout=SNAPSHOT_TIMEOUT_S)
            except VmError as e:
                raise HostError(409, f"the VM {name!r} refused: {e}") from None
            self.inv.event(name, f"snapshot-{op}", f"snapshot {snap!r}: {op}")
            return out
        finally:
            self._release(name)

    # ------------------------------------------------------------------ migration

    def incoming(self, d: VmDefinition, listen_host: str) -> dict[str, Any]:
        """Destination side: define `d`, start it waiting for a migration on
        tcp:LISTEN_HOST:0 and answer the URI it listens on. A thread (`_await_incoming`)
        then marks it running once the migrated VM runs here, or removes it (process,
        definition) when the migration fails, is aborted or times out."""
        self.define(d)
        name = d.name
        try:
            with self._lock:
                self._admit(d, f"{name!r} ({d.memory_mib} MiB) does not fit")
                vmproc.clean_stale(self.state, name)
                proc = self._spawn(d, ("--incoming", f"tcp:{listen_host}:0"))
                self._record_or_kill(name, proc, "starting", kind="incoming",
                                     message=f"waiting for a migration (pid {proc.pid})")
                self._busy.add(name)
        except (HostError, sqlite3.Error):
            with contextlib.suppress(Exception):
                self.inv.undefine(name)
            raise
        try:
            self.cpu.place(d, proc.pid)
        except PyhvError as e:
            self._drop_incoming(name, proc, f"cannot place it in its cgroup: {e}")
            raise HostError(500, f"the destination VM {name!r} did not start: cannot "
                                 f"place it in its cgroup: {e}") from None
        uri = None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"waiting for a migration on (tcp:\S+)",
                          vmproc.err_tail(self.state, name, lines=20))
            if m:
                uri = m.group(1)
                break
            time.sleep(0.05)
        if uri is None:
            why = vmproc.err_tail(self.state, name) or "it did not listen"
            self._drop_incoming(name, proc, f"the destination VM did not start: {why}")
            raise HostError(500, f"the destination VM {name!r} did not start: {why}")
        self._incoming[name] = proc
        threading.Thread(target=self._await_incoming, args=(name, proc),
                         name=f"incoming-{name}", daemon=True).start()
        return {"name": name, "uri": uri}

    def _await_incoming(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + MIGRATE_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None \
                and name in self._incoming:
            if "the VM runs here now" in vmproc.err_tail(self.state, name, lines=20) and \
                    vmproc.probe(self.state, name, timeout=2.0):
                with self._lock:
                    self._incoming.pop(name, None)
                    self._children[name] = proc
                    self.inv.set_state(name, "running", pid=proc.pid,
                                       expect_pid=proc.pid, kind="migrated-in",
                                       message=f"the migrated VM runs here (pid "
                                               f"{proc.pid})")
                    self._busy.discard(name)
                self._reweigh()
                return
            time.sleep(0.05)
        tail = vmproc.err_tail(self.state, name)
        why = ("aborted by the source" if name not in self._incoming else
               f"pyhv run ended with status {proc.returncode}" if proc.poll() is not None
               else f"no migration within {MIGRATE_TIMEOUT_S:g} s")
        self._drop_incoming(name, proc, why + (f": {tail}" if tail else ""))

    def _drop_incoming(self, name: str, proc: subprocess.Popen[bytes], why: str) -> None:
        """Remove a half-made incoming VM: its process, its files, its definition."""
        self._reap(name, proc)
        with self._lock:
            self._incoming.pop(name, None)
            self.inv.event(name, "incoming-failed", f"the migration in failed: {why}")
            self.inv.set_state(name, "stopped", expect_pid=proc.pid, kind="stopped",
                               message="removed", last_exit=why)
            self.inv.undefine(name)
            self._busy.discard(name)
        for suffix in ("log", "err", "console"):
            with contextlib.suppress(FileNotFoundError):
                self.state.vm_path(name, suffix).unlink()

    def abort_incoming(self, name: str) -> None:
        """The source gave up: end the waiting destination VM; returns once removed."""
        with self._lock:
            proc = self._incoming.pop(name, None)
        if proc is None:
            raise HostError(404, f"no incoming migration of a VM named {name!r}")
        vmproc.kill_group(proc.pid)
        deadline = time.monotonic() + DESTROY_GRACE_S * 2
        while time.monotonic() < deadline and self.inv.get(name) is not None:
            time.sleep(0.05)

    def migrate(self, name: str, to: str, token: str,
                options: dict[str, Any]) -> dict[str, Any]:
        """Source side (pyhv.hostd.mover does the talking to the destination)."""
        from pyhv.hostd import mover
        vm = self._claim_live(name, "migrate")
        try:
            self._expect[name] = "migrate"
            try:
                report = mover.migrate(self, vm, to, token, options)
            except BaseException:
                self._expect.pop(name, None)
                raise
            proc = self._children.get(name)
            if proc is not None and proc.pid != vm.pid:
                proc = None
            vmproc.wait_gone(self.state, name, proc, DESTROY_GRACE_S)
            self._ended(vm, proc.poll() if proc is not None else None)
            text = f"migrated to {to}"
            self.inv.set_state(name, "stopped", kind="migrated", message=text,
                               last_exit=text)
            return report
        finally:
            self._release(name)

    def console_path(self, name: str) -> Path:
        vm = self.get(name)
        if vm.state not in ("running", "paused"):
            raise HostError(409, f"the VM {name!r} is {vm.state}: no console")
        return self.state.vm_path(name, "console")

    # ------------------------------------------------------------------ the monitor

    def _ended(self, vm: Vm, rc: int | None) -> None:
        expected = self._expect.pop(vm.name, None)
        state, text = describe_exit(rc, expected)
        self._children.pop(vm.name, None)
        vmproc.clean_stale(self.state, vm.name)
        try:                              # before the state: "stopped" means cleaned up
            self.cpu.remove(vm.name)
        except PyhvError as e:
            self.inv.event(vm.name, "cpu-error", f"cannot remove its cgroup: {e}")
        self.inv.set_state(vm.name, state, expect_pid=vm.pid,
                           kind="crashed" if state == "crashed" else "stopped",
                           message=text, last_exit=text)
        self._reweigh(but=vm.name)

    def _watch(self) -> None:
        while not self._stop.wait(MONITOR_PERIOD_S):
            try:
                self.check_all()
            except Exception as e:  # noqa: BLE001 - the monitor must outlive a bad turn
                self.inv.event(None, "monitor-error", f"{type(e).__name__}: {e}")

    def check_all(self) -> None:
        """One turn of the monitor: each live VM with no operation in flight is checked
        under the lock, so an operation never finds it half-noticed (and the monitor
        never makes an operation wait more than one check)."""
        for listed in self.inv.all():
            if listed.state not in LIVE:
                continue
            with self._lock:
                vm = self.inv.get(listed.name)
                if vm is None or vm.state not in LIVE or vm.name in self._busy:
                    continue
                proc = self._children.get(vm.name)
                if proc is not None and proc.pid == vm.pid:
                    rc = proc.poll()
                    if rc is not None:
                        self._ended(vm, rc)
                elif vmproc.holder(self.state, vm.name) is None:
                    self._ended(vm, None)

    # ------------------------------------------------------------------ host

    def loads(self, window_s: float) -> dict[str, Any]:
        """Each running VM's CPU use over `window_s` (percent of one host CPU: its
        process's user + system time, every thread, from /proc/PID/stat, over the
        window's wall time) and memory, with the host's capacities: what `pyhv host
        plan` packs."""
        vms = [v for v in self.inv.all() if v.state == "running" and v.pid]
        t0 = time.monotonic()
        before = {v.name: proc_cpu_s(v.pid) for v in vms if v.pid}
        time.sleep(window_s)
        elapsed = time.monotonic() - t0
        out = []
        for v in vms:
            assert v.pid is not None
            a, b = before.get(v.name), proc_cpu_s(v.pid)
            out.append({"name": v.name, "vcpus": v.definition.vcpus,
                        "memory_mib": v.definition.memory_mib,
                        "cpu_pct": None if a is None or b is None
                        else round(100 * max(0.0, b - a) / elapsed, 3)})
        return {"window_s": round(elapsed, 3), "cpu_capacity_pct": self.cpu.host.capacity,
                "memory_capacity_mib": self.memory_capacity // MIB, "vms": out}

    def host_stats(self) -> HostStats:
        mi = meminfo()
        committed, cpus = self._committed()
        running = self._running_defs()
        counts: dict[str, int] = {}
        for vm in self.inv.all():
            counts[vm.state] = counts.get(vm.state, 0) + 1
        return HostStats(
            hostname=socket.gethostname(), version=__version__, daemon_pid=os.getpid(),
            daemon_uptime_s=round(time.time() - self.started, 3),
            cpus=os.cpu_count() or 1, loadavg=[round(x, 2) for x in os.getloadavg()],
            memory_total_mib=mi.get("MemTotal", 0) // MIB,
            memory_available_mib=mi.get("MemAvailable", 0) // MIB,
            memory_capacity_mib=self.memory_capacity // MIB,
            memory_committed_mib=committed // MIB, vcpus_committed=cpus, vms=counts,
            cpu_controller=self.cpu.describe(),
            cpu_reserved_pct=sum(float(d.cpu_reservation or 0) for d in running),
            cpu_capacity_pct=self.cpu.host.capacity)
