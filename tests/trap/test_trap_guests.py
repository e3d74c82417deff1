"""The trap teaching guests through the real `pyhv run`, on trap, emu and kvm.

What runs right under trap-and-emulate (teach, hidden, the bad-input guests) is asserted
to give the same output and status on every engine. What cannot run right (sensitive:
the sensitive instructions that do not trap at CPL 3) is asserted to go wrong in exactly
the way the Popek-Goldberg probe predicts, and to be right at real CPL 0 (emu, kvm).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from trapbuild import run_pyhv, unavailable

ENGINES = ("trap", "emu", "kvm")


def engines(*names: str) -> list[object]:
    out: list[object] = []
    for e in names:
        why = unavailable(e)
        marks = [pytest.mark.skip(reason=why)] if why else []
        if e in ("kvm", "trap"):
            marks.append(pytest.mark.kvm)
        out.append(pytest.param(e, marks=marks, id=e))
    return out


TEACH = ("teach: own GDT and IDT loaded\n"
         "cr0=80000031 cr4=00000620 efer=00000500\n"
         "#UD handled, rip ok\n"
         "#GP err=0000 handled, rip ok\n"
         "timer: 10 ticks with sti;hlt\n"
         "primes below 20000: 2262\n"
         "checksum: 84fb8c8e473aabb0\n"
         "teach: done\n")

SENSITIVE_CPL0 = ("sensitive: own GDT and IDT loaded\n"
                  "mov ax, cs: 0008 (RPL 0)\n"
                  "sgdt: own GDT\n"
                  "sidt: own IDT\n"
                  "str: 0020\n"
                  "smsw: 0031\n"
                  "pushf after cli: IF=0 IOPL=0\n"
                  "popf restores IF=1, waiting for a timer tick with hlt\n"
                  "woke on the timer\n")

HIDDEN = ("hidden: touching 0xffffff8000000000\n"
          "#PF err=0000 cr2=ffffff8000000000\n"
          "#PF err=0002 cr2=ffffff8000000008\n"
          "#PF err=0000 cr2=ffffff8000000000\n"
          "#PF err=0002 cr2=ffffff8000030000\n"
          "hidden: 4 page faults, monitor intact\n")


@pytest.mark.parametrize("engine", engines(*ENGINES))
def test_teach_runs_on_every_engine(trap_guest: Callable[[str], Path], engine: str) -> None:
    r = run_pyhv("--engine", engine, "--kernel", trap_guest("teach"), timeout=20)
    assert (r.status, r.stdout) == (67, TEACH), r.explain()


@pytest.mark.parametrize("engine", engines("emu", "kvm"))
def test_sensitive_is_right_at_cpl0(trap_guest: Callable[[str], Path], engine: str) -> None:
    r = run_pyhv("--engine", engine, "--kernel", trap_guest("sensitive"), timeout=20)
    assert (r.status, r.stdout) == (69, SENSITIVE_CPL0), r.explain()


def _lines(text: str) -> dict[str, str]:
    return {line.split(":", 1)[0]: line for line in text.splitlines() if ":" in line}


@pytest.mark.parametrize("engine", engines("trap"))
def test_sensitive_goes_wrong_under_trap(trap_guest: Callable[[str], Path],
                                         engine: str) -> None:
    """UMIP off (the default): every non-trapping sensitive instruction shows it."""
    r = run_pyhv("--engine", engine, "--kernel", trap_guest("sensitive"), timeout=20)
    lines = _lines(r.stdout)
    # CS shows RPL 3 (on KVM-PVM the host's own user selector 0x33; on VT-x 0x000b)
    assert lines["mov ax, cs"].endswith("(RPL 3)"), r.explain()
    assert lines["mov ax, cs"] != "mov ax, cs: 0008 (RPL 0)"
    # SGDT/SIDT/STR/SMSW return the monitor's values (pyhv/engines/trap/monitor.py)
    assert lines["sgdt"] == "sgdt: monitor's GDT at ffffff8000000000", r.explain()
    assert lines["sidt"] == "sidt: monitor's IDT at ffffff8000010000", r.explain()
    assert lines["str"] == "str: ffd0", r.explain()
    assert lines["smsw"] == "smsw: 0033", r.explain()          # the monitor's CR0.MP
    # PUSHF shows the real IF (1), not the virtual one the CLI cleared
    assert lines["pushf after cli"] == "pushf after cli: IF=1 IOPL=0", r.explain()
    # POPF could not set the virtual IF again: HLT waits with interrupts off forever,
    # which pyhv ends with status 0 instead of the guest's own exit (69)
    assert r.stdout.endswith("popf restores IF=1, waiting for a timer tick with hlt\n"), \
        r.explain()
    assert "woke on the timer" not in r.stdout
    assert r.status == 0, r.explain()


@pytest.mark.parametrize("engine", engines("trap"))
def test_sensitive_under_trap_with_umip(trap_guest: Callable[[str], Path],
                                        engine: str) -> None:
    """UMIP on: SGDT/SIDT/STR/SMSW trap and are emulated; CS, PUSHF, POPF stay wrong."""
    r = run_pyhv("--engine", engine, "--kernel", trap_guest("sensitive"), timeout=20,
                 umip=True)
    if "has no UMIP" in r.stderr:
        pytest.skip("this host's CPU has no UMIP")
    lines = _lines(r.stdout)
    assert lines["sgdt"] == "sgdt: own GDT", r.explain()
    assert lines["sidt"] == "sidt: own IDT", r.explain()
    assert lines["str"] == "str: 0020", r.explain()
    assert lines["smsw"] == "smsw: 0031", r.explain()
    assert lines["mov ax, cs"].endswith("(RPL 3)"), r.explain()
    assert lines["pushf after cli"] == "pushf after cli: IF=1 IOPL=0", r.explain()
    assert r.status == 0 and "woke on the timer" not in r.stdout, r.explain()


@pytest.mark.parametrize("engine", engines("trap"))
def test_umip_is_an_engine_option_not_an_environment_variable(
        trap_guest: Callable[[str], Path], engine: str) -> None:
    """PYHV_TRAP_UMIP (the old switch) no longer reaches the engine: UMIP stays off."""
    r = run_pyhv("--engine", engine, "--kernel", trap_guest("sensitive"), timeout=20,
                 env={"PYHV_TRAP_UMIP": "1"})
    lines = _lines(r.stdout)
    assert lines["sgdt"] == "sgdt: monitor's GDT at ffffff8000000000", r.explain()
    assert r.status == 0, r.explain()


@pytest.mark.parametrize("engine", engines(*ENGINES))
def test_monitor_range_is_not_mapped_for_the_guest(trap_guest: Callable[[str], Path],
                                                   engine: str) -> None:
    r = run_pyhv("--engine", engine, "--kernel", trap_guest("hidden"), timeout=20)
    assert (r.status, r.stdout) == (71, HIDDEN), r.explain()


@pytest.mark.parametrize("engine", engines(*ENGINES))
@pytest.mark.parametrize(("guest", "first_line"), [
    ("badgdt", "badgdt: loading a GDT of zeros\n"),
    ("badidt", "badidt: loading an IDT of 0xaa bytes\n"),
])
def test_nonsense_tables_triple_fault(trap_guest: Callable[[str], Path], engine: str,
                                      guest: str, first_line: str) -> None:
    r = run_pyhv("--engine", engine, "--kernel", trap_guest(guest), timeout=20)
    assert r.status == 4 and r.stdout == first_line, r.explain()
    assert "triple fault" in r.stderr, r.explain()
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("engine", engines("emu", "kvm"))
def test_rep_outsb_works_at_cpl0(trap_guest: Callable[[str], Path], engine: str) -> None:
    r = run_pyhv("--engine", engine, "--kernel", trap_guest("cannot"), timeout=20)
    assert r.status == 73 and r.stdout == ("cannot: before\nprinted with rep outsb\n"
                                           "cannot: after\n"), r.explain()


@pytest.mark.parametrize("engine", engines("trap"))
def test_cannot_emulate_reports_the_instruction(trap_guest: Callable[[str], Path],
                                                engine: str) -> None:
    r = run_pyhv("--engine", engine, "--kernel", trap_guest("cannot"), timeout=20)
    assert r.status == 4 and r.stdout == "cannot: before\n", r.explain()
    assert "cannot emulate rep outsb" in r.stderr, r.explain()
    assert "(instruction bytes: f3 6e)" in r.stderr, r.explain()
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("engine", engines("trap"))
def test_stats_count_traps_by_kind(trap_guest: Callable[[str], Path], engine: str) -> None:
    r = run_pyhv("--engine", engine, "--kernel", trap_guest("teach"), "--stats", timeout=20)
    assert r.status == 67, r.explain()
    for key in ("trap: traps", "trap: us per trap (round trip)", "trap: trap out",
                "trap: trap in ", "trap: trap cli", "trap: trap sti", "trap: trap hlt",
                "trap: trap iretq", "trap: trap lgdt", "trap: trap lidt",
                "trap: trap retf", "trap: trap mov ss", "trap: trap rdmsr",
                "trap: trap reflect #UD", "trap: interrupts reflected"):
        assert key in r.stderr, f"{key!r} missing" + r.explain()


@pytest.mark.parametrize("engine", engines("trap"))
def test_core_faults64_builds_its_idt_from_mov_cs(engine: str, tmp_path: Path) -> None:
    """core/faults64 fills its IDT gates from `mov dx, cs`: deprivileged, that reads an
    RPL 3 selector its GDT does not describe, so its first exception cannot be
    delivered: #UD -> #GP -> #DF -> triple fault, the silent failure made fatal."""
    from trapbuild import missing_tools
    if missing_tools():
        pytest.skip("gcc/as/ld missing")
    import guestbuild
    img = guestbuild.build("faults64", tmp_path)
    r = run_pyhv("--engine", engine, "--kernel", img, timeout=20)
    assert r.status == 4 and "triple fault (#UD -> #GP -> #DF -> #GP)" in r.stderr, \
        r.explain()


