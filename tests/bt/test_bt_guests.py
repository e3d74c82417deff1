"""The bt engine through the real `pyhv run`: the trap teaching guests, the sensitive
guest that trap-and-emulate gets wrong, and btedge (what a translator must get right).

Expected outputs are those of a CPU at real CPL 0 (tests/trap asserts them on emu and
kvm); btedge runs on emu in the same test, so bt is compared with it directly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from test_trap_guests import HIDDEN, PAGING, SENSITIVE_CPL0, TEACH, _lines
from trapbuild import run_pyhv, unavailable

KVM_WHY = unavailable("trap")
needs_kvm = pytest.mark.skipif(KVM_WHY is not None, reason=KVM_WHY or "")
pytestmark = [pytest.mark.kvm, needs_kvm]
KVM_PVM = Path("/sys/module/kvm_pvm").exists()

BTEDGE = ("btedge: start\n"
          "call pushes its guest address: yes\n"
          "indirect: 42 43 44\n"
          "smc: 1 7\n"
          "smc same block: 05\n"
          "#UD at +0\n"
          "mid: 00000000\n"
          "lar cs: 00a09b00 lsl ds: ffffffff\n"
          "verr cs: 1 verw ds: 1 verw cs: 0 lar 0: 0\n"
          "mov ax, ss: 0010\n"
          "iopl: 3 then 0\n"
          "blocks: 1500\n"
          "#PF err=0000 cr2=00007f8000181000\n"
          "#PF err=0002 cr2=00007f8000181000\n"
          "int 0x2f: rip ok cs=0008 frame IF=1 handler IF=0 after IF=1\n"
          "#PF err=0002 cr2=ffffff8000000000\n"
          "r11 after the fault: 1234\n"
          "btedge: done\n")


def _stat(stderr: str, key: str) -> int:
    m = re.search(rf"{re.escape(key)}\s+\S+\s+([\d.]+)", stderr)
    assert m, f"{key!r} missing in:\n{stderr}"
    return int(float(m.group(1)))


def test_teach_runs_on_bt(bt_guest: Callable[[str], Path]) -> None:
    r = run_pyhv("--engine", "bt", "--kernel", bt_guest("teach"), "--stats", timeout=20)
    assert (r.status, r.stdout) == (67, TEACH), r.explain()
    # CLI/STI were rewritten inline, port I/O and LGDT called out, the rest copied
    assert _stat(r.stderr, "bt: bt translated cli") >= 1, r.explain()
    assert _stat(r.stderr, "bt: bt translated sti") >= 1, r.explain()
    assert _stat(r.stderr, "bt: trap call-out out") > 0, r.explain()
    assert _stat(r.stderr, "bt: trap call-out lgdt") == 1, r.explain()
    assert _stat(r.stderr, "bt: bt blocks translated") > 10, r.explain()
    assert _stat(r.stderr, "bt: bt jumps chained") > 0, r.explain()
    assert _stat(r.stderr, "bt: interrupts reflected") >= 10, r.explain()
    assert "trap sti" not in r.stderr and "trap cli" not in r.stderr   # never a trap
    assert "call-out iretq" not in r.stderr           # its handlers return inline


def test_sensitive_wrong_on_trap_right_on_bt(bt_guest: Callable[[str], Path]) -> None:
    """The Popek-Goldberg failures of trap (UMIP off) are gone under translation: every
    line is the CPL 0 answer, and POPF's IF=1 lets the timer wake the HLT."""
    trap = run_pyhv("--engine", "trap", "--kernel", bt_guest("sensitive"), timeout=20)
    bt = run_pyhv("--engine", "bt", "--kernel", bt_guest("sensitive"), timeout=20)
    wrong = _lines(trap.stdout)
    assert wrong["sgdt"] == "sgdt: monitor's GDT at ffffff8000000000", trap.explain()
    assert wrong["pushf after cli"] == "pushf after cli: IF=1 IOPL=0", trap.explain()
    assert trap.status == 0, trap.explain()
    assert (bt.status, bt.stdout) == (69, SENSITIVE_CPL0), bt.explain()


