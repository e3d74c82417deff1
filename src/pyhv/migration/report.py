"""What `pyhv migrate` shows: a progress bar per round, then the final report.

Design: the CLI polls the source's GET /migrate (pyhv.migration.source's progress dict)
and hands each answer to `ProgressView.update`; rounds are drawn from the progress's
`history` (one entry per finished round, so a round shorter than the poll interval is
still shown) plus the round in flight. Each bar: pages sent of the round's pages, the
dirty rate measured after it, the expected downtime. `final_lines(progress)` is the
report: total time, downtime, bytes, rounds, pages (zero pages among them). Rich writes
to stderr; the report goes to stdout (or --json).
"""

from __future__ import annotations

import sys
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

MiB = 1 << 20


def _round_text(h: dict[str, Any]) -> str:
    exp = h.get("expected_downtime_ms")
    rate = h.get("dirty_rate_pps") or 0.0
    tail = f"dirty {rate:,.0f} pages/s" if rate else "switch-over"
    if exp is not None:
        tail += f", expected downtime {exp:.1f} ms"
    if h.get("throttle"):
        tail += f", throttle {h['throttle'] * 100:.0f}%"
    return tail


class ProgressView:
    def __init__(self, enabled: bool = True, file: IO[str] | None = None) -> None:
        self.progress = Progress(TextColumn("round {task.fields[round]:>3}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("pages"),
                                 TextColumn("{task.fields[info]}"),
                                 console=Console(file=file or sys.stderr, width=120),
                                 disable=not enabled,
                                 transient=False)
        self.tasks: dict[int, TaskID] = {}
        self.done: set[int] = set()

    def __enter__(self) -> ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def _task(self, rnd: int, total: int) -> TaskID:
        if rnd not in self.tasks:
            self.tasks[rnd] = self.progress.add_task("", total=max(total, 1), round=rnd,
                                                     info="")
        return self.tasks[rnd]

    def update(self, p: dict[str, Any]) -> None:
        for h in p.get("history") or []:
            rnd = int(h["round"])
            if rnd in self.done:
                continue
            t = self._task(rnd, int(h["pages"]))
            self.progress.update(t, total=max(int(h["pages"]), 1), completed=int(h["pages"]),
                                 info=_round_text(h))
            self.done.add(rnd)
        rnd = int(p.get("round") or 0)
        if rnd and rnd not in self.done and p.get("status") in ("active", "switchover"):
            t = self._task(rnd, int(p.get("round_pages") or 0))
            self.progress.update(t, total=max(int(p.get("round_pages") or 0), 1),
                                 completed=int(p.get("round_sent") or 0),
                                 info="switch-over" if p["status"] == "switchover" else "")


def final_lines(p: dict[str, Any]) -> list[str]:
    down = p.get("downtime_ms")
    total = p.get("total_s") or 0.0
    pages = int(p.get("pages") or 0)
    return [
        f"migrated to {p.get('uri')}",
        f"total time    {total:.3f} s",
        "downtime      " + (f"{down:.1f} ms (source pause to the destination's first "
                            f"guest instruction)" if down is not None else "unknown"),
        f"bytes sent    {int(p.get('bytes') or 0):,} ({int(p.get('bytes') or 0) / MiB:.1f} MiB)",
        f"rounds        {p.get('rounds') or p.get('round')}",
        f"pages sent    {pages:,} ({int(p.get('zero_pages') or 0):,} zero, sent as markers)",
        f"bandwidth     {float(p.get('bandwidth_bps') or 0) / 1e6:.1f} MB/s (last round)",
    ] + ([
        "switch-over   " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}"
                                     for k, v in p["switchover_ms"].items()) + " (ms)"]
        if p.get("switchover_ms") else []) + ([
        f"disk copied   {int(p.get('disk_chunks') or 0):,} chunks, "
        f"{int(p.get('disk_bytes') or 0) / MiB:.1f} MiB of data, "
        f"{int(p.get('disk_again') or 0):,} sent again (written during the copy)"]
        if p.get("storage") == "copy" else [])