@pytest.mark.parametrize("engine", engines("trap"))
def test_trap_refuses_non_long_mode_images(engine: str, tmp_path: Path) -> None:
    from trapbuild import missing_tools
    if missing_tools():
        pytest.skip("gcc/as/ld missing")
    import guestbuild
    img = guestbuild.build("hello", tmp_path)
    r = run_pyhv("--engine", engine, "--kernel", img, timeout=20)
    assert r.status == 2, r.explain()
    assert "trap engine runs 64-bit kernels entered in long mode" in r.stderr, r.explain()


def test_trap_is_a_known_engine() -> None:
    from pyhv.engines import ENGINES, engine_class
    assert ENGINES["trap"] == "pyhv.engines.trap:TrapEngine"
    assert engine_class("trap").name == "trap"


@pytest.mark.parametrize("engine", engines(*ENGINES))
@pytest.mark.parametrize(("cmdline", "line"), [
    ("priv 10", "bench: priv 10 0000000000000000\n"),
    ("cpu 2", "bench: cpu 2 ea604e9fa167cdf0\n"),
])
def test_bench_kernel(trap_guest: Callable[[str], Path], engine: str, cmdline: str,
                      line: str) -> None:
    """The kernel bench/trap_bench.py times gives the same result on every engine."""
    r = run_pyhv("--engine", engine, "--kernel", trap_guest("bench"), "--append", cmdline,
                 timeout=20)
    assert (r.status, r.stdout) == (75, line), r.explain()


