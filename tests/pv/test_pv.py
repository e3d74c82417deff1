"""The pv engine through the real `pyhv run`: the teaching kernel built both ways from
one source (pvops.h), the batched page-table hypercall and the ABI's errors, and the
bad requests that end a run with a clear report."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from test_bt_fuzz import elf64
from test_trap_guests import TEACH
from trapbuild import run_pyhv, unavailable

KVM_WHY = unavailable("trap")
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(KVM_WHY is not None, reason=KVM_WHY or "")]

PVMMU = ("pvmmu: 2 entries updated in one hypercall\n"
         "alias reads 5eed5eed5eed5eed\n"
         "entry outside RAM: ffea\n"
         "list not mapped: fff2\n"
         "console write of 5000 bytes: ffea\n"
         "hypercall 99: ffda\n")


def _stat(stderr: str, key: str) -> int:
    m = re.search(rf"{re.escape(key)}\s+\S+\s+([\d.]+)", stderr)
    assert m, f"{key!r} missing in:\n{stderr}"
    return int(float(m.group(1)))


def test_pv_teach_same_output_fewer_traps(pv_guest: Callable[[str], Path]) -> None:
    """The PV build on pv prints what the native build prints on trap; its interrupt
    flag, sleep, timer and console are hypercalls, so far fewer traps remain."""
    pv = run_pyhv("--engine", "pv", "--kernel", pv_guest("teach-pv"), "--stats", timeout=20)
    assert (pv.status, pv.stdout) == (67, TEACH), pv.explain()
    native = run_pyhv("--engine", "trap", "--kernel", pv_guest("teach"), "--stats",
                      timeout=20)
    assert (native.status, native.stdout) == (67, TEACH), native.explain()
    assert _stat(pv.stderr, "pv: pv events to the callback") == 10, pv.explain()
    assert _stat(pv.stderr, "pv: pv hypercall halt") == 10, pv.explain()
    assert _stat(pv.stderr, "pv: pv hypercall console write") > 0, pv.explain()
    for kind in ("trap cli", "trap sti", "trap hlt", "trap in "):
        assert f"pv: {kind}" not in pv.stderr, kind + pv.explain()
    # every exit counted: the traps left plus the hypercalls (MMIO exits)
    pv_exits = _stat(pv.stderr, "pv: traps") + _stat(pv.stderr, "pv: exit MmioWrite")
    assert pv_exits * 3 < _stat(native.stderr, "trap: traps"), pv.explain()


def test_native_teach_runs_on_pv(pv_guest: Callable[[str], Path]) -> None:
    """A kernel that never registers a shared page runs on pv exactly as on trap."""
    r = run_pyhv("--engine", "pv", "--kernel", pv_guest("teach"), timeout=20)
    assert (r.status, r.stdout) == (67, TEACH), r.explain()


def test_pv_batched_mmu_update_and_errors(pv_guest: Callable[[str], Path]) -> None:
    r = run_pyhv("--engine", "pv", "--kernel", pv_guest("pvmmu-pv"), "--stats", timeout=20)
    assert (r.status, r.stdout) == (85, PVMMU), r.explain()
    assert _stat(r.stderr, "pv: pv mmu entries updated") == 2, r.explain()
    assert _stat(r.stderr, "pv: pv mmu update refused") == 1, r.explain()


@pytest.mark.parametrize(("body", "message"), [
    # mov eax, 0xfeb00008; mov qword [rax], 0x123: a shared page that is not a page
    (bytes.fromhex("b80800b0fe" "48c70023010000"), "the shared page at 0x123 is not a page"),
    # mov eax, 0xfeb00000; mov dword [rax], 1: a hypercall before any shared page
    (bytes.fromhex("b80000b0fe" "c70001000000"), "hypercall 1 before a shared page"),
])
def test_bad_hypercalls_end_with_a_report(tmp_path: Path, body: bytes, message: str) -> None:
    img = tmp_path / "k.elf"
    img.write_bytes(elf64(body))
    r = run_pyhv("--engine", "pv", "--kernel", img, timeout=20)
    assert r.status == 4 and message in r.stderr, r.explain()
    assert "Traceback" not in r.stderr
