"""The consolidation planner's arithmetic: measured VM loads onto hosts (`pyhv host plan`).

Input: `Load`s (a VM, the host it runs on, its measured CPU use in percent of one host
CPU over a window, its memory in MiB) and `Capacity`s (a host, its CPU capacity in
percent of one CPU, i.e. 100 x CPUs, its memory in MiB). Output: a `Plan`: for every VM
the host it should run on, each host's planned CPU and memory, the moves (VM, from,
to), and the VMs that fit nowhere.

Method: first-fit decreasing with headroom, then balancing. The VMs are taken by CPU
load, largest first (ties: memory, then name, so the plan is a function of its input
alone); each goes to the first host, in the order the hosts were given, whose planned
CPU stays at or under `target` percent of its CPU capacity and whose planned memory
stays at or under its memory capacity. That decides how many hosts (and which) stay in
use: the first ones are filled, the last ones emptied (consolidation: a host left with
no VM can be turned off or given other work). FFD uses at most 11/9 OPT + 6/9 bins
(Dosa 2007). With `balance` (the default) the VMs are then spread over exactly those
hosts, again largest first, each onto the host whose planned utilisation is lowest
(worst-fit decreasing, same limits), so the hosts in use end about equally busy, as in
the article (ten servers idling at 10-15 % onto two hosts at 60-80 %) rather than one
at the target and one nearly idle; if that spreading does not fit, the FFD plan stays.

Invariants: every VM is either placed once or listed in `unplaced`; a host's planned
load never passes its target or its memory; a VM already on the host the plan picks is
not a move.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Load:
    vm: str
    host: str
    cpu_pct: float         # measured, percent of one host CPU
    memory_mib: int


@dataclass(frozen=True)
class Capacity:
    host: str
    cpu_pct: float         # 100 x the host's CPUs
    memory_mib: int


@dataclass
class Plan:
    target_pct: float
    placement: dict[str, str] = field(default_factory=dict)          # VM -> host
    cpu: dict[str, float] = field(default_factory=dict)              # host -> planned
    memory: dict[str, int] = field(default_factory=dict)
    moves: list[tuple[str, str, str]] = field(default_factory=list)  # (VM, from, to)
    unplaced: list[str] = field(default_factory=list)

    def hosts_used(self) -> list[str]:
        return [h for h in self.cpu if any(p == h for p in self.placement.values())]

    def to_json(self, loads: list[Load], hosts: list[Capacity]) -> dict[str, object]:
        cap = {h.host: h for h in hosts}
        return {
            "target_pct": self.target_pct,
            "vms": [{"vm": ld.vm, "from": ld.host, "to": self.placement.get(ld.vm),
                     "cpu_pct": round(ld.cpu_pct, 2), "memory_mib": ld.memory_mib}
                    for ld in loads],
            "hosts": [{"host": h, "cpu_capacity_pct": cap[h].cpu_pct,
                       "memory_capacity_mib": cap[h].memory_mib,
                       "cpu_before_pct": round(sum(ld.cpu_pct for ld in loads
                                                   if ld.host == h), 2),
                       "cpu_planned_pct": round(self.cpu[h], 2),
                       "utilisation_before_pct": round(100 * sum(
                           ld.cpu_pct for ld in loads if ld.host == h) / cap[h].cpu_pct, 1),
                       "utilisation_planned_pct": round(100 * self.cpu[h] / cap[h].cpu_pct,
                                                        1),
                       "memory_planned_mib": self.memory[h],
                       "vms": sorted(v for v, p in self.placement.items() if p == h)}
                      for h in self.cpu],
            "moves": [{"vm": v, "from": a, "to": b} for v, a, b in self.moves],
            "unplaced": self.unplaced,
        }


def plan(loads: list[Load], hosts: list[Capacity], target_pct: float = 80.0,
         balance: bool = True) -> Plan:
    """First-fit decreasing of `loads` onto `hosts` (in their order), each host's CPU at
    most `target_pct` % of its capacity; then (balance) spread over the hosts FFD used."""
    if not 0 < target_pct <= 100:
        raise ValueError(f"the target utilisation must be in (0, 100], not {target_pct}")
    names = [h.host for h in hosts]
    if len(set(names)) != len(names):
        raise ValueError("a host is given twice")
    seen = [ld.vm for ld in loads]
    if len(set(seen)) != len(seen):
        raise ValueError("a VM is given twice")
    order = sorted(loads, key=lambda x: (-x.cpu_pct, -x.memory_mib, x.vm))
    first = _place(order, hosts, target_pct, lambda fits, _p: fits[0])
    if not balance or first.unplaced:
        return first
    used = [h for h in hosts if h.host in first.placement.values()]
    cap = {h.host: h.cpu_pct for h in hosts}
    spread = _place(order, used, target_pct, lambda fits, p: min(
        fits, key=lambda h: (p.cpu[h.host] / cap[h.host], used.index(h))))
    if spread.unplaced:
        return first
    for h in hosts:                      # the hosts left empty, in the plan too
        spread.cpu.setdefault(h.host, 0.0)
        spread.memory.setdefault(h.host, 0)
    spread.cpu = {h.host: spread.cpu[h.host] for h in hosts}
    spread.memory = {h.host: spread.memory[h.host] for h in hosts}
    return spread


def _place(order: list[Load], hosts: list[Capacity], target_pct: float,
           choose: Callable[[list[Capacity], Plan], Capacity]) -> Plan:
    p = Plan(target_pct, cpu={h.host: 0.0 for h in hosts},
             memory={h.host: 0 for h in hosts})
    for ld in order:
        fits = [h for h in hosts
                if p.cpu[h.host] + ld.cpu_pct <= h.cpu_pct * target_pct / 100 + 1e-9
                and p.memory[h.host] + ld.memory_mib <= h.memory_mib]
        if not fits:
            p.unplaced.append(ld.vm)
            continue
        h = choose(fits, p)
        p.placement[ld.vm] = h.host
        p.cpu[h.host] += ld.cpu_pct
        p.memory[h.host] += ld.memory_mib
        if h.host != ld.host:
            p.moves.append((ld.vm, ld.host, h.host))
    return p