PAGING = ("paging: own tables built, mov cr3\n"
          "alias: {hi}1000 reads 1111222233334444\n"
          "identity: 1111222233334444\n"
          "cr3 B: {hi}0000 reads bbbbbbbbbbbbbbbb\n"
          "cr3 A: {hi}0000 reads 1111222233334444\n"
          "pte after a read: A=1 D=0\n"
          "pte after a write: A=1 D=1\n"
          "invlpg: {hi}0000 reads bbbbbbbbbbbbbbbb\n"
          "#PF err=0000 cr2={hi}1000\n"
          "wp=0: write to a read-only page done\n"
          "#PF err=0003 cr2={hi}2000\n"
          "paging: 2 page faults, done\n")
KVM_PVM = Path("/sys/module/kvm_pvm").exists()
UPPER_HALF_REASON = ("KVM-PVM never lets CPL 3 code reach PML4 slot 256 of the upper half "
                     "(docs/pvm.md), so the trap engine's shadow cannot map a guest page "
                     "there")


@pytest.mark.parametrize("engine", engines(*ENGINES))
def test_paging_guest_own_tables(trap_guest: Callable[[str], Path], engine: str) -> None:
    """Own 4-level tables, an alias, two CR3s, A/D bits, INVLPG, an unmapped page's #PF
    and CR0.WP: the same output on every engine (trap: shadow page tables)."""
    r = run_pyhv("--engine", engine, "--kernel", trap_guest("paging"), timeout=20)
    assert (r.status, r.stdout) == (77, PAGING.format(hi="000040000000")), r.explain()


