"""`pyhv migrate`'s display (pyhv.migration.report): one bar per round, drawn from the
progress's history even for rounds that ended between two polls, and the final report."""

from __future__ import annotations

import io
from typing import Any

from pyhv.migration.report import ProgressView, final_lines


def progress(status: str, rnd: int, sent: int, total: int,
             history: list[dict[str, Any]]) -> dict[str, Any]:
    return {"status": status, "round": rnd, "round_sent": sent, "round_pages": total,
            "history": history}


def h(rnd: int, pages: int, rate: float, exp: float | None, thr: float = 0.0) -> dict[str, Any]:
    return {"round": rnd, "pages": pages, "bytes": pages * 4096, "seconds": 0.1,
            "dirty_rate_pps": rate, "expected_downtime_ms": exp, "throttle": thr}


def test_one_bar_per_round_even_when_a_poll_missed_rounds() -> None:
    out = io.StringIO()
    hist = [h(1, 4096, 900.0, 80.5)]
    with ProgressView(enabled=True, file=out) as view:
        view.update(progress("active", 1, 1000, 4096, []))
        # rounds 2 and 3 ended between two polls; round 4 is the switch-over
        hist += [h(2, 300, 500.0, 60.1, 0.2), h(3, 120, 200.0, 20.0, 0.3)]
        view.update(progress("switchover", 4, 10, 40, hist))
        view.update(progress("completed", 4, 40, 40, [*hist, h(4, 40, 0.0, None, 0.3)]))
    tasks = view.progress.tasks
    assert [t.fields["round"] for t in tasks] == [1, 2, 3, 4]
    assert [t.completed for t in tasks] == [4096, 300, 120, 40]
    assert all(t.finished for t in tasks)
    text = out.getvalue()
    assert "expected downtime 60.1 ms" in text and "throttle 30%" in text
    assert "switch-over" in text


def test_the_final_report() -> None:
    lines = final_lines({"uri": "tcp:h:1", "total_s": 1.5, "downtime_ms": 12.25,
                         "bytes": 3 << 20, "rounds": 3, "pages": 5000, "zero_pages": 4000,
                         "bandwidth_bps": 2e8})
    text = "\n".join(lines)
    assert "downtime      12.2 ms" in text or "downtime      12.3 ms" in text
    assert "3.0 MiB" in text and "rounds        3" in text and "4,000 zero" in text
    assert "200.0 MB/s" in text
