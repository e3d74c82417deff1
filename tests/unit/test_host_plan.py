"""The consolidation planner's arithmetic (pyhv.hostd.plan): the article's ten servers
idling at 10-15 % onto two hosts at 60-80 %, first-fit decreasing with headroom, the
balancing step, and what does not fit."""

from __future__ import annotations

import pytest

from pyhv.hostd.plan import Capacity, Load, plan

IDLE = [10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 10.0, 12.0, 14.0, 15.0]   # 126 % in all


def servers() -> list[Load]:
    return [Load(f"srv{i}", f"old{i}", cpu, 512) for i, cpu in enumerate(IDLE)]


def two_hosts() -> list[Capacity]:
    return [Capacity("esx1", 100.0, 4096), Capacity("esx2", 100.0, 4096),
            Capacity("esx3", 100.0, 4096)]


def test_ten_idle_servers_onto_two_hosts_at_60_to_80_percent() -> None:
    p = plan(servers(), two_hosts(), target_pct=80)
    assert not p.unplaced and len(p.placement) == 10
    assert p.hosts_used() == ["esx1", "esx2"]                # esx3 stays empty
    assert p.cpu == {"esx1": 63.0, "esx2": 63.0, "esx3": 0.0}
    assert all(60 <= p.cpu[h] <= 80 for h in ("esx1", "esx2"))
    # worst-fit decreasing over the two (15,15,14,14,13,12,12,11,10,10; ties to the
    # first host): esx1 15,14,13,11,10 and esx2 15,14,12,12,10
    on1 = sorted(v for v, h in p.placement.items() if h == "esx1")
    on2 = sorted(v for v, h in p.placement.items() if h == "esx2")
    assert on1 == ["srv0", "srv1", "srv3", "srv4", "srv5"]
    assert on2 == ["srv2", "srv6", "srv7", "srv8", "srv9"]
    assert len(p.moves) == 10 and all(a.startswith("old") for _, a, _ in p.moves)


def test_plain_ffd_fills_the_first_host_to_the_target() -> None:
    p = plan(servers(), two_hosts(), target_pct=80, balance=False)
    # 15+15+14+14+13 = 71 on esx1; 12 (83), 11 (82), 10 (81) pass its 80: esx2
    assert p.cpu == {"esx1": 71.0, "esx2": 55.0, "esx3": 0.0}
    assert sorted(v for v, h in p.placement.items() if h == "esx1") == \
        ["srv3", "srv4", "srv5", "srv8", "srv9"]


def test_headroom_memory_and_the_vms_that_fit_nowhere() -> None:
    hosts = [Capacity("a", 200.0, 100), Capacity("b", 100.0, 1000)]
    loads = [Load("big", "a", 150.0, 10), Load("fat", "a", 5.0, 500),
             Load("huge", "b", 190.0, 10), Load("small", "b", 20.0, 10)]
    p = plan(loads, hosts, target_pct=80)
    assert p.unplaced == ["huge"]                 # 190 > 80 % of 200 and of 100
    assert p.placement["fat"] == "b"              # its memory does not fit a
    assert p.placement["big"] == "a"
    for h in hosts:
        assert p.cpu[h.host] <= h.cpu_pct * 0.8 and p.memory[h.host] <= h.memory_mib
    assert ("big", "a", "a") not in p.moves and ("fat", "a", "b") in p.moves


def test_a_vm_on_the_host_the_plan_picks_does_not_move_and_input_is_checked() -> None:
    p = plan([Load("v", "a", 10.0, 8)], [Capacity("a", 100.0, 64)])
    assert p.placement == {"v": "a"} and p.moves == []
    with pytest.raises(ValueError, match="target"):
        plan([], [Capacity("a", 100.0, 64)], target_pct=0)
    with pytest.raises(ValueError, match="twice"):
        plan([Load("v", "a", 1, 1), Load("v", "b", 1, 1)], [Capacity("a", 100.0, 64)])
