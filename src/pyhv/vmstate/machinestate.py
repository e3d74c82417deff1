"""The whole state of a paused machine but its RAM: capture it, check it, apply it.

Design: `VmState` is the engine-neutral record of a machine at a safe point: every
vCPU's `CpuState` (with its wait-for-SIPI flag), the guest clock, and one versioned
record per device (`pyhv.devices.state`, names from `vmstate.devices`). It converts to
and from a JSON-able dict (`to_json` / `from_json`); `from_json` checks the envelope
(format version, types, counts) and every vCPU record, the device records are checked
by the devices when applied. RAM is not in it: a snapshot stores it in a file, a
migration sends pages; `copy_ram` copies it between two machines of one process.

`capture` reads the machine under its lock after firing the timers already due (what
the run loop would do next, so no due callback is lost with the timer queue, which is
never saved). `apply` loads a state into a machine built from the same configuration:
it refuses a state for another machine (vCPU count, RAM size, device set, a record
version newer than this pyhv reads) before changing anything, sets the vCPUs (an
engine that cannot run the saved mode refuses here, still before any device changed),
sets the clock, then loads the devices in order; each device re-arms its timers on the
restored clock.

Invariants: `apply(m2, capture(m1))` with m1's RAM copied to m2 makes m2 continue
exactly where m1 was: same instruction stream, same device and timer state, guest time
continuing from the saved value. Neither function runs guest code. A `StateError`
from `apply` after the first device record was loaded leaves the machine part-restored:
the caller closes it (it has not run).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyhv.clock import HostClock, VirtualClock
from pyhv.devices.state import MAX_NS, Reader, check_version
from pyhv.errors import StateError
from pyhv.vmstate.cpurecord import cpu_from_record, cpu_record
from pyhv.vmstate.devices import check_savable, stateful_devices

if TYPE_CHECKING:
    from pyhv.machine import Machine
    from pyhv.memory import GuestMemory

FORMAT_VERSION = 1
MAX_CPUS = 256
MAX_DEVICES = 1024


@dataclass
class VmState:
    """A machine's state at a safe point, RAM aside (see the module docstring)."""

    engine: str                       # where it was captured (informative)
    mem_size: int                     # bytes of guest RAM
    clock_ns: int                     # guest time
    vcpus: list[dict[str, Any]]       # cpu_record() per vCPU, index order
    devices: dict[str, dict[str, Any]]   # name -> {"version": int, "state": record}
    sipi_count: int = 0
    format: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)   # for a caller's own use

    @property
    def n_cpus(self) -> int:
        return len(self.vcpus)

    def device_names(self) -> list[str]:
        return list(self.devices)

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "engine": self.engine, "mem_size": self.mem_size,
                "clock_ns": self.clock_ns, "sipi_count": self.sipi_count,
                "vcpus": self.vcpus, "devices": self.devices, "extra": self.extra}

    @classmethod
    def from_json(cls, data: object) -> VmState:
        """Check the envelope and every vCPU record; StateError naming what is wrong."""
        r = Reader("vmstate", data)
        fmt = check_version("vmstate format", r.int("format", 0, 1 << 31), FORMAT_VERSION)
        engine = r.str("engine", 32)
        mem_size = r.int("mem_size", 4096, 1 << 48)
        clock_ns = r.int("clock_ns", 0, MAX_NS)
        sipi_count = r.int("sipi_count", 0, MAX_NS)
        vcpus = r.subs_list("vcpus", max_len=MAX_CPUS)
        if not vcpus:
            raise StateError("vmstate: no vCPU records")
        for i, rec in enumerate(vcpus):
            cpu_from_record(rec, f"vcpu.{i}")
        devs = r.sub("devices")
        devices: dict[str, dict[str, Any]] = {}
        names = devs.keys()
        if len(names) > MAX_DEVICES:
            raise StateError(f"vmstate: more than {MAX_DEVICES} device records")
        for name in names:
            d = devs.sub(name)
            version = d.int("version", 1, 1 << 31)
            state = d.raw("state")          # checked by the device when applied
            d.done()
            devices[name] = {"version": version, "state": state}
        devs.done()
        extra = r.raw("extra") if r.has("extra") else {}
        if not isinstance(extra, dict):
            raise StateError("vmstate: field 'extra' is not an object")
        r.done()
        return cls(engine=engine, mem_size=mem_size, clock_ns=clock_ns,
                   vcpus=list(vcpus), devices=devices, sipi_count=sipi_count, format=fmt,
                   extra=dict(extra))


