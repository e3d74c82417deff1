"""The operations on a running VM that its control API offers, engine-neutral.

`VmControl` is what the API server (pyhv.vmapi) calls, from its own threads; it speaks
to the run loop (pyhv.runner) only through the runner's thread-safe controls: `pause()`
and `wait_parked()`, `resume()`, `stop()`, and `machine.deferred` for work that must run
on the run-loop thread (pressing the ACPI power button touches a device). A `pyhv run`
may build several machines in a row (a guest reset restarts it): the run command
`attach`es each runner and `detach`es it when it ends; between the two the VM answers
"restarting" (ControlError 503).

Operations:
    info()                 name, engine, cpus, memory, state, uptime, devices, pid
    set_state("paused")    the vCPUs stop at a safe point (between two exits, never inside
                           a device access) and the run loop waits; returns only once every
                           vCPU has stopped, so counters read afterwards cannot move until
                           resume. The console's output and input buffering keep working.
    set_state("running")   resume
    action("shutdown")     press the ACPI power button (the guest's OSPM decides: Linux with
                           a user-space handler powers off through S5); a machine without
                           ACPI PM (a bare board) is stopped instead
    action("stop")         hard stop: the run ends at once (status 0, reason "destroy")
    stats()                exits by reason, busiest ports, guest/pyhv/idle time, guest
                           clock, timers fired, the engine's own counters
    migrate(body)          start a live migration (pyhv.migration) on its own thread;
                           409 while one runs or the VM is paused
    migration()            its progress and, once over, its report (status completed,
                           failed or cancelled); {"status": "none"} before any
    snapshot_create(NAME)  pause, write the snapshot (pyhv.snapshot), resume if it ran
    snapshot_revert(NAME)  pause, put RAM, devices, vCPUs (and disks) back, resume if it
                           ran; the serial console simply goes on
    snapshot_delete(NAME), snapshots()   the VM's snapshot store; snapshot_progress()
                           how far a create has got (bytes of RAM scanned), for the CLI
    balloon()              the virtio-balloon (`pyhv run --balloon`): target and actual
                           size, pages held, the guest's last memory statistics (a fresh
                           report is requested), the VM process's host RSS
    set_balloon("64M")     a new balloon target (how much guest RAM the host takes back)

Errors are `ControlError(status, message)`: the API maps them to HTTP statuses (409 for
an operation the VM's state does not allow, 404 an unknown snapshot). Snapshots pause
through the same path as `set_state`; migration will too.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyhv.devices.virtio.balloon import PAGE as BALLOON_PAGE
from pyhv.devices.virtio.balloon import VirtioBalloon
from pyhv.machine import StopRequest

if TYPE_CHECKING:
    from pyhv.machine import Machine
    from pyhv.migration import OutgoingMigration
    from pyhv.runner import Runner
    from pyhv.snapshot import SnapshotStore

PARK_TIMEOUT_S = 10.0       # longest wait for the vCPUs to reach a safe point
STATES = ("paused", "running")
ACTIONS = ("shutdown", "stop")


class ControlError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class VmControl:
    def __init__(self, name: str | None, socket_path: str,
                 snapshots: SnapshotStore | None = None) -> None:
        self.name = name
        self.store = snapshots
        self.machine_info: dict[str, Any] = {}    # how --restore rebuilds the machine
        self.current_snapshot: str | None = None   # the parent of the next snapshot
        self.progress: dict[str, Any] = {"op": None}
        self.socket_path = socket_path
        self.started = time.monotonic()
        self.pid = os.getpid()
        self._lock = threading.Lock()      # one state change at a time
        self._runner: Runner | None = None
        self._machine: Machine | None = None
        self._ended = False
        self._migration: OutgoingMigration | None = None

    # ------------------------------------------------------------------ the run command

    def attach(self, runner: Runner, machine: Machine) -> None:
        with self._lock:
            self._runner, self._machine = runner, machine

    def detach(self) -> None:
        mig = self._migration
        if mig is not None and mig.active():
            mig.cancel()        # the machine is about to close: the migration ends first
        with self._lock:
            self._runner = self._machine = None

    def end(self) -> None:
        with self._lock:
            self._ended = True
            self._runner = self._machine = None

    # ------------------------------------------------------------------ operations

    def _current(self) -> tuple[Runner, Machine]:
        if self._runner is None or self._machine is None:
            if self._ended:
                raise ControlError(503, "the VM has stopped")
            raise ControlError(503, "the VM is restarting (guest reset); try again")
        return self._runner, self._machine

    def state(self) -> str:
        if self._ended:
            return "stopped"
        runner = self._runner
        return "restarting" if runner is None else runner.state.value

    def info(self) -> dict[str, Any]:
        runner, m = self._current()
        devices = sorted({name for _, _, name in m.pio.devices()}
                         | {name for _, _, name in m.mmio.devices()})
        return {
            "name": self.name,
            "pid": self.pid,
            "socket": self.socket_path,
            "engine": m.engine_name,
            "cpus": len(runner.vcpus),
            "memory_bytes": m.config.mem_size,
            "memory_mib": m.config.mem_size >> 20,
            "state": runner.state.value,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "guest": m.guest.description if m.guest is not None else None,
            "acpi_power_button": self._has_acpi(m),
            "devices": devices,
        }

    def set_state(self, state: str) -> dict[str, Any]:
        if state not in STATES:
            raise ControlError(400, f"state must be one of {', '.join(STATES)} "
                                    f"(got {state!r})")
        with self._lock:
            runner, _ = self._current()
            if state == "paused":
                if runner.state.value not in ("running", "paused"):
                    raise ControlError(409, f"cannot pause a VM that is "
                                            f"{runner.state.value}")
                runner.pause()
                if not runner.wait_parked(PARK_TIMEOUT_S):
                    runner.resume()
                    raise ControlError(504, "the vCPUs did not reach a safe point within "
                                            f"{PARK_TIMEOUT_S:g} s; the VM keeps running")
            else:
                if runner.state.value not in ("running", "paused"):
                    raise ControlError(409, f"cannot resume a VM that is "
                                            f"{runner.state.value}")
                runner.resume()
            return {"state": runner.state.value}

    def action(self, action: str) -> dict[str, Any]:
        if action not in ACTIONS:
            raise ControlError(400, f"action must be one of {', '.join(ACTIONS)} "
                                    f"(got {action!r})")
        with self._lock:
            runner, m = self._current()
            if action == "stop":
                runner.stop(StopRequest("destroy", 0, "stopped through the control API"))
                if runner.state.value == "paused":
                    runner.resume()          # let the loop reach the stop request
                return {"action": "stop", "result": "stopping"}
            if not self._has_acpi(m):
                runner.stop(StopRequest("destroy", 0, "shutdown through the control API "
                                                      "(no ACPI PM: stopped)"))
                return {"action": "shutdown", "result": "stopping (no ACPI power button)"}
            if runner.state.value == "paused":
                raise ControlError(409, "the VM is paused: resume it so that the guest "
                                        "can act on the power button, or stop it")
            pm = m.devices.acpi_pm
            m.deferred.post(pm.press_power_button)
            return {"action": "shutdown", "result": "ACPI power button pressed",
                    "guest_listens": pm.power_button_enabled}

    def stats(self) -> dict[str, Any]:
        runner, m = self._current()
        st = runner.stats
        exits = dict(st.exits)             # a C-level copy: safe against the loop's updates
        ports = dict(st.io_ports)
        now = time.monotonic()
        total = now - runner.t_start if runner.t_start else 0.0
        return {
            "state": runner.state.value,
            "exits": exits,
            "exits_total": sum(exits.values()),
            "io_ports": {f"{p:#06x}": n for p, n in
                         sorted(ports.items(), key=lambda kv: -kv[1])[:8]},
            "guest_clock_ns": m.clock.now_ns(),
            "time_s": {"wall": round(total, 6), "in_guest": round(st.t_guest, 6),
                       "idle": round(st.t_idle, 6)},
            "timers_fired": m.timers.fired,
            "engine": {k: v for k, v in runner.vcpu.stats().items()},
        }

    def migrate(self, body: dict[str, Any] | None) -> dict[str, Any]:
        from pyhv.errors import PyhvError
        from pyhv.migration import MigrationError, Options, OutgoingMigration
        if body is None:
            raise ControlError(400, "this request needs a JSON body with 'uri'")
        try:
            opts = Options.from_json(body)
        except PyhvError as e:
            raise ControlError(400, str(e)) from None
        with self._lock:
            runner, m = self._current()
            if self._migration is not None and self._migration.active():
                raise ControlError(409, "a migration of this VM is already running")
            if runner.state.value != "running":
                raise ControlError(409, f"cannot migrate a VM that is {runner.state.value}"
                                        " (resume it first)")
            try:
                mig = OutgoingMigration(runner, m, opts)
            except (MigrationError, PyhvError) as e:
                raise ControlError(409, f"cannot migrate this VM: {e}") from None
            self._migration = mig
            mig.start()
            return mig.progress()

    def migration(self) -> dict[str, Any]:
        mig = self._migration
        return {"status": "none"} if mig is None else mig.progress()
    # ------------------------------------------------------------------ snapshots

    def _store(self) -> SnapshotStore:
        if self.store is None:
            raise ControlError(409, "this VM has no snapshot directory")
        return self.store

    def _paused(self, runner: Runner) -> bool:
        """Park the vCPUs (if running); True if they were running (resume after)."""
        if runner.state.value not in ("running", "paused"):
            raise ControlError(409, f"the VM is {runner.state.value}")
        if runner.state.value == "paused":
            return False
        runner.pause()
        if not runner.wait_parked(PARK_TIMEOUT_S):
            runner.resume()
            raise ControlError(504, "the vCPUs did not reach a safe point within "
                                    f"{PARK_TIMEOUT_S:g} s; the VM keeps running")
        return True

    def snapshot_create(self, name: str) -> dict[str, Any]:
        from pyhv.errors import PyhvError
        from pyhv.snapshot import check_name, create_snapshot
        with self._lock:
            store = self._store()
            runner, m = self._current()
            try:
                check_name(name)
            except PyhvError as e:
                raise ControlError(400, str(e)) from None
            if store.exists(name):
                raise ControlError(409, f"a snapshot named {name!r} exists already")
            resume = self._paused(runner)
            self.progress = {"op": "create", "name": name, "done_bytes": 0,
                             "total_bytes": m.config.mem_size}

            def progress(done: int, total: int) -> None:
                self.progress = {"op": "create", "name": name, "done_bytes": done,
                                 "total_bytes": total}
            try:
                made = create_snapshot(m, store, name, vm=self.name or self.socket_path,
                                       parent=self.current_snapshot,
                                       machine_info=self.machine_info, progress=progress)
            except PyhvError as e:
                raise ControlError(409, str(e)) from None
            except OSError as e:
                raise ControlError(507, f"cannot write the snapshot: {e.strerror or e}"
                                   ) from None
            finally:
                self.progress = {"op": None}
                if resume:
                    runner.resume()
            self.current_snapshot = name
            return {"name": name, "path": str(made.path), "parent": made.manifest.parent,
                    "seconds": round(made.seconds, 3),
                    "ram_bytes_stored": made.ram_bytes_stored,
                    "state": runner.state.value}

    def snapshot_revert(self, name: str) -> dict[str, Any]:
        from pyhv.errors import PyhvError
        from pyhv.snapshot import revert_snapshot
        with self._lock:
            store = self._store()
            runner, m = self._current()
            try:
                exists = store.exists(name)
            except PyhvError as e:
                raise ControlError(400, str(e)) from None
            if not exists:
                raise ControlError(404, f"no snapshot named {name!r}")
            resume = self._paused(runner)
            changed = False

            def ram_changed() -> None:
                nonlocal changed
                changed = True
            try:
                revert_snapshot(m, store, name, on_ram=ram_changed)
            except PyhvError as e:
                if changed:     # RAM was replaced but the state was refused: cannot go on
                    runner.stop(StopRequest("crash", 4, f"revert to {name!r} failed "
                                            f"half-way: {e}"))
                    runner.resume()
                    raise ControlError(500, f"{e} (the VM was stopped: its RAM was "
                                            "already replaced)") from None
                if resume:
                    runner.resume()
                raise ControlError(409, str(e)) from None
            if resume:
                runner.resume()
            self.current_snapshot = name
            return {"name": name, "state": runner.state.value}

    def snapshot_delete(self, name: str) -> dict[str, Any]:
        from pyhv.errors import PyhvError
        with self._lock:
            store = self._store()
            try:
                if not store.exists(name):
                    raise ControlError(404, f"no snapshot named {name!r}")
                try:
                    disks = store.get(name).disks
                except PyhvError:
                    disks = []              # unreadable: its directory still goes
                if disks and self._machine is not None and self._runner is not None:
                    from pyhv.snapshot.disks import delete_disk_snapshots
                    resume = self._paused(self._runner)
                    try:
                        delete_disk_snapshots(self._machine, disks)
                    finally:
                        if resume:
                            self._runner.resume()
                gone = store.delete(name)
            except PyhvError as e:
                raise ControlError(400, str(e)) from None
            if self.current_snapshot == name:
                self.current_snapshot = gone.parent if gone is not None else None
            return {"name": name, "deleted": True}

    def snapshots(self) -> dict[str, Any]:
        store = self._store()
        out: list[dict[str, Any]] = []
        for name, man, problem in store.list():
            if man is None:
                out.append({"name": name, "problem": problem})
                continue
            out.append({"name": name, "parent": man.parent, "created": man.created,
                        "engine": man.engine, "cpus": man.cpus,
                        "memory_mib": man.mem_size >> 20,
                        "current": name == self.current_snapshot})
        return {"directory": str(store.dir), "snapshots": out}

    def snapshot_progress(self) -> dict[str, Any]:
        return dict(self.progress)
    def balloon(self) -> dict[str, Any]:
        _, m = self._current()
        dev = self._balloon(m)
        dev.request_stats()          # the guest's view, refreshed for the next read
        rep = dev.report()
        rep["target_bytes"] = dev.target_pages * BALLOON_PAGE
        rep["actual_bytes"] = dev.actual_pages * BALLOON_PAGE
        rep["memory_bytes"] = m.config.mem_size
        rep["host_rss_bytes"] = _rss_bytes()
        return rep

    def set_balloon(self, target: str) -> dict[str, Any]:
        from pyhv.errors import ConfigError
        from pyhv.units import parse_size
        _, m = self._current()
        dev = self._balloon(m)
        try:
            size = parse_size(target, default_unit="M")
        except ConfigError as e:
            raise ControlError(400, f"target: {e}") from e
        if not 0 <= size <= m.config.mem_size:
            raise ControlError(400, f"the balloon target must be 0..{m.config.mem_size >> 20}"
                                    f" MiB, the guest's RAM (got {target!r})")
        dev.set_target(size // BALLOON_PAGE)
        return {"target_bytes": size // BALLOON_PAGE * BALLOON_PAGE}

    @staticmethod
    def _balloon(m: Machine) -> VirtioBalloon:
        for fn in m.pci_functions:
            dev = getattr(fn, "device", None)
            if isinstance(dev, VirtioBalloon):
                return dev
        raise ControlError(409, "this VM has no balloon device (start it with --balloon)")

    @staticmethod
    def _has_acpi(m: Machine) -> bool:
        return bool(m.config.devices)


def _rss_bytes() -> int | None:
    """This process's resident set (VmRSS), or None where /proc does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
