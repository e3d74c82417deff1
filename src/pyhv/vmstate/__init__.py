"""Engine-neutral VM state: capture a paused machine, apply it to another.

The API (stable; snapshots and live migration are built on it):

    from pyhv.vmstate import VmState, capture, apply, check_fits, copy_ram, StateError

    state = capture(machine)          # VmState: vCPUs, clock, device records; no RAM
    data = state.to_json()            # a JSON-able dict (json.dumps it as it is)
    state = VmState.from_json(data)   # envelope + every vCPU record checked
    check_fits(machine2, state)       # would it fit? (vCPUs, RAM size, device set,
                                      # record versions); changes nothing
    apply(machine2, state)            # machine2 continues where machine was
    copy_ram(machine.memory, machine2.memory)   # in one process; else the RAM's path

What the caller guarantees:
- capture: the machine is at a safe point: its run has not begun, or has ended, or the
  Runner is paused and parked (`runner.pause()`, then `runner.wait_parked(timeout)` is
  True). No vCPU is inside `run()` then; capture takes `machine.lock` for the devices
  (vCPU threads of a kvm SMP run, and the run loop's timer firing, hold it too). Resume
  the Runner afterwards, or stop it.
- apply: `machine2` was built from the same `MachineConfig` as the captured machine
  apart from the engine (any engine that can run the saved CPU mode: emu, kvm, trap...)
  and has not run, or is parked. Its RAM holds the captured RAM before it runs again
  (before or after `apply`, with nothing running in between). Then start its Runner
  (or resume it). On any `PyhvError` from `apply` do not run the machine: close it.
- Nothing may change the machine between the RAM copy and `capture` (keep it paused
  across both): RAM, vCPUs and devices must be one instant.

What is in a `VmState` (`to_json()`; format version `FORMAT_VERSION`):
    format, engine (informative), mem_size, clock_ns (guest time), sipi_count,
    vcpus: [{"state": CpuState.to_dict(), "wait_sipi": bool}] in vCPU index order,
    devices: {name: {"version": int, "state": {...}}}  (names: vmstate.devices),
    extra: {} (free for a caller: a snapshot tool's or migration's own notes)

Errors: every refusal is a `StateError` (a `PyhvError`: one line naming the record and
field): malformed JSON shapes, wrong types, out-of-range values, unknown fields, a
format or record version newer than this pyhv reads, another machine's device set, vCPU
count or RAM size. An engine that cannot run the saved CPU mode raises its own
`PyhvError` (HostError) from `apply`, before any device record was loaded.

Device records: `pyhv.devices.state` (the protocol each stateful device implements).
A PCI function without a complete record makes `capture` and `apply` refuse the machine
with a StateError rather than lose state; the virtio functions (blk, net, rng) have
theirs: transport registers, every queue, the device's own (devices/virtio). Before it
reads the records, `capture` quiesces the devices (a disk's in-flight requests finish
and the image is flushed) and runs the run loop's deferred calls (their completions
reach the queues), so no request is half done in a record; `apply` reads no guest RAM
(a NIC's held receive buffers are in its record as addresses), so RAM may still come
before or after it.
"""

from pyhv.errors import StateError
from pyhv.vmstate.cpurecord import cpu_from_record, cpu_record
from pyhv.vmstate.devices import check_savable, stateful_devices
from pyhv.vmstate.machinestate import (
    FORMAT_VERSION,
    VmState,
    apply,
    capture,
    check_fits,
    copy_ram,
)

__all__ = ["FORMAT_VERSION", "StateError", "VmState", "apply", "capture", "check_fits",
           "check_savable", "copy_ram", "cpu_from_record", "cpu_record", "stateful_devices"]
