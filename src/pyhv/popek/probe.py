"""The whole experiment: every probe, on every engine, with UMIP off and on.

Design: for each probe of the catalogue

    1. one reference run: CPL 0 on the guest's own tables, on the software CPU (`emu`).
       Expected values are measured, not written down: a guest kernel that really ran at
       CPL 0 would see exactly this. unicorn runs CPL 0 code faithfully (IRET, LAR,
       far transfers...), where KVM-PVM's instruction emulator gives up on several of
       them (docs/host.md); without unicorn the reference falls back to kvm and says so;
    2. one deprivileged run per (engine, UMIP setting): CPL 3, the monitor's tables.
       UMIP on is tried on kvm only when the CPU has it and KVM keeps CR4.UMIP set
       (`umip_support`); emu accepts the bit but unicorn ignores it (docs/host.md), which the
       table then shows;
    3. classify.classify() turns the pair into a Result.

The verdict is taken from the kvm engine (the real CPU) when it ran, else from emu.
Each run takes a few milliseconds; the whole matrix (~40 probes x 5 runs) about a second.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pyhv.arch.x86.cpustate import CR4_UMIP
from pyhv.errors import PyhvError
from pyhv.loader import LoadedGuest
from pyhv.memory import GuestMemory
from pyhv.popek import layout as L
from pyhv.popek.catalogue import ALL, Probe
from pyhv.popek.classify import Result, classify, verdict
from pyhv.popek.snippet import DEFAULT_TIMEOUT, SnippetResult, run_snippet

ENGINES = ("kvm", "emu")


def engine_available(name: str) -> str | None:
    """None when `name` can run here, else why not."""
    from pyhv.engines import engine_class
    try:
        return engine_class(name).probe()
    except PyhvError as e:
        return str(e)


def umip_support(cpu_has_umip: bool) -> tuple[bool, str]:
    """(supported, why): the CPU flag, and whether KVM keeps CR4.UMIP when set."""
    if not cpu_has_umip:
        return False, "the CPU has no umip flag (/proc/cpuinfo)"
    why = engine_available("kvm")
    if why is not None:
        return False, f"the CPU has umip, but kvm cannot run: {why}"
    from pyhv.machine import Machine, MachineConfig

    def setup(_mem: GuestMemory) -> LoadedGuest:
        return LoadedGuest("probe", L.deprivileged_state(L.CODE, umip=True), "CR4.UMIP check")

    try:
        m = Machine(MachineConfig(engine="kvm", mem_size=L.RAM_SIZE, setup=setup,
                                  devices=False), lambda _out: None)
        try:
            assert m.vcpu is not None
            kept = bool(m.vcpu.get_state().cr4 & CR4_UMIP)
        finally:
            m.close()
    except (PyhvError, OSError) as e:
        return False, f"KVM refused CR4.UMIP: {e}"
    if not kept:
        return False, "KVM accepted KVM_SET_SREGS but dropped CR4.UMIP"
    return True, "the CPU has umip and KVM keeps CR4.UMIP"


@dataclass
class Report:
    host: dict[str, Any]
    umip_supported: bool
    umip_reason: str
    engines: list[str]
    skipped_engines: dict[str, str]
    reference_engine: str
    results: list[Result] = field(default_factory=list)

    @property
    def verdict_engine(self) -> str:
        return "kvm" if "kvm" in self.engines else (self.engines[0] if self.engines else "")

    def verdicts(self) -> dict[str, dict[str, list[str]]]:
        return {e: verdict(self.results, e) for e in self.engines}

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "umip_supported": self.umip_supported,
            "umip_reason": self.umip_reason,
            "engines": self.engines,
            "skipped_engines": self.skipped_engines,
            "reference": f"{self.reference_engine} at CPL 0 on the guest's own tables",
            "results": [r.to_dict() for r in self.results],
            "verdict": verdict(self.results, self.verdict_engine),
            "verdict_engine": self.verdict_engine,
            "verdicts": self.verdicts(),
        }


def run_probes(engines: Iterable[str] = ENGINES, probes: Iterable[Probe] = ALL, *,
               host: dict[str, Any] | None = None, cpu_has_umip: bool | None = None,
               timeout: float = DEFAULT_TIMEOUT,
               progress: Callable[[str], None] | None = None) -> Report:
    """Run the matrix. `host` defaults to pyhv.host.probe_host()."""
    if host is None:
        from pyhv.host import probe_host
        host = probe_host().to_dict()
    if cpu_has_umip is None:
        cpu_has_umip = bool(host.get("umip"))
    usable: list[str] = []
    skipped: dict[str, str] = {}
    for e in engines:
        why = engine_available(e)
        if why is None:
            usable.append(e)
        else:
            skipped[e] = why
    umip_ok, umip_reason = (umip_support(cpu_has_umip) if "kvm" in usable
                            else (cpu_has_umip, "the CPU flag (kvm not probed)"))
    reference = ("emu" if engine_available("emu") is None else
                 "kvm" if engine_available("kvm") is None else "")
    report = Report(host, umip_ok, umip_reason, usable, skipped, reference)
    if not reference:
        return report
    for probe in probes:
        if progress is not None:
            progress(probe.name)
        ref = _run(reference, probe, cpl0=True, umip=False, timeout=timeout)
        for e in usable:
            for umip in (False, True):
                if umip and e == "kvm" and not umip_ok:
                    continue
                run = _run(e, probe, cpl0=False, umip=umip, timeout=timeout)
                report.results.append(classify(probe, e, umip, run, ref))
    return report


def _run(engine: str, probe: Probe, *, cpl0: bool, umip: bool, timeout: float) -> SnippetResult:
    landing = L.CODE + len(probe.code)
    return run_snippet(engine, probe.code, regs=probe.regs, data=probe.data(landing),
                       cpl0=cpl0, umip=umip, timeout=timeout)
