"""A VM's CPU settings in ESX's terms, validated before anything touches the host.

Units (docs/sched.md):
- shares: a relative weight, 2..262144 (ESX's low/normal/high are 500/1000/2000 per
  vCPU; `parse_shares` accepts those names). Only ratios between contenders matter.
- reservation: the CPU time guaranteed under contention, in percent of one physical
  CPU (ESX uses MHz; 100 = one whole CPU); 0 = none. At most 100 x vCPUs.
- limit: the most CPU time the VM may use even on an idle host, in percent of one
  physical CPU; None = unlimited. 1..100 x vCPUs (a 1-vCPU VM cannot use more than one
  CPU anyway), and not below the reservation.
- pin: None (the kernel places the threads), or one CPU set for every vCPU, or one set
  per vCPU (as many sets as vCPUs).

Invariants: a `CpuSettings` that exists has been through `__post_init__`'s checks of
its own fields; `VmCpu.__post_init__` checks it against the vCPU count. The host's CPUs
are checked by `pyhv.sched.admit` (a pin naming a CPU the host lacks is refused there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pyhv.errors import ConfigError

SHARES_MIN, SHARES_MAX = 2, 262144      # cgroup v1 cpu.shares' range
SHARES_DEFAULT = 1000                   # ESX's "normal" per vCPU
SHARE_LEVELS = {"low": 500, "normal": 1000, "high": 2000}   # per vCPU, as ESX
LIMIT_MIN_PCT = 1.0                     # CFS quota >= 1 ms per 100 ms period
MAX_CPU = 4095


@dataclass(frozen=True)
class CpuSettings:
    shares: int = SHARES_DEFAULT
    reservation: float = 0.0            # percent of one physical CPU
    limit: float | None = None          # percent of one physical CPU; None = unlimited
    pin: tuple[frozenset[int], ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.shares, bool) or not isinstance(self.shares, int) or \
                not SHARES_MIN <= self.shares <= SHARES_MAX:
            raise ConfigError(f"CPU shares must be an integer from {SHARES_MIN} to "
                              f"{SHARES_MAX} (got {self.shares!r})")
        if not _finite(self.reservation) or self.reservation < 0:
            raise ConfigError(f"a CPU reservation is a percentage of one CPU, >= 0 "
                              f"(got {self.reservation!r})")
        if self.limit is not None:
            if not _finite(self.limit) or self.limit < LIMIT_MIN_PCT:
                raise ConfigError(f"a CPU limit is a percentage of one CPU, at least "
                                  f"{LIMIT_MIN_PCT:g} (got {self.limit!r})")
            if self.limit < self.reservation:
                raise ConfigError(f"the CPU limit ({self.limit:g}%) is below the "
                                  f"reservation ({self.reservation:g}%)")
        if self.pin is not None:
            if not self.pin or any(not s for s in self.pin):
                raise ConfigError("a CPU pin needs at least one CPU for each vCPU")
            if any(c < 0 or c > MAX_CPU for s in self.pin for c in s):
                raise ConfigError(f"pinned CPU numbers must be 0..{MAX_CPU}")

    def pin_for(self, vcpu: int) -> frozenset[int] | None:
        """The CPUs vCPU `vcpu` may run on (None: unpinned)."""
        if self.pin is None:
            return None
        return self.pin[0] if len(self.pin) == 1 else self.pin[vcpu]

    def pinned_cpus(self) -> frozenset[int] | None:
        """Every CPU any vCPU may run on (None: unpinned)."""
        return None if self.pin is None else frozenset().union(*self.pin)

    def to_json(self) -> dict[str, object]:
        return {"shares": self.shares, "reservation": self.reservation,
                "limit": self.limit,
                "pin": None if self.pin is None else [sorted(s) for s in self.pin]}

    @classmethod
    def from_json(cls, d: dict[str, object]) -> CpuSettings:
        pin = d.get("pin")
        limit = d.get("limit")
        shares, reservation = d.get("shares", SHARES_DEFAULT), d.get("reservation", 0.0)
        if not isinstance(shares, int) or not isinstance(reservation, int | float) or \
                not (limit is None or isinstance(limit, int | float)) or \
                not (pin is None or isinstance(pin, list)):
            raise ConfigError(f"malformed CPU settings: {d!r}")
        return cls(shares=shares, reservation=float(reservation),
                   limit=None if limit is None else float(limit),
                   pin=None if pin is None else tuple(frozenset(int(c) for c in s)
                                                      for s in pin))


@dataclass(frozen=True)
class VmCpu:
    """One VM as the scheduler sees it."""
    name: str
    vcpus: int
    settings: CpuSettings

    def __post_init__(self) -> None:
        if not 1 <= self.vcpus <= 256:
            raise ConfigError(f"a VM has 1 to 256 vCPUs (got {self.vcpus})")
        s = self.settings
        if s.pin is not None and len(s.pin) not in (1, self.vcpus):
            raise ConfigError(f"{self.name}: {len(s.pin)} CPU pins for {self.vcpus} "
                              "vCPUs (give one set for all, or one per vCPU)")
        most = 100.0 * self.vcpus
        if s.reservation > most:
            raise ConfigError(f"{self.name}: a reservation of {s.reservation:g}% is more "
                              f"than its {self.vcpus} vCPU(s) can use ({most:g}%)")
        if s.limit is not None and s.limit > most:
            raise ConfigError(f"{self.name}: a limit of {s.limit:g}% is more than its "
                              f"{self.vcpus} vCPU(s) can use ({most:g}%)")


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x == x and \
        abs(x) != float("inf")


def parse_shares(text: str, vcpus: int = 1) -> int:
    """`--cpu-shares`: an integer, or low/normal/high (ESX's 500/1000/2000 per vCPU)."""
    t = text.strip().lower()
    if t in SHARE_LEVELS:
        return SHARE_LEVELS[t] * vcpus
    if not re.fullmatch(r"\d+", t):
        raise ConfigError(f"--cpu-shares: expected an integer or low/normal/high "
                          f"(got {text!r})")
    return int(t)


def parse_percent(text: str, what: str) -> float:
    """`--cpu-limit` / `--cpu-reservation`: a percentage of one CPU, "25" or "25%"."""
    t = text.strip().removesuffix("%")
    try:
        v = float(t)
    except ValueError:
        raise ConfigError(f"{what}: expected a percentage of one CPU such as 25 or 150% "
                          f"(got {text!r})") from None
    if not _finite(v):
        raise ConfigError(f"{what}: {text!r} is not a finite number")
    return v


def parse_cpulist(text: str) -> frozenset[int]:
    """A kernel-style CPU list: "0", "0-3", "0,2-3"."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if m is None:
            raise ConfigError(f"bad CPU list {text!r} (expected e.g. 0, 0-3 or 0,2-3)")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo or hi > MAX_CPU:
            raise ConfigError(f"bad CPU range {part!r} in {text!r}")
        cpus.update(range(lo, hi + 1))
    return frozenset(cpus)


def parse_pin(words: list[str], vcpus: int) -> tuple[frozenset[int], ...] | None:
    """`--pin` words: one `CPUS` for every vCPU, or `VCPU=CPUS` for each vCPU."""
    if not words:
        return None
    plain = [w for w in words if "=" not in w]
    if plain:
        if len(words) > 1:
            raise ConfigError("--pin: give one CPU list for all vCPUs, or VCPU=CPUS for "
                              "each vCPU, not both or twice")
        return (parse_cpulist(plain[0]),)
    per: dict[int, frozenset[int]] = {}
    for w in words:
        idx, _, cpus = w.partition("=")
        if not idx.strip().isdigit() or int(idx) >= vcpus:
            raise ConfigError(f"--pin {w!r}: the vCPU index must be 0..{vcpus - 1}")
        if int(idx) in per:
            raise ConfigError(f"--pin: vCPU {int(idx)} pinned twice")
        per[int(idx)] = parse_cpulist(cpus)
    missing = [i for i in range(vcpus) if i not in per]
    if missing:
        raise ConfigError(f"--pin VCPU=CPUS: vCPU(s) {missing} not pinned (pin each one)")
    return tuple(per[i] for i in range(vcpus))


def format_cpulist(cpus: frozenset[int]) -> str:
    out: list[str] = []
    run: list[int] = []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}" if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [c]
    if run:
        out.append(f"{run[0]}" if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)