def capture(machine: Machine) -> VmState:
    """The state of `machine`, which the caller keeps paused at a safe point: before
    its run, after it, or parked by `Runner.pause()` + `wait_parked()`. RAM aside."""
    check_savable(machine)
    if machine.memory is None or not machine.vcpus:
        raise StateError("the machine is closed")
    with machine.lock:
        devs = stateful_devices(machine)
        for _name, dev in devs:
            quiesce = getattr(dev, "quiesce", None)
            if quiesce is not None:
                quiesce()       # in-flight device I/O finishes and posts its completion
        machine.deferred.run_pending()
        machine.timers.fire_due()
        clock_ns = machine.clock.now_ns()
        vcpus = [cpu_record(v.get_state(), machine.wait_sipi[i])
                 for i, v in enumerate(machine.vcpus)]
        devices = {name: {"version": dev.state_version, "state": dev.save_state()}
                   for name, dev in devs}
        return VmState(engine=machine.engine_name, mem_size=machine.memory.size,
                       clock_ns=clock_ns, vcpus=vcpus, devices=devices,
                       sipi_count=machine.sipi_count)


def check_fits(machine: Machine, state: VmState) -> None:
    """StateError unless `state` is for a machine like this one (vCPUs, RAM, devices,
    record versions); changes nothing."""
    if machine.memory is None or not machine.vcpus:
        raise StateError("the machine is closed")
    if state.n_cpus != len(machine.vcpus):
        raise StateError(f"the state has {state.n_cpus} vCPUs, this machine "
                         f"{len(machine.vcpus)}")
    if state.mem_size != machine.memory.size:
        raise StateError(f"the state has {state.mem_size >> 20} MiB of RAM, this machine "
                         f"{machine.memory.size >> 20} MiB")
    have = [name for name, _ in stateful_devices(machine)]
    want = state.device_names()
    if sorted(have) != sorted(want):
        missing = sorted(set(have) - set(want))
        extra = sorted(set(want) - set(have))
        raise StateError("the device set differs: " + "; ".join(
            p for p in (f"no record for {', '.join(missing)}" if missing else "",
                        f"records for devices this machine lacks: {', '.join(extra)}"
                        if extra else "") if p))
    for name, dev in stateful_devices(machine):
        check_version(name, state.devices[name]["version"], dev.state_version)


def apply(machine: Machine, state: VmState) -> None:
    """Make `machine` (same configuration as the captured one, not running: before its
    run or parked) continue where `state` was. RAM is the caller's (`copy_ram`, a
    snapshot's file, migrated pages). See the module docstring for the order."""
    check_savable(machine)
    check_fits(machine, state)
    cpus = [cpu_from_record(rec, f"vcpu.{i}") for i, rec in enumerate(state.vcpus)]
    with machine.lock:
        for v, (st, _wait) in zip(machine.vcpus, cpus, strict=True):
            v.set_state(st)
        clock = machine.clock
        if isinstance(clock, VirtualClock | HostClock):
            clock.restore(state.clock_ns)
        for name, dev in stateful_devices(machine):
            rec = state.devices[name]
            dev.load_state(_mapping(name, rec["state"]), rec["version"])
        for i, (_st, wait) in enumerate(cpus):
            machine.wait_sipi[i] = wait
            machine.restarted[i] = True      # the run loop forgets what it knew of it
            machine.vcpus[i].invalidate_code()
        machine.sipi_count = state.sipi_count
        machine.current_cpu = 0


def copy_ram(src: GuestMemory, dst: GuestMemory) -> None:
    """Copy guest RAM between two machines of the same layout."""
    if [(r.gpa, r.size) for r in src.regions] != [(r.gpa, r.size) for r in dst.regions]:
        raise StateError("the two machines' RAM layouts differ")
    for a, b in zip(src.regions, dst.regions, strict=True):
        b.view[:] = a.view


def _mapping(name: str, rec: object) -> Mapping[str, Any]:
    if not isinstance(rec, Mapping):
        raise StateError(f"{name}: the record is {type(rec).__name__}, not an object")
    return rec
