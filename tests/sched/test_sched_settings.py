"""CPU settings and admission control (pyhv.sched): bad values are refused with one
line, reservations that do not fit are refused, and the weights that carry a
reservation give each reserved VM at least its fraction under full contention."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyhv.errors import ConfigError
from pyhv.sched import (
    AdmissionError,
    CpuSettings,
    HostCpus,
    VmCpu,
    admit,
    parse_cpulist,
    parse_pin,
    weights,
)
from pyhv.sched.settings import parse_percent, parse_shares

HOST2 = HostCpus(frozenset({0, 1}))
CPU0 = (frozenset({0}),)


@pytest.mark.parametrize("kw", [
    {"shares": 1}, {"shares": 262145}, {"shares": True}, {"shares": 1.5},
    {"reservation": -1}, {"reservation": float("nan")},
    {"limit": 0}, {"limit": 0.5}, {"limit": float("inf")},
    {"limit": 20, "reservation": 30}, {"pin": ()}, {"pin": (frozenset(),)},
])
def test_bad_settings_are_refused(kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        CpuSettings(**kw)   # type: ignore[arg-type]


def test_settings_against_vcpus() -> None:
    with pytest.raises(ConfigError, match="more than its 1 vCPU"):
        VmCpu("a", 1, CpuSettings(reservation=150))
    with pytest.raises(ConfigError, match="more than its 2 vCPU"):
        VmCpu("a", 2, CpuSettings(limit=250))
    with pytest.raises(ConfigError, match="3 CPU pins for 2 vCPUs"):
        VmCpu("a", 2, CpuSettings(pin=(frozenset({0}),) * 3))
    VmCpu("a", 2, CpuSettings(reservation=150, limit=200, pin=(frozenset({0}),
                                                                frozenset({1}))))


def test_parsers() -> None:
    assert parse_cpulist("0,2-4") == {0, 2, 3, 4}
    for bad in ("", "a", "3-1", "1,,2", "-1", "99999"):
        with pytest.raises(ConfigError):
            parse_cpulist(bad)
    assert parse_pin(["1"], 4) == (frozenset({1}),)
    assert parse_pin(["1=0", "0=1"], 2) == (frozenset({1}), frozenset({0}))
    for words in (["0", "1"], ["0=0"], ["0=0", "0=1"], ["2=0", "0=0", "1=0"], ["x=1"]):
        with pytest.raises(ConfigError):
            parse_pin(words, 2)
    assert parse_shares("high", 2) == 4000 and parse_shares("750") == 750
    assert parse_percent("25%", "x") == 25.0
    for bad in ("lots", "nan", "inf"):
        with pytest.raises(ConfigError):
            parse_percent(bad, "--cpu-limit")
    with pytest.raises(ConfigError):
        parse_shares("-5")
    s = CpuSettings(shares=500, reservation=10, limit=50, pin=CPU0)
    assert CpuSettings.from_json(s.to_json()) == s


def vm(name: str, res: float = 0, shares: int = 1000, pin: tuple[frozenset[int], ...]
       | None = CPU0) -> VmCpu:
    return VmCpu(name, 1, CpuSettings(shares=shares, reservation=res, pin=pin))


def test_admission_control() -> None:
    admit([vm("a", 60)], vm("b", 40), HOST2)                  # exactly fits CPU 0
    with pytest.raises(AdmissionError, match=r"CPU\(s\) 0: 110% reserved"):
        admit([vm("a", 60)], vm("b", 50), HOST2)
    # unpinned VMs share the whole host: 200% in all
    admit([vm("a", 100, pin=None)], vm("b", 100, pin=None), HOST2)
    with pytest.raises(AdmissionError, match="this host's CPUs"):
        admit([vm("a", 100, pin=None), vm("b", 100, pin=None)], vm("c", 1, pin=None), HOST2)
    # a VM pinned to CPU 0 counts against the host too
    with pytest.raises(AdmissionError, match="this host's CPUs"):
        admit([vm("a", 100, pin=None), vm("b", 60)], vm("c", 50, pin=(frozenset({1}),)),
              HOST2)
    with pytest.raises(AdmissionError, match="already admitted"):
        admit([vm("a")], vm("a"), HOST2)
    with pytest.raises(AdmissionError, match="does not offer"):
        admit([], vm("a", pin=(frozenset({7}),)), HOST2)
    # vCPU overcommit is allowed: ten 1-vCPU VMs without reservations on one CPU
    admit([vm(f"v{i}") for i in range(10)], vm("x"), HOST2)


def test_reservation_weights_examples() -> None:
    # the article's case: a 50% reservation against two normal VMs on one CPU
    w = weights([vm("r", 50), vm("b"), vm("c")], HOST2)
    assert w == {"r": 2000, "b": 1000, "c": 1000}
    # shares alone are left alone
    assert weights([vm("a", shares=2000), vm("b")], HOST2) == {"a": 2000, "b": 1000}
    # a reservation the shares already cover changes nothing
    assert weights([vm("a", 20, shares=3000), vm("b")], HOST2)["a"] == 3000
    # a full CPU reserved: the maximum weight
    assert weights([vm("a", 100), vm("b")], HOST2)["a"] == 262144


@given(st.lists(st.tuples(st.integers(0, 60), st.integers(2, 5000)), min_size=1,
                max_size=6))
def test_reserved_fraction_holds_under_full_contention(vms: list[tuple[int, int]]) -> None:
    """Whatever the shares, if the reservations fit (sum < 100% of the CPU) each VM's
    weight over the total is at least its reservation (to the rounding of weights)."""
    if sum(r for r, _ in vms) >= 100:
        return
    group = [vm(f"v{i}", r, s) for i, (r, s) in enumerate(vms)]
    w = weights(group, HOST2)
    total = sum(w.values())
    for i, (r, s) in enumerate(vms):
        assert w[f"v{i}"] >= s
        assert w[f"v{i}"] / total >= r / 100 - 1e-3
