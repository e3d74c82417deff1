"""vCPU pinning: the affinity of the host thread that runs a vCPU.

The kvm engine runs each vCPU on its own host thread (one vCPU: the run loop's thread);
emu runs every vCPU on the run loop's one thread. The runner calls `Pinner.on_thread`
from the thread that is about to run vCPUs (pyhv.runner's `on_vcpu_thread` hook) with
the indices of the vCPUs it runs, and the thread is pinned to the union of their CPU
sets: per-vCPU pinning on kvm, the union of the pins on emu (documented in docs/sched.md).
`pyhv run --pin` first pins every thread of the VM process to the union of its pins, so
the VM's helper threads stay on its CPUs too.

Invariants: `sched_setaffinity` on a thread id changes that thread only; threads it
starts later inherit its mask. A failure (a CPU the process may not use) is a HostError
naming the CPUs, raised in the thread that asked.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from pyhv.errors import HostError
from pyhv.sched.settings import CpuSettings, format_cpulist


def pin_thread(tid: int, cpus: frozenset[int]) -> None:
    """Pin host thread `tid` (0: the calling thread) to `cpus`."""
    try:
        os.sched_setaffinity(tid, cpus)
    except OSError as e:
        raise HostError(f"cannot pin thread {tid or threading.get_native_id()} to CPU(s) "
                        f"{format_cpulist(cpus)}: {e.strerror or e}") from e


class Pinner:
    """Pins vCPU threads as the settings say; records which thread got which CPUs."""

    def __init__(self, settings: CpuSettings) -> None:
        self.settings = settings
        self.pinned: dict[int, tuple[int, frozenset[int]]] = {}   # vCPU -> (tid, cpus)
        self._lock = threading.Lock()

    def on_thread(self, vcpus: Sequence[int]) -> None:
        sets = [self.settings.pin_for(i) for i in vcpus]
        if not sets or any(s is None for s in sets):
            return
        cpus = frozenset().union(*(s for s in sets if s is not None))
        pin_thread(0, cpus)
        tid = threading.get_native_id()
        with self._lock:
            for i in vcpus:
                self.pinned[i] = (tid, cpus)