def _high_engines() -> list[object]:
    out = engines(*ENGINES)
    if KVM_PVM:
        p = cast(Any, out[0])
        out[0] = pytest.param("trap", marks=[*p.marks, pytest.mark.xfail(
            strict=True, reason=UPPER_HALF_REASON)], id="trap")
    return out


@pytest.mark.parametrize("engine", _high_engines())
def test_paging_guest_upper_half(trap_guest: Callable[[str], Path], engine: str) -> None:
    r = run_pyhv("--engine", engine, "--kernel", trap_guest("paging_high"), timeout=20)
    assert (r.status, r.stdout) == (77, PAGING.format(hi="ffff80000000")), r.explain()


@pytest.mark.parametrize("engine", engines("trap"))
def test_paging_upper_half_is_a_clear_report_on_pvm(trap_guest: Callable[[str], Path],
                                                    engine: str) -> None:
    if not KVM_PVM:
        pytest.skip("not KVM-PVM: the upper half may be reachable at CPL 3")
    r = run_pyhv("--engine", engine, "--kernel", trap_guest("paging_high"), timeout=20)
    assert r.status == 4 and r.stdout == "paging: own tables built, mov cr3\n", r.explain()
    assert "the shadow entry for 0xffff800000000000" in r.stderr, r.explain()
    assert "upper half" in r.stderr and "Traceback" not in r.stderr, r.explain()


@pytest.mark.parametrize("engine", engines("trap"))
def test_paging_stats(trap_guest: Callable[[str], Path], engine: str) -> None:
    r = run_pyhv("--engine", engine, "--kernel", trap_guest("paging"), "--stats", timeout=20)
    assert r.status == 77, r.explain()
    for key in ("trap: shadow fills", "trap: shadow flushes ", "trap: shadow flushes (mov cr3)",
                "trap: shadow invlpg", "trap: shadow page-table writes emulated",
                "trap: shadow kvm resyncs", "trap: shadow pages peak",
                "trap: trap shadow fill", "trap: trap pt write", "trap: trap reflect #PF"):
        assert key in r.stderr, f"{key!r} missing" + r.explain()


def test_a_kick_right_after_sti_keeps_the_hlt_in_its_shadow(
        trap_guest: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """STI's shadow covers the HLT of "sti; hlt" even when a kick (a loaded host's
    ticker, input) ends KVM_RUN before the HLT ran: the interrupt then due is taken at
    the HLT's wake-up, after it, not before it. Here every emulated STI is followed by
    such a kick with a PIT tick already due. teach's tick handler returns with IF=0, so
    an interrupt taken before the HLT left it halted with interrupts off (status 0)."""
    if unavailable("trap"):
        pytest.skip(unavailable("trap") or "")
    import time

    from pyhv.engines.trap.emulate import Emulator
    from pyhv.machine import Machine, MachineConfig
    from pyhv.runner import Runner
    out = bytearray()
    m = Machine(MachineConfig(kernel=trap_guest("teach"), engine="trap", mem_size=16 << 20),
                out.extend)
    kv = m.vcpu.kv  # type: ignore[union-attr]
    emulate = Emulator.emulate

    def emulate_then_kick(self: Emulator, *args: object) -> object:
        o = emulate(self, *args)  # type: ignore[arg-type]
        if o.kind == "sti":
            time.sleep(0.03)                 # the ~100 Hz PIT's next tick is now due
            kv.kvm_run.immediate_exit = 1    # and a kick lands before the HLT runs
        return o
    monkeypatch.setattr(Emulator, "emulate", emulate_then_kick)
    r = Runner(m, timeout=60)
    try:
        res = r.run()
    finally:
        m.close()
    assert (res.status, out.decode()) == (67, TEACH), res
