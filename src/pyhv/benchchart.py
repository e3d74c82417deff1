"""The chart of `pyhv bench modes`: one group of bars per loop, one bar per engine, the
per-operation cost on a log scale (the engines differ by up to five orders of
magnitude), written as PNG and SVG with matplotlib's non-interactive Agg backend.

Invariants: only measured (positive) costs are drawn; a missing or failed pair is a gap
labelled in the legend's title, never a zero-height bar. The figure and its files come
from pyhv.chartfile, which imports matplotlib only when a chart is drawn.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from pyhv import chartfile
from pyhv.benchmodes import LOOPS, Results


def write_chart(res: Results, engines: Sequence[str], stem: Path, title: str) -> list[Path]:
    """Write `stem`.png and `stem`.svg; returns their paths."""
    fig, ax = chartfile.figure((11, 6))
    width = 0.8 / max(1, len(engines))
    for i, e in enumerate(engines):
        xs, ys = [], []
        for j, lp in enumerate(LOOPS):
            c = res.cost.get((lp.name, e))
            if c is not None and c > 0:
                xs.append(j + (i - (len(engines) - 1) / 2) * width)
                ys.append(c * 1e6)
        bars = ax.bar(xs, ys, width, label=e)
        for b, y in zip(bars, ys, strict=True):
            ax.annotate(f"{y:.3g}", (b.get_x() + b.get_width() / 2, y), ha="center",
                        va="bottom", fontsize=6, rotation=90)
    ax.set_yscale("log")
    ax.set_xticks(range(len(LOOPS)))
    ax.set_xticklabels([lp.name + "\n" + textwrap.fill(f"per {lp.op.split(' (')[0]}", 26)
                        for lp in LOOPS], fontsize=7)
    ax.set_ylabel("microseconds per operation (log scale, lower is faster)")
    ax.set_title(title, fontsize=9)
    ax.legend(title="engine (a gap: cannot run)", fontsize=8, title_fontsize=8)
    ax.grid(axis="y", which="major", alpha=0.3)
    fig.tight_layout()
    return chartfile.save(fig, stem)
