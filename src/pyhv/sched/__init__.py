"""CPU scheduling of VMs as ESX describes it: shares, reservation, limit, vCPU pinning,
admission control, mapped onto the Linux kernel's CPU controller (docs/sched.md).

The stable API (also written down for the host daemon in docs/sched.md, "API"):

    CpuSettings        shares / reservation / limit / pin, validated (settings.py)
    VmCpu              a VM's name, vCPU count and CpuSettings (settings.py)
    HostCpus           the CPUs this host lets pyhv use (admit.py)
    admit(existing, new, host)   raises AdmissionError when reservations do not fit
    weights(vms, host)           shares -> effective weights that carry reservations
    detect() -> CgroupFs         the mounted CPU controller: v2 or v1 (cgroup.py)
    CgroupFs.group(parent, name) -> CpuCgroup: create, add(pid), apply, usage_ns, remove
    pin_thread(tid, cpus), Pinner  per-vCPU-thread affinity (pin.py)
    Placement          a standalone VM's cgroup + registry entry (placement.py)

Everything here is synchronous and small; nothing runs in the background.
"""

from __future__ import annotations

from pyhv.sched.admit import AdmissionError, HostCpus, admit, weights
from pyhv.sched.cgroup import CgroupFs, CgroupUnavailable, CpuCgroup, detect
from pyhv.sched.pin import Pinner, pin_thread
from pyhv.sched.settings import CpuSettings, VmCpu, parse_cpulist, parse_pin

__all__ = ["AdmissionError", "CgroupFs", "CgroupUnavailable", "CpuCgroup", "CpuSettings",
           "HostCpus", "Pinner", "VmCpu", "admit", "detect", "parse_cpulist", "parse_pin",
           "pin_thread", "weights"]
