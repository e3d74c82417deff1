"""From two runs to one verdict: trap, silent or same.

Design: a probe is run twice. The deprivileged run (CPL 3, the monitor's tables, on the
engine under test) says what a guest kernel would get under trap-and-emulate; the
reference run (CPL 0, the guest's own tables, on the software CPU, see probe.py) says
what that kernel expects. Then:

    trap     the deprivileged run raised an exception: the monitor gets control and
             can emulate the instruction (Popek-Goldberg is satisfied for it)
    silent   it completed, but the CPL 3 code saw something other than CPL 0 would
             have: the monitor never knew, and the guest is now wrong
    same     it completed and saw the same thing: harmless in this configuration,
             yet the instruction still ran without the monitor's knowledge
    error    the run did not finish (an engine failure or the watchdog): reported with
             its reason, never guessed

An exception whose vector is the probe's own handler vector (INT 0x80 entering its gate)
is a completion, not a trap. The verdict lists, per UMIP setting, the sensitive
instructions that are not privileged here: every probe whose outcome is silent or same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pyhv.popek import layout as L
from pyhv.popek.catalogue import Probe
from pyhv.popek.snippet import SnippetResult

Outcome = Literal["trap", "silent", "same", "error"]


@dataclass
class Result:
    instruction: str
    kind: str
    engine: str
    umip: bool
    outcome: Outcome
    exception: str | None
    observed: str
    expected_at_cpl0: str
    error_code: int | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"instruction": self.instruction, "kind": self.kind, "engine": self.engine,
                "umip": self.umip, "outcome": self.outcome, "exception": self.exception,
                "error_code": self.error_code, "observed": self.observed,
                "expected_at_cpl0": self.expected_at_cpl0, "detail": self.detail}


def describe(probe: Probe, r: SnippetResult) -> str:
    """One line for a run: its observation, or the exception it raised."""
    if r.end == "error":
        return f"error: {r.detail}"
    if r.end == "exception" and r.vector != probe.handler_vector:
        return _trap_text(probe, r)
    return probe.observe(r)


def _trap_text(probe: Probe, r: SnippetResult) -> str:
    assert r.vector is not None
    text = L.exception_name(r.vector)
    if r.error_code is not None:
        text += f"({r.error_code:#x})"
    if r.fault_rip is not None:
        off = r.fault_rip - L.CODE
        where = "the instruction under test" if off == probe.at else f"code+{off:#x}"
        text += f" at {where}"
    if r.detail:
        text += f" [{r.detail}]"
    return text


def classify(probe: Probe, engine: str, umip: bool, run: SnippetResult,
             reference: SnippetResult) -> Result:
    expected = describe(probe, reference)
    observed = describe(probe, run)
    exception: str | None = None
    code: int | None = None
    outcome: Outcome
    detail = ""
    if run.end == "error":
        outcome, detail = "error", run.detail
    elif run.end == "exception" and run.vector != probe.handler_vector:
        assert run.vector is not None
        outcome = "trap"
        exception = L.exception_name(run.vector)
        code = run.error_code
        if run.fault_rip is not None and run.fault_rip - L.CODE != probe.at:
            detail = "the fault was not raised by the instruction under test"
    elif reference.end == "error":
        outcome, detail = "error", f"reference run failed: {reference.detail}"
    else:
        outcome = "same" if observed == expected else "silent"
    return Result(probe.name, probe.kind, engine, umip, outcome, exception, observed,
                  expected, code, detail)


def verdict(results: list[Result], engine: str) -> dict[str, list[str]]:
    """Sensitive instructions that ran without trapping, per UMIP setting, on `engine`."""
    out: dict[str, list[str]] = {"umip_off": [], "umip_on": []}
    for r in results:
        if r.engine == engine and r.outcome in ("silent", "same"):
            out["umip_on" if r.umip else "umip_off"].append(r.instruction)
    return out
