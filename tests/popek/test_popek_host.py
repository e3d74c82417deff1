"""The classification this host's CPU gives, pinned (issue 6: "the tests pin it").

Measured on the machines pyhv is built on (AMD EPYC with UMIP, /dev/kvm served by
KVM-PVM; docs/host.md). kvm rows are the real CPU: deprivileged 64-bit code runs
natively there. Two results are KVM-PVM's, not the bare CPU's, and are pinned as such:
INT n from CPL 3 arrives as #UD (a bare CPU gives #GP(vector*8+2), which emu shows), and
MOV r,CS/SS read the host's user selectors 0x33/0x2b instead of the monitor's 0x63/0x6b.
"""

from __future__ import annotations

import pytest
from popek_env import needs_emu, needs_kvm

from pyhv.popek.catalogue import PRIVILEGED
from pyhv.popek.classify import Result
from pyhv.popek.probe import Report

pytestmark = pytest.mark.timeout(60)

UMIP_INSNS = ["sgdt", "sidt", "sldt", "str", "smsw"]
ALWAYS_SILENT = ["pushf", "popf", "lar", "lsl", "verr", "verw", "mov r,cs", "mov r,ss",
                 "iret IF=0"]
TRAP_WITH_SELECTOR = {"mov ds,r": 0x10, "mov ss,r": 0x10, "call far": 0x08,
                      "jmp far": 0x08, "retf": 0x08, "iret": 0x08}


def _get(report: Report, insn: str, engine: str, umip: bool) -> Result:
    for r in report.results:
        if (r.instruction, r.engine, r.umip) == (insn, engine, umip):
            return r
    raise AssertionError(f"no result for {insn} on {engine} umip={umip}")


def _pvm(report: Report) -> bool:
    return report.host.get("kind") == "pvm"


@needs_kvm
def test_no_run_errors(report: Report) -> None:
    assert [r for r in report.results if r.outcome == "error"] == []


@needs_kvm
@pytest.mark.parametrize("insn", UMIP_INSNS + ALWAYS_SILENT)
def test_kvm_umip_off_these_complete_and_see_the_monitors_state(report: Report,
                                                                insn: str) -> None:
    r = _get(report, insn, "kvm", False)
    assert (r.outcome, r.exception) == ("silent", None), r


@needs_kvm
def test_kvm_umip_off_the_store_instructions_return_the_monitors_values(
        report: Report) -> None:
    assert _get(report, "sgdt", "kvm", False).observed == "GDTR base=0x1000 limit=0x7f"
    assert _get(report, "sgdt", "kvm", False).expected_at_cpl0 == \
        "GDTR base=0x2000 limit=0x47"
    assert _get(report, "sidt", "kvm", False).observed.startswith("IDTR base=0x3000")
    assert _get(report, "sldt", "kvm", False).observed == "LDTR=0x0000 (RPL 0)"
    assert _get(report, "str", "kvm", False).observed == "TR=0x0070 (RPL 0)"
    assert _get(report, "smsw", "kvm", False).observed == "MSW=0x0033 (PE MP ET NE)"
    assert _get(report, "popf", "kvm", False).observed == "IF=1 IOPL=0"
    assert _get(report, "popf", "kvm", False).expected_at_cpl0 == "IF=0 IOPL=3"
    assert _get(report, "lar", "kvm", False).observed == "ZF=0 (selector refused)"
    cs = _get(report, "mov r,cs", "kvm", False).observed
    assert cs.endswith("(RPL 3)")
    if _pvm(report):
        assert cs == "CS=0x0033 (RPL 3)"


@needs_kvm
@pytest.mark.parametrize("insn", UMIP_INSNS)
def test_kvm_umip_on_the_store_instructions_trap_with_gp0(report: Report, insn: str) -> None:
    if not report.umip_supported:
        pytest.skip(f"UMIP not usable here: {report.umip_reason}")
    r = _get(report, insn, "kvm", True)
    assert (r.outcome, r.exception, r.error_code) == ("trap", "#GP", 0), r
    assert r.observed == "#GP(0x0) at the instruction under test"


