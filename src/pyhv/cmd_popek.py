"""`pyhv popek-goldberg`: which sensitive x86 instructions trap at CPL 3 on this host.

Runs every probe of `pyhv.popek.catalogue` deprivileged (CPL 3, 64-bit long mode) on the
kvm engine and on the software CPU (emu), with CR4.UMIP off and on, compares each with a
CPL 0 reference run, and ends with the verdict: the sensitive instructions that are not
privileged here. How the probe works is described in `pyhv.popek` and docs/popek.md.

Output: a rich table (one row per instruction, one column per engine and UMIP setting,
then what CPL 0 expects and what CPL 3 saw), or `--json` with the shape of issue 6:
`{"host", "umip_supported", "results": [{instruction, engine, umip, outcome, exception,
observed, expected_at_cpl0, ...}], "verdict": {"umip_off", "umip_on"}, ...}`.

Exit status: 0 when every run finished; 1 when some run ended in an error (shown in the
table / JSON with its reason); 2 when no engine can run on this host.
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from pyhv.errors import HostError
from pyhv.popek import layout as L
from pyhv.popek.catalogue import ALL
from pyhv.popek.classify import Result
from pyhv.popek.probe import ENGINES, Report, run_probes

STYLE = {"trap": "green", "silent": "bold red", "same": "yellow", "error": "bold magenta"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--engine", choices=(*ENGINES, "all"), default="all",
                   help="engine(s) to probe (default: all that run here)")
    p.add_argument("--only", action="append", metavar="INSN", default=None,
                   help="probe only this instruction (repeatable; names as in the table)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="watchdog per run, seconds (default 5)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="also list every result with what it observed")


def main(args: argparse.Namespace) -> int:
    engines = ENGINES if args.engine == "all" else (args.engine,)
    probes = ALL
    if args.only:
        known = {p.name for p in ALL}
        unknown = [n for n in args.only if n not in known]
        if unknown:
            raise HostError(f"unknown instruction(s) {', '.join(unknown)} "
                            f"(choose from {', '.join(sorted(known))})")
        probes = tuple(p for p in ALL if p.name in args.only)
    if not args.timeout > 0:
        raise HostError("--timeout must be positive")
    report = run_probes(engines, probes, timeout=args.timeout)
    if not report.engines or not report.reference_engine:
        why = "; ".join(f"{e}: {w}" for e, w in report.skipped_engines.items())
        raise HostError(f"no engine can run the probe here ({why})")
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _print(report, verbose=args.verbose)
    return 1 if any(r.outcome == "error" for r in report.results) else 0


# ---------------------------------------------------------------------- table


def _cell(r: Result | None) -> str:
    if r is None:
        return "-"
    text = r.outcome + (f" {r.exception}" if r.exception else "")
    return f"[{STYLE[r.outcome]}]{text}[/]"


def _print(report: Report, *, verbose: bool) -> None:
    c = Console(highlight=False)
    h = report.host
    c.print(f"[bold]CPU[/] {h.get('cpu_model', '?')}  [bold]virtualization[/] "
            f"{h.get('kind', '?')}  [bold]UMIP[/] "
            f"{'supported' if report.umip_supported else 'not supported'} "
            f"({report.umip_reason})")
    c.print(f"Each instruction runs at CPL 3 in 64-bit mode on the monitor's tables; the "
            f"expected value comes from {report.reference_engine} at CPL 0 on the guest's "
            f"own tables.")
    for e, why in report.skipped_engines.items():
        c.print(f"[yellow]engine {e} skipped:[/] {why}")
    columns = [(e, u) for e in report.engines for u in (False, True)
               if any(r.engine == e and r.umip == u for r in report.results)]
    index = {(r.instruction, r.engine, r.umip): r for r in report.results}
    t = Table(title="Sensitive and privileged instructions at CPL 3")
    t.add_column("instruction", style="bold")
    t.add_column("kind")
    for e, u in columns:
        t.add_column(f"{e}\nUMIP {'on' if u else 'off'}")
    ve = report.verdict_engine
    t.add_column("expected at CPL 0")
    t.add_column(f"observed at CPL 3 ({ve}, UMIP off)")
    seen: list[str] = []
    for r in report.results:
        if r.instruction in seen:
            continue
        seen.append(r.instruction)
        base = index.get((r.instruction, ve, False))
        t.add_row(r.instruction, r.kind, *(_cell(index.get((r.instruction, e, u)))
                                           for e, u in columns),
                  base.expected_at_cpl0 if base else "", base.observed if base else "")
    c.print(t)
    if verbose:
        d = Table(title="Every run")
        for name in ("instruction", "engine", "UMIP", "outcome", "observed", "expected",
                     "detail"):
            d.add_column(name)
        for r in report.results:
            d.add_row(r.instruction, r.engine, "on" if r.umip else "off", _cell(r),
                      r.observed, r.expected_at_cpl0, r.detail)
        c.print(d)
    for e, v in report.verdicts().items():
        c.print(f"[bold]Verdict ({e}{' = this CPU' if e == 'kvm' else ''}):[/] sensitive "
                f"but not privileged")
        c.print(f"  UMIP off: {', '.join(v['umip_off']) or 'none'}")
        if any(r.engine == e and r.umip for r in report.results):
            c.print(f"  UMIP on:  {', '.join(v['umip_on']) or 'none'}")
    c.print(f"Legend: trap = the monitor gets control; silent = completed and saw something "
            f"other than CPL 0 would; same = completed, no visible difference. "
            f"INT {L.INT_VECTOR:#x} entering its own gate counts as completing.")
