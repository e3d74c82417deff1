"""Figures for pyhv's benchmark charts (pyhv.benchchart, pyhv.schedchart): a new
figure on matplotlib's non-interactive Agg backend, and the finished figure written as
`stem`.png and `stem`.svg.

Invariants: matplotlib is imported only when a chart is drawn (inside `figure`), so
the rest of pyhv does not pay for it; `save` closes the figure after writing both files.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def figure(size: tuple[float, float]) -> tuple[Figure, Axes]:
    """A new (figure, axes) of `size` inches on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    return fig, ax


def save(fig: Figure, stem: Path) -> list[Path]:
    """Write `stem`.png and `stem`.svg (120 dpi), close `fig`; the two paths."""
    import matplotlib.pyplot as plt

    out = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for p in out:
        fig.savefig(p, dpi=120)
    plt.close(fig)
    return out
