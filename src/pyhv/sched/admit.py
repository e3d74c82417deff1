"""Admission control and the reservation -> weight mapping (docs/sched.md).

Admission (`admit`): a VM is admitted when, with it, the reservations fit the CPUs they
can run on: for the whole host, and for every CPU set some VM is pinned to, the
reservations of the VMs confined to that set add up to at most 100% per CPU of the set.
vCPUs may be overcommitted (more vCPUs than CPUs is fine); only reservations are capped.
A pin must name CPUs this process may use (`HostCpus.cpus`, its affinity mask).

Weights (`weights`): CFS has no floor: a group gets weight / (sum of the runnable
contenders' weights) of the CPU. A reservation becomes a minimum weight: VM i with
reservation r_i on a domain of capacity C_i (its pinned CPUs, else the host's, in
percent) needs the fraction f_i = r_i / C_i of that domain, so its weight w_i must be
at least f_i x W, W the sum of all weights. Starting from the shares, the VMs whose
share falls short are raised to f_i x W with W = (sum of the others' shares) / (1 - sum
of the raised f_i), repeated until no other VM falls short (each step raises W, so at
most one step per VM). This is worst-case: it assumes every VM of the group contends on
the same CPUs at full demand, so a VM whose real contenders are fewer gets more than its
reservation. When the raised fractions reach 1 (reservations fill a domain) the raised
weights are the cgroup maximum: the guarantee then holds up to max/(max + others).

Invariants: both functions are pure (no host access); `admit` raises
`AdmissionError` (a ConfigError: the CLI prints one line) naming what does not fit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from pyhv.errors import ConfigError
from pyhv.sched.settings import SHARES_MAX, VmCpu, format_cpulist


class AdmissionError(ConfigError):
    """A VM's CPU settings do not fit the host next to the VMs already admitted."""


@dataclass(frozen=True)
class HostCpus:
    cpus: frozenset[int]

    @classmethod
    def detect(cls) -> HostCpus:
        """The CPUs this process may run on (its affinity: a container's cpuset)."""
        return cls(frozenset(os.sched_getaffinity(0)))

    @property
    def capacity(self) -> float:
        return 100.0 * len(self.cpus)


def _domain(vm: VmCpu, host: HostCpus) -> frozenset[int]:
    pinned = vm.settings.pinned_cpus()
    return host.cpus if pinned is None else pinned


def admit(existing: Sequence[VmCpu], new: VmCpu, host: HostCpus) -> None:
    """Raise AdmissionError unless `new` fits next to `existing` (see the docstring)."""
    if any(vm.name == new.name for vm in existing):
        raise AdmissionError(f"a VM named {new.name!r} is already admitted")
    pinned = new.settings.pinned_cpus()
    if pinned is not None and not pinned <= host.cpus:
        raise AdmissionError(f"{new.name}: pinned to CPU(s) "
                             f"{format_cpulist(pinned - host.cpus)}, which this host does "
                             f"not offer (usable: {format_cpulist(host.cpus)})")
    r = new.settings.reservation
    if pinned is not None:
        most = 100.0 * min(new.vcpus, len(pinned))
        if r > most:
            raise AdmissionError(f"{new.name}: a reservation of {r:g}% cannot be met on "
                                 f"its pinned CPU(s) {format_cpulist(pinned)} "
                                 f"(at most {most:g}%)")
    vms = [*existing, new]
    domains = {host.cpus} | {_domain(vm, host) for vm in vms}
    for dom in sorted(domains, key=len):
        inside = [vm for vm in vms if _domain(vm, host) <= dom and vm.settings.reservation]
        total = sum(vm.settings.reservation for vm in inside)
        if total > 100.0 * len(dom) + 1e-9:
            what = "this host's CPUs" if dom == host.cpus else \
                f"CPU(s) {format_cpulist(dom)}"
            detail = ", ".join(f"{vm.name} {vm.settings.reservation:g}%" for vm in inside)
            raise AdmissionError(
                f"{new.name}: CPU reservations do not fit {what}: {total:g}% reserved "
                f"({detail}) > {100.0 * len(dom):g}% available; lower a reservation or "
                "stop a VM")


def weights(vms: Sequence[VmCpu], host: HostCpus,
            max_weight: int = SHARES_MAX) -> dict[str, int]:
    """Each VM's effective weight (in shares' units): its shares, raised where a
    reservation needs more under full contention (see the docstring)."""
    share = {vm.name: vm.settings.shares for vm in vms}
    frac = {vm.name: min(1.0, vm.settings.reservation / (100.0 * len(_domain(vm, host))))
            for vm in vms}
    raised: set[str] = set()
    while True:
        f = sum(frac[n] for n in raised)
        rest = sum(s for n, s in share.items() if n not in raised)
        if f >= 1.0 - 1e-12:
            total = float("inf")       # the raised VMs fill their domain: max weight
            break
        total = rest / (1.0 - f)
        short = {n for n in share if n not in raised and frac[n] * total > share[n]}
        if not short:
            break
        raised |= short
    out: dict[str, int] = {}
    for n, s in share.items():
        if n not in raised:
            out[n] = s
        elif total == float("inf"):
            out[n] = max_weight
        else:
            out[n] = max(s, min(max_weight, int(frac[n] * total + 0.999999)))
    return out