def test_btedge_same_as_emu(bt_guest: Callable[[str], Path]) -> None:
    """Return addresses, indirect branches, self-modifying code (another block and the
    same block), an undecodable byte, a call into the middle of an instruction,
    LAR/LSL/VERR/VERW, MOV from SS, POPF's IOPL, a TC overflow (tc=64K: flushed) and
    the translator's own area: the same output as on emu (real CPL 0)."""
    emu = run_pyhv("--engine", "emu", "--kernel", bt_guest("btedge"), timeout=30)
    if unavailable("emu") is None:
        assert (emu.status, emu.stdout) == (79, BTEDGE), emu.explain()
    r = run_pyhv("--engine", "bt", "--engine-opt", "tc=64K", "--kernel", bt_guest("btedge"),
                 "--stats", timeout=30)
    assert (r.status, r.stdout) == (79, BTEDGE), r.explain()
    assert _stat(r.stderr, "bt: bt flushes (full)") >= 1, r.explain()
    assert _stat(r.stderr, "bt: bt smc: store emulated") >= 1, r.explain()
    assert _stat(r.stderr, "bt: bt blocks invalidated") >= 1, r.explain()
    assert _stat(r.stderr, "bt: trap call-out lookup miss") >= 1, r.explain()
    # INT n and IRETQ took their inline paths: no call-out to the emulator for them
    assert _stat(r.stderr, "bt: bt translated int 0x2f") >= 1, r.explain()
    assert _stat(r.stderr, "bt: bt translated iretq") >= 1, r.explain()
    assert "call-out int" not in r.stderr and "call-out iretq" not in r.stderr, r.explain()


def test_hidden_and_bad_tables_on_bt(bt_guest: Callable[[str], Path]) -> None:
    r = run_pyhv("--engine", "bt", "--kernel", bt_guest("hidden"), timeout=20)
    assert (r.status, r.stdout) == (71, HIDDEN), r.explain()
    for guest, first in (("badgdt", "badgdt: loading a GDT of zeros\n"),
                         ("badidt", "badidt: loading an IDT of 0xaa bytes\n")):
        r = run_pyhv("--engine", "bt", "--kernel", bt_guest(guest), timeout=20)
        assert r.status == 4 and r.stdout == first, r.explain()
        assert "triple fault" in r.stderr and "Traceback" not in r.stderr, r.explain()


def test_cannot_emulate_on_bt(bt_guest: Callable[[str], Path]) -> None:
    r = run_pyhv("--engine", "bt", "--kernel", bt_guest("cannot"), timeout=20)
    assert r.status == 4 and r.stdout == "cannot: before\n", r.explain()
    assert "cannot emulate rep outsb" in r.stderr, r.explain()
    assert "at rip=0x100023 (instruction bytes: f3 6e)" in r.stderr, r.explain()
    assert "Traceback" not in r.stderr


def test_paging_on_bt(bt_guest: Callable[[str], Path]) -> None:
    r = run_pyhv("--engine", "bt", "--kernel", bt_guest("paging"), timeout=20)
    assert (r.status, r.stdout) == (77, PAGING.format(hi="000040000000")), r.explain()


def test_paging_upper_half_on_bt_is_a_clear_report(bt_guest: Callable[[str], Path]) -> None:
    if not KVM_PVM:
        pytest.skip("not KVM-PVM: the upper half may be reachable at CPL 3")
    r = run_pyhv("--engine", "bt", "--kernel", bt_guest("paging_high"), timeout=20)
    assert r.status == 4 and r.stdout == "paging: own tables built, mov cr3\n", r.explain()
    assert "upper half" in r.stderr and "Traceback" not in r.stderr, r.explain()


@pytest.mark.parametrize(("cmdline", "line"), [
    ("priv 10", "bench: priv 10 0000000000000000\n"),
    ("cpu 2", "bench: cpu 2 ea604e9fa167cdf0\n"),
    ("flags 10", "bench: flags 10 0000000000000000\n"),
    ("sys 10", "bench: sys 10 0000000000000000\n"),
])
def test_bench_kernel_on_bt(bt_guest: Callable[[str], Path], cmdline: str, line: str) -> None:
    r = run_pyhv("--engine", "bt", "--kernel", bt_guest("bench"), "--append", cmdline,
                 timeout=20)
    assert (r.status, r.stdout) == (75, line), r.explain()


