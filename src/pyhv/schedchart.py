"""The chart of `pyhv bench sched`: one group of bars per scenario, one bar per VM (its
share of the scenario's work as the guests counted it; for a VM judged by CPU, a limit,
a hatched bar of the CPU its guest's counter says it got), a line at the expected value, a
cross at the CPU the guest's counter says it got and a circle at the host's accounting
(cpuacct), both in % of one CPU, written as PNG and SVG with matplotlib's
non-interactive Agg backend (pyhv.chartfile; matplotlib is imported only to draw)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pyhv import chartfile
from pyhv.benchsched import SCENARIOS, Results


def write_chart(res: Results, scenarios: Sequence[str], stem: Path, title: str
                ) -> list[Path]:
    shown = [sc for sc in SCENARIOS if (sc.key in scenarios or sc.key == "solo")
             and all((sc.key, vm.name) in res.samples for vm in sc.vms)]
    fig, ax = chartfile.figure((11, 5.5))
    colors = {"A": "tab:blue", "B": "tab:orange", "C": "tab:green"}
    width = 0.25
    labelled: set[str] = set()
    for j, sc in enumerate(shown):
        for i, vm in enumerate(sc.vms):
            x = j + (i - (len(sc.vms) - 1) / 2) * width
            cpu_bar = vm.by == "cpu"     # a limit is judged as CPU, not as a share
            g = res.guest_pct(sc.key, vm.name) if cpu_bar else \
                res.share_pct(sc.key, vm.name, [v.name for v in sc.vms])
            ax.bar(x, g, width * 0.9, color=colors.get(vm.name, "gray"),
                   hatch="//" if cpu_bar else None, edgecolor="white" if cpu_bar else None,
                   label=f"VM {vm.name}" if vm.name not in labelled else None)
            labelled.add(vm.name)
            ax.annotate(f"{g:.0f}", (x, g), ha="center", va="bottom", fontsize=7)
            if vm.expect is not None:
                ax.plot([x - width * 0.45, x + width * 0.45], [vm.expect, vm.expect],
                        color="k" if vm.by == "share" else "red", lw=1.5,
                        label=("expected share" if vm.by == "share" else
                               "expected cpu (a limit)") if vm.name == "A" and
                        sc.key in ("equal", "limit") else None)
            ax.plot([x], [res.guest_pct(sc.key, vm.name)], "x", color="k", ms=4,
                     label="guest cpu (% of one CPU)" if j == 0 and i == 0 else None)
            h = res.host_pct(sc.key, vm.name)
            if h is not None:
                ax.plot([x], [h], "o", color="k", ms=3, mfc="none",
                        label="host cpuacct (% of one CPU)" if j == 0 and i == 0 else None)
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels([f"{sc.key}\n" + "\n".join(vm.label().replace("shares ", "s")
                                                   for vm in sc.vms) for sc in shown],
                       fontsize=7)
    ax.set_ylabel("bars: share of the VMs' work by the guests' counters (%);\n"
                  "hatched: CPU by the guest's counter (% of one CPU)", fontsize=8)
    ax.set_ylim(0, 115)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return chartfile.save(fig, stem)
