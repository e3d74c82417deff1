"""trap / silent / same / error from a pair of runs, and the verdict; fake runs only."""

from __future__ import annotations

import pytest

from pyhv.arch.x86.cpustate import CpuState
from pyhv.popek import layout as L
from pyhv.popek.catalogue import by_name
from pyhv.popek.classify import classify, verdict
from pyhv.popek.snippet import SnippetResult

pytestmark = pytest.mark.timeout(30)


def _done(**regs: int) -> SnippetResult:
    st = CpuState()
    for k, v in regs.items():
        setattr(st, k, v)
    return SnippetResult("done", state=st)


def test_an_exception_is_a_trap_with_its_name_and_error_code() -> None:
    p = by_name("cli")
    run = SnippetResult("exception", vector=13, error_code=0, fault_rip=L.CODE, fault_cs=0x63)
    r = classify(p, "kvm", False, run, _done(rax=0x2))
    assert (r.outcome, r.exception, r.error_code) == ("trap", "#GP", 0)
    assert r.observed == "#GP(0x0) at the instruction under test"
    assert r.expected_at_cpl0 == "IF=0 IOPL=0"
    assert r.detail == ""


def test_a_fault_elsewhere_in_the_snippet_is_flagged() -> None:
    p = by_name("popf")
    run = SnippetResult("exception", vector=14, error_code=2, fault_rip=L.CODE + 3)
    r = classify(p, "kvm", False, run, _done(rax=0x3002))
    assert r.outcome == "trap" and r.exception == "#PF"
    assert "code+0x3" in r.observed and "not raised by the instruction" in r.detail


def test_completing_with_another_view_is_silent_and_with_the_same_is_same() -> None:
    p = by_name("pushf")
    ref = _done(rax=0x2)
    assert classify(p, "kvm", False, _done(rax=0x202), ref).outcome == "silent"
    same = classify(p, "kvm", False, _done(rax=0x2), ref)
    assert (same.outcome, same.exception) == ("same", None)
    assert same.observed == same.expected_at_cpl0 == "IF=0 IOPL=0"


def test_entering_the_probes_own_gate_is_a_completion_not_a_trap() -> None:
    p = by_name("int 0x80")
    gate = SnippetResult("exception", vector=L.INT_VECTOR, fault_rip=L.CODE + 2)
    r = classify(p, "emu", False, gate, gate)
    assert r.outcome == "same"
    assert "handler runs" in r.expected_at_cpl0


def test_errors_are_reported_never_guessed() -> None:
    p = by_name("sgdt")
    bad = SnippetResult("error", detail="no result within 5 s")
    r = classify(p, "kvm", False, bad, _done())
    assert r.outcome == "error" and "5 s" in r.observed
    r = classify(p, "kvm", False, _done(), bad)
    assert r.outcome == "error" and "reference run failed" in r.detail


def test_the_verdict_lists_non_trapping_instructions_per_umip_setting() -> None:
    p = by_name("pushf")
    ref = _done(rax=0x2)
    trap = SnippetResult("exception", vector=13, error_code=0, fault_rip=L.CODE)
    results = [classify(p, "kvm", False, _done(rax=0x202), ref),
               classify(by_name("sgdt"), "kvm", True, trap, ref),
               classify(by_name("smsw"), "kvm", True, _done(rax=0x33), _done(rax=0x33)),
               classify(p, "emu", True, _done(rax=0x202), ref)]
    assert verdict(results, "kvm") == {"umip_off": ["pushf"], "umip_on": ["smsw"]}
    assert verdict(results, "emu") == {"umip_off": [], "umip_on": ["pushf"]}