@needs_kvm
@pytest.mark.parametrize("insn", ALWAYS_SILENT)
def test_kvm_umip_on_the_rest_stay_silent(report: Report, insn: str) -> None:
    if not report.umip_supported:
        pytest.skip(f"UMIP not usable here: {report.umip_reason}")
    assert _get(report, insn, "kvm", True).outcome == "silent"


@needs_kvm
@pytest.mark.parametrize("insn", sorted(TRAP_WITH_SELECTOR))
def test_kvm_segment_loads_and_far_transfers_to_the_kernel_trap(report: Report,
                                                                insn: str) -> None:
    for umip in (False, True) if report.umip_supported else (False,):
        r = _get(report, insn, "kvm", umip)
        assert (r.outcome, r.exception, r.error_code) == (
            "trap", "#GP", TRAP_WITH_SELECTOR[insn]), r


@needs_kvm
def test_kvm_int_n_through_a_dpl0_gate_traps(report: Report) -> None:
    r = _get(report, "int 0x80", "kvm", False)
    assert r.outcome == "trap"
    if _pvm(report):
        assert r.exception == "#UD"
    else:
        assert (r.exception, r.error_code) == ("#GP", 0x402)


@needs_kvm
@pytest.mark.parametrize("insn", [p.name for p in PRIVILEGED])
def test_kvm_every_privileged_instruction_traps_with_gp0(report: Report, insn: str) -> None:
    for umip in (False, True) if report.umip_supported else (False,):
        r = _get(report, insn, "kvm", umip)
        assert (r.outcome, r.exception, r.error_code) == ("trap", "#GP", 0), r
        assert r.detail == ""


@needs_kvm
def test_kvm_verdict(report: Report) -> None:
    v = report.to_dict()["verdict"]
    assert report.to_dict()["verdict_engine"] == "kvm"
    assert v["umip_off"] == UMIP_INSNS + ALWAYS_SILENT
    if report.umip_supported:
        assert v["umip_on"] == ALWAYS_SILENT


# ---------------------------------------------------------------------- emu


@needs_emu
def test_emu_ignores_umip_and_iopl_as_host_md_says(report: Report) -> None:
    for umip in (False, True):
        for insn in UMIP_INSNS + ALWAYS_SILENT:
            assert _get(report, insn, "emu", umip).outcome == "silent", (insn, umip)
        # unicorn does not check IOPL for IN/OUT: the port access happens at CPL 3
        assert _get(report, "in", "emu", umip).outcome == "same"
        assert _get(report, "out", "emu", umip).observed == "port 0x80 <- 0x5a"
    assert _get(report, "mov r,cs", "emu", False).observed == "CS=0x0063 (RPL 3)"


@needs_emu
def test_emu_traps_like_a_bare_cpu_elsewhere(report: Report) -> None:
    r = _get(report, "int 0x80", "emu", False)
    assert (r.outcome, r.exception, r.error_code) == ("trap", "#GP", 0x402)
    for insn, sel in TRAP_WITH_SELECTOR.items():
        r = _get(report, insn, "emu", False)
        assert (r.outcome, r.exception, r.error_code) == ("trap", "#GP", sel), r
    for p in PRIVILEGED:
        if p.name not in ("in", "out"):
            r = _get(report, p.name, "emu", False)
            assert (r.outcome, r.exception, r.error_code) == ("trap", "#GP", 0), r


@needs_emu
def test_the_reference_is_measured_at_cpl0(report: Report) -> None:
    assert report.reference_engine == "emu"
    r = _get(report, "iret", "emu", False)
    assert r.expected_at_cpl0 == "reached the target, CS=0x0008"
    assert _get(report, "hlt", "emu", False).expected_at_cpl0 == "halted"
    assert _get(report, "rdmsr", "emu", False).expected_at_cpl0 == "EFER=0x500"
