"""tools/pvm_probe.py, run for real: the KVM-PVM facts docs/pvm.md answers issue 13
with, and that the trap and bt engines rely on (bt's user mode: SYSCALL and INT n at
CPL 3; the upper half outside PML4 slot 256). Skipped without /dev/kvm; the PVM facts
only where the host is KVM-PVM."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_trap_guests import PAGING
from trapbuild import run_pyhv, unavailable

KVM_WHY = unavailable("trap")
KVM_PVM = Path("/sys/module/kvm_pvm").exists()
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(KVM_WHY is not None, reason=KVM_WHY or "")]
PROBE = Path(__file__).resolve().parents[2] / "tools" / "pvm_probe.py"


@pytest.fixture(scope="module")
def facts() -> dict[str, Any]:
    p = subprocess.run([sys.executable, str(PROBE), "--json"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out: dict[str, Any] = json.loads(p.stdout)
    return out


@pytest.mark.skipif(not KVM_PVM, reason="not KVM-PVM")
def test_no_pvm_supervisor_mode_for_pyhv(facts: dict[str, Any]) -> None:
    """No PVM guest ABI reaches a pyhv vCPU: its MSRs are refused, the synthetic CPUID
    faults, and where SYSCALL lands privileged instructions still trap."""
    assert facts["kvm_pvm module"] is True
    assert facts["PVM MSRs readable on a vCPU"] == {}
    assert len(facts["PVM MSRs refused on a vCPU"]) == 8
    assert facts["PVM MSRs in KVM_GET_MSR_INDEX_LIST"] == []
    for leaf in ("0x40000000", "0x40000001"):
        assert facts[f"cpl3 synthetic cpuid {leaf}"]["vector"] == 13
    assert "'KVMKVMKVM'" in facts["cpl3 cpuid 0x40000000"]
    assert facts["cli where syscall landed"].startswith("vector 13")


@pytest.mark.skipif(not KVM_PVM, reason="not KVM-PVM")
def test_cpl3_facts_bt_user_mode_relies_on(facts: dict[str, Any]) -> None:
    sc = facts["cpl3 syscall"]
    assert (sc["lands at LSTAR"], sc["rcx is the next rip"], sc["rsp unchanged"],
            sc["cr3 unchanged"]) == (True, True, True, True), sc
    assert facts["cpl3 int2e"] == "vector 6"
    assert facts["cpl3 int80"] == "vector 6"
    assert facts["cpl3 int3"] == "vector 3"
    assert facts["cpl3 mov r, cs/ss"].startswith("0x0033/0x002b")


@pytest.mark.skipif(not KVM_PVM, reason="not KVM-PVM")
def test_upper_half_only_slot_256_is_closed(facts: dict[str, Any]) -> None:
    upper = facts["cpl3 read of an upper-half page, by PML4 slot"]
    assert upper == {"slots 256..256 (from 0xffff800000000000)": "#PF",
                     "slots 257..510 (from 0xffff808000000000)": "read ok"}, upper
    # U=1 always; P=0 in most runs, P=1 with RSVD (0xd) in some: never a plain success
    assert set(facts["upper-half #PF error codes"]) <= {"0x4", "0xd"}, facts


@pytest.mark.parametrize("engine", ["trap", "bt"])
def test_paging_in_the_upper_half_runs(bt_guest: Callable[[str], Path], engine: str) -> None:
    """paging.S at 0xffff888000000000 (slot 273): emu's output on trap and bt."""
    r = run_pyhv("--engine", engine, "--kernel", bt_guest("paging_upper"), timeout=20)
    assert (r.status, r.stdout) == (77, PAGING.format(hi="ffff88800000")), r.explain()