def test_adjacent_callouts_share_one_exit(bt_guest: Callable[[str], Path]) -> None:
    """`in al, 0x61; out 0x80, al`: the OUT's call-out directly follows the IN's in the
    translation, so pyhv takes it in the same stop (no KVM_RUN between): one exit for
    both, the same output."""
    r = run_pyhv("--engine", "bt", "--kernel", bt_guest("bench"), "--append", "priv 50",
                 "--stats", timeout=20)
    assert (r.status, r.stdout) == (75, "bench: priv 50 0000000000000000\n"), r.explain()
    assert _stat(r.stderr, "bt: bt call-outs taken without an exit") >= 50, r.explain()
    assert _stat(r.stderr, "port 0x0080 (no device)") == 50, r.explain()


def test_bad_tc_option_is_refused() -> None:
    for value in ("1K", "nonsense", "128M"):
        r = run_pyhv("--engine", "bt", "--engine-opt", f"tc={value}", "--kernel",
                     "/nonexistent", timeout=20)
        assert r.status == 2 and "tc=" in r.stderr, r.explain()
        assert "Traceback" not in r.stderr


def test_interrupts_taken_while_translated_code_computes(bt_guest: Callable[[str], Path]
                                                         ) -> None:
    """A loop of chained translations with no call-out (and a RET, whose inline lookup
    is where kicks often land): the timer's interrupts are taken at guest instruction
    boundaries, retried shortly when a kick stops the vCPU inside a rewritten sequence."""
    r = run_pyhv("--engine", "bt", "--kernel", bt_guest("btirq"), "--stats", timeout=20)
    assert (r.status, r.stdout) == (81, "btirq: computing with interrupts on\n"
                                        "ticks: 5, the loop ran\n"), r.explain()
    assert _stat(r.stderr, "bt: interrupts reflected") == 5, r.explain()


def test_trace_bt_shows_each_block_next_to_its_translation(
        bt_guest: Callable[[str], Path]) -> None:
    r = run_pyhv("--engine", "bt", "--kernel", bt_guest("sensitive"), "--trace-bt",
                 timeout=20)
    assert r.status == 69, r.explain()
    lines = r.stderr.splitlines()
    assert lines[0].startswith("bt: block 0x100000 ("), r.explain()
    # a guest instruction on the left, what it became on the right
    cli = [ln for ln in lines if "| " in ln and ln.split("|")[0].strip().endswith(" cli")]
    assert cli and "S.VIF" in cli[0], r.explain()
    sgdt = [ln for ln in lines if ln.split("|")[0].strip().split()[1:2] == ["sgdt"]]
    assert sgdt, r.explain()
    assert any("call-out: emulate" in ln for ln in lines), r.explain()       # LGDT
    assert any("exit to guest 0x" in ln for ln in lines), r.explain()        # a branch
    assert any("; COMMON" in ln for ln in lines), r.explain()


def test_trace_bt_needs_bt() -> None:
    r = run_pyhv("--engine", "trap", "--trace-bt", "--kernel", "/nonexistent", timeout=20)
    assert r.status == 2 and "--trace-bt needs --engine bt" in r.stderr, r.explain()


def test_stats_keys(bt_guest: Callable[[str], Path]) -> None:
    r = run_pyhv("--engine", "bt", "--kernel", bt_guest("paging"), "--stats", timeout=20)
    assert r.status == 77, r.explain()
    for key in ("bt: bt blocks translated", "bt: bt tc bytes written", "bt: bt tc bytes peak",
                "bt: bt jumps chained", "bt: bt flushes (mov cr3)", "bt: bt flushes ",
                "bt: trap call-out mov cr3", "bt: trap call-out invlpg",
                "bt: trap call-out lookup miss", "bt: trap call-out branch exit",
                "bt: trap shadow fill",
                "bt: trap reflect #PF", "bt: us per trap (round trip)",
                "bt: bt translated call-out out", "bt: bt translated cli"):
        assert key in r.stderr, f"{key!r} missing" + r.explain()
