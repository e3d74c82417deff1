"""Popek and Goldberg on the live CPU: which sensitive x86 instructions trap at CPL 3.

A virtual machine monitor built on trap-and-emulate needs every sensitive instruction to
be privileged (Popek and Goldberg, 1974); IA-32 has sensitive instructions that complete
at CPL 3 without a fault (Robin and Irvine, 2000). `pyhv popek-goldberg` shows which,
on the CPU it runs on, with CR4.UMIP off and on, under KVM and on the software CPU.

Package map (each module states its design):

    layout.py     the probe guest: one memory map, the monitor's real tables and the
                  guest's virtual ones, the two entry states (CPL 3 / CPL 0), the stubs
    catalogue.py  the probed instructions: hand-assembled snippets and their observers
    snippet.py    one snippet, one engine, one fresh bare machine through pyhv's run loop
    classify.py   a deprivileged run against the CPL 0 reference: trap / silent / same
    probe.py      the whole matrix, UMIP support, the report and its verdict

The trap-and-emulate engine (issue 6, second half) will reuse layout's split between
the monitor's tables and the guest's virtual ones.
"""

from __future__ import annotations

from pyhv.popek.catalogue import ALL, PRIVILEGED, SENSITIVE, Probe
from pyhv.popek.classify import Result, classify, verdict
from pyhv.popek.probe import Report, run_probes, umip_support
from pyhv.popek.snippet import SnippetResult, run_snippet

__all__ = ["ALL", "PRIVILEGED", "SENSITIVE", "Probe", "Report", "Result", "SnippetResult",
           "classify", "run_probes", "run_snippet", "umip_support", "verdict"]
