"""KSM (kernel same-page merging) for guest RAM, opt-in (`pyhv run --ksm`).

`mark_mergeable` madvises guest RAM MADV_MERGEABLE: the host's ksmd may then merge its
identical pages with any other mergeable page (of this VM or another), copy-on-write.
pyhv never turns ksmd on: that is the host administrator's choice
(`echo 1 > /sys/kernel/mm/ksm/run`, docs/host.md); without it nothing is merged and
the report says so.

Reports: the host's counters from /sys/kernel/mm/ksm (pages_shared: distinct merged
pages kept; pages_sharing: the pages mapped onto them, i.e. pages saved) and this
process's from /proc/self/ksm_stat (ksm_merging_pages, ksm_process_profit; Linux 6.1+).
A file that is absent is reported as absent, never as 0.

Invariant: marking is idempotent and changes no guest-visible content.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

KSM_DIR = Path("/sys/kernel/mm/ksm")


class Advisable(Protocol):
    def advise(self, advice: int, offset: int = 0, length: int | None = None) -> None: ...


def mark_mergeable(regions: Iterable[Advisable]) -> None:
    for r in regions:
        r.advise(mmap.MADV_MERGEABLE)


def host_stats(ksm_dir: Path = KSM_DIR) -> dict[str, int] | None:
    """The host's KSM counters, or None where the kernel has no KSM."""
    if not ksm_dir.is_dir():
        return None
    out = {}
    for name in ("run", "pages_shared", "pages_sharing", "pages_unshared", "full_scans"):
        try:
            out[name] = int((ksm_dir / name).read_text())
        except (OSError, ValueError):
            continue
    return out


def process_stats(pid: int | str = "self") -> dict[str, int] | None:
    """This (or `pid`'s) process's KSM counters, or None where /proc lacks them."""
    try:
        text = Path(f"/proc/{pid}/ksm_stat").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, val = line.partition(" ")
        if val.strip().lstrip("-").isdigit():
            out[key] = int(val)
    return out


def report(pid: int | str = "self") -> str:
    """One line for `pyhv run --ksm`: what was merged, and whether ksmd runs at all."""
    host = host_stats()
    if host is None:
        return "KSM: this host's kernel has no KSM (/sys/kernel/mm/ksm is absent)"
    page = mmap.PAGESIZE
    proc = process_stats(pid)
    mine = ("" if proc is None or "ksm_merging_pages" not in proc else
            f"this VM: {proc['ksm_merging_pages']} pages merged "
            f"({proc['ksm_merging_pages'] * page >> 20} MiB); ")
    state = "on" if host.get("run") == 1 else \
        "OFF (pyhv does not start it: echo 1 > /sys/kernel/mm/ksm/run)"
    return (f"KSM: {mine}host: {host.get('pages_shared', 0)} pages shared, "
            f"{host.get('pages_sharing', 0)} sharing them "
            f"({host.get('pages_sharing', 0) * page >> 20} MiB saved); ksmd {state}")
