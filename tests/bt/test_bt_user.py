"""Guest user mode on bt (engines/bt/user.py): the kernel translated, its CPL 3 code run
directly, and every transition between them (IRETQ, SYSRETQ, INT n, SYSCALL, #GP, #UD,
#PF, timer interrupts) giving the output of emu, a real CPU.

One line may differ, by a host fact: KVM-PVM runs every CPL 3 guest on its own user
selectors, so `mov ax, cs` in user mode reads 0x33 (and SS 0x2b) there (docs/host.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from trapbuild import run_pyhv, unavailable

KVM_WHY = unavailable("trap")
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(KVM_WHY is not None, reason=KVM_WHY or "")]
KVM_PVM = Path("/sys/module/kvm_pvm").exists()

USERMODE = ("usermode: start\n"
            "iretq to cs 000b (dpl 0): #GP err=0008\n"
            "user cs=0023 ss=001b IF=1\n"
            "int 0x2e x300: sum=000000000000b05e frames ok=012c\n"
            "syscall x300: xor=000000000000012c entries ok=012c rcx ok=012c\n"
            "int 0x2d (DPL 0 gate): #GP err=016a\n"
            "ud2: #UD at user_main+0052\n"
            "supervisor page: #PF err=0005 cr2=0000000040000000\n"
            "ticks in user mode: 3\n"
            "usermode: done\n")
PVM_SELECTORS = "user cs=0033 ss=002b IF=1\n"


def _stat(stderr: str, key: str) -> int:
    m = re.search(rf"{re.escape(key)}\s+\S+\s+([\d.]+)", stderr)
    assert m, f"{key!r} missing in:\n{stderr}"
    return int(float(m.group(1)))


def test_user_mode_round_trips_same_as_emu(bt_guest: Callable[[str], Path]) -> None:
    """300 INT n and 300 SYSCALL/SYSRETQ round trips, #GP/#UD/#PF from user mode and
    timer ticks taken there: emu's output, with user code run natively (no translation
    of it) and the kernel translated."""
    img = bt_guest("usermode")
    if unavailable("emu") is None:
        emu = run_pyhv("--engine", "emu", "--kernel", img, timeout=30)
        assert (emu.status, emu.stdout) == (83, USERMODE), emu.explain()
    r = run_pyhv("--engine", "bt", "--kernel", img, "--stats", timeout=30)
    want = USERMODE.replace("user cs=0023 ss=001b IF=1\n", PVM_SELECTORS) if KVM_PVM \
        else USERMODE
    assert (r.status, r.stdout) == (83, want), r.explain()
    assert _stat(r.stderr, "bt: trap user syscall") == 300, r.explain()
    assert _stat(r.stderr, "bt: trap call-out sysretq to user") == 300, r.explain()
    assert _stat(r.stderr, "bt: trap user int n") >= 301, r.explain()   # 0x2e x300, 0x2c
    assert _stat(r.stderr, "bt: trap call-out iretq to user") >= 302, r.explain()
    assert _stat(r.stderr, "bt: bt user mode entries") >= 602, r.explain()
    assert "Traceback" not in r.stderr


def test_modes_usys_on_bt(bt_guest: Callable[[str], Path]) -> None:
    """The `usys` loop of `pyhv bench modes` (modes.S) runs on bt."""
    r = run_pyhv("--engine", "bt", "--kernel", bt_guest("modes"), "--append", "usys 50",
                 "--stats", timeout=30)
    assert (r.status, r.stdout) == (75, "modes: usys 50 0000000000000000\n"), r.explain()
    assert _stat(r.stderr, "bt: trap user int n") == 51, r.explain()
