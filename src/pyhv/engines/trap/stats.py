"""Trap statistics for `--stats`: how many traps of each kind, and what each costs.

Design: every trap the engine handles is one round trip: the guest faults at CPL 3, KVM
delivers the exception through the monitor's IDT to its stub, the stub's store exits to
pyhv, pyhv decodes and emulates, and KVM_RUN resumes the stub's IRETQ. Two costs are
kept per kind: pyhv's own time (decode, emulate, reflect: from the exit to the next
KVM_RUN) and the whole round trip (that plus the time inside the KVM_RUN that ended in
the trap, which also holds whatever guest code ran natively before it: in a loop of
privileged instructions that is almost nothing).
"""

from __future__ import annotations

from collections import Counter


class TrapStats:
    def __init__(self) -> None:
        self.count: Counter[str] = Counter()
        self.pyhv_s: dict[str, float] = {}
        self.round_s: dict[str, float] = {}
        self.interrupts = 0
        self.exits: Counter[str] = Counter()

    def record(self, kind: str, pyhv_s: float, kvm_s: float) -> None:
        self.count[kind] += 1
        self.pyhv_s[kind] = self.pyhv_s.get(kind, 0.0) + pyhv_s
        self.round_s[kind] = self.round_s.get(kind, 0.0) + pyhv_s + kvm_s

    def as_dict(self) -> dict[str, int | float]:
        total = sum(self.count.values())
        out: dict[str, int | float] = {"traps": total, "interrupts reflected": self.interrupts}
        if total:
            out["us per trap (round trip)"] = sum(self.round_s.values()) / total * 1e6
            out["us per trap (in pyhv)"] = sum(self.pyhv_s.values()) / total * 1e6
        for kind, n in self.count.most_common():
            out[f"trap {kind}"] = n
            out[f"trap {kind}: us each"] = self.round_s[kind] / n * 1e6
        for kind, n in sorted(self.exits.items()):
            out[f"exit {kind}"] = n
        return out
