"""Guests on the emu engine: real, protected and long mode; delivery; CPL 3; timers.

Each guest (source under tests/guests/emu/) runs on pyhv's own machine and run loop
(emuguests.py): its timer is the machine's 8254 through its 8259, its output goes to the
16550. It prints tokens: the assertions are on what the guest observed (vector, error
code, CPL, CR2), so a broken delivery, stack switch, SYSCALL or clock changes the output.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from emuguests import Booted, Ran

from pyhv.exits import InternalError, Shutdown

Guest = Callable[[str], Path]
Emu = Callable[..., Booted]


def run_long(emu: Emu, guest: Guest, scenario: int) -> tuple[str, Ran, Booted]:
    m = emu(guest("long64"), append=str(scenario))
    r = m.run()
    return r.out, r, m


def test_real_mode_ivt_int_de_and_timer(emu: Emu, guest: Guest) -> None:
    r = emu(guest("real16")).run()
    assert r.exit_code == 0
    assert r.out == "IDT2R"
    assert r.stats["interrupts"] == 2 and r.stats["halts"] == 2


def test_protected_mode_gates_cpl3_int80_and_timer(emu: Emu, guest: Guest) -> None:
    r = emu(guest("prot32")).run()
    assert r.exit_code == 0
    # #DE, #GP(0x1230), INT 0x80 from CPL 3 on the TSS's ESP0 stack, two timer wakeups
    assert r.out == "V0/0/0 Vd/1230/0 V80/0/3 K T2"


def test_long_mode_exceptions_user_mode_syscall_and_timer(emu: Emu, guest: Guest) -> None:
    out, r, _m = run_long(emu, guest, 0)
    tokens = out.split()
    assert tokens[:5] == ["V0/0/0",            # #DE
                          "V6/0/0",            # #UD
                          "Vd/1230/0",         # #GP(selector 0x1230)
                          "Ve/0/0/40000000",   # #PF read, not present, CR2
                          "Ve/3/0/40000000"]   # #PF write to a read-only page
    assert tokens[5:9] == ["V80/0/3", "K",      # INT 0x80 from CPL 3, stack from RSP0
                           "Vd/0/3",            # CLI at CPL 3 -> #GP(0)
                           "U3S0R2bG6b6773"]    # CPL 3, SYSCALL at CPL 0, rax 43, SWAPGS
    assert tokens[9] == "HB6"                   # HLT woke on ticks, busy loop saw 6 ticks
    assert r.exit_code == 0
    st = r.stats
    assert st["syscalls"] == 1 and st["interrupts"] == 6 and st["exceptions"] == 6
    assert st["software interrupts"] == 1


def test_timer_interrupts_follow_virtual_time(emu: Emu, guest: Guest) -> None:
    _out, r, _m = run_long(emu, guest, 0)
    # 6 ticks of ~1 ms: the guest saw them at >= 6 ms of virtual time (the 8254 was
    # programmed after the exceptions and the user-mode excursion), and HLT skipped ahead
    assert r.machine.devices.pic.delivered == 6
    assert 6_000_000 <= r.virtual_ns < 50_000_000


def test_df_when_pf_gate_not_present(emu: Emu, guest: Guest) -> None:
    out, r, _m = run_long(emu, guest, 1)
    assert out == "V8/0/0 DF"
    assert r.stats["double faults"] == 1


def test_triple_fault_is_a_shutdown_with_report(emu: Emu, guest: Guest) -> None:
    out, r, _m = run_long(emu, guest, 2)
    last = r.last
    assert out == ""
    assert isinstance(last, Shutdown)
    assert "triple fault" in last.reason and "#UD -> #GP -> #DF" in last.reason
    assert last.rip is not None
    assert r.result.reason == "crash" and last.reason in r.result.detail


def test_fetch_outside_ram_is_an_internal_error(emu: Emu, guest: Guest) -> None:
    _out, r, _m = run_long(emu, guest, 3)
    last = r.last
    assert isinstance(last, InternalError)
    assert last.rip == 0xD0000000
    assert "outside RAM" in last.describe()
    assert r.result.reason == "crash" and r.result.rip == 0xD0000000


def test_fault_on_handler_stack_becomes_df_on_ist(emu: Emu, guest: Guest) -> None:
    out, _r, _m = run_long(emu, guest, 4)
    assert out == "V8/0/0 DF"


class MmioLog:
    """A device in the MMIO hole: logs (address, size, value or None) and reads 0x5a.."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.log: list[tuple[int, int, int | None]] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append((self.base + offset, size, None))
        return 0x5A5A5A5A5A5A5A5A & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append((self.base + offset, size, value))


def test_mmio_goes_to_the_handler(emu: Emu, guest: Guest) -> None:
    m = emu(guest("long64"), append="5")
    dev = MmioLog(0xD0000000)
    m.machine.mmio.register(dev.base, 0x1000, dev, "test MMIO log")
    r = m.run()
    assert r.out == "5a5a5a5a"
    assert dev.log == [(0xD0000000, 4, None), (0xD0000010, 4, 0x12345678)]
    assert r.stats["mmio reads"] == 1 and r.stats["mmio writes"] == 1


def test_cpuid_answers_from_the_model(emu: Emu, guest: Guest) -> None:
    out, _r, _m = run_long(emu, guest, 6)
    vendor_ebx, ext_edx = out.split()
    assert vendor_ebx == "756e6547"                       # "Genu"
    assert int(ext_edx, 16) == (1 << 11) | (1 << 20) | (1 << 29)   # SYSCALL, NX, LM


def test_jump_to_unmapped_linear_address_is_a_page_fault(emu: Emu, guest: Guest) -> None:
    out, _r, _m = run_long(emu, guest, 7)
    assert out == "Ve/0/0/40000000 !"


def test_fallback_without_native_hook(emu: Emu, guest: Guest, monkeypatch: object) -> None:
    import pytest

    from pyhv.engines.emu import native
    mp: pytest.MonkeyPatch = monkeypatch  # type: ignore[assignment]
    mp.setenv("PYHV_EMU_NATIVE", "0")
    mp.setattr(native, "_cache", None)
    m = emu(guest("long64"), append="0")
    assert not m.machine.vcpu.native  # type: ignore[union-attr]
    r = m.run()
    assert r.out.split()[:9] == ["V0/0/0", "V6/0/0", "Vd/1230/0", "Ve/0/0/40000000",
                                 "Ve/3/0/40000000", "V80/0/3", "K", "Vd/0/3",
                                 "U3S0R2bG6b6773"]
    assert r.out.split()[9] == "HB6"
    m2 = emu(guest("prot32"))
    assert m2.run().out == "V0/0/0 Vd/1230/0 V80/0/3 K T2"


def test_timer_interrupts_taken_in_user_mode(emu: Emu, guest: Guest) -> None:
    """IF=1 at CPL 3: each tick enters the kernel on TSS.RSP0 and IRETQs back to CPL 3."""
    out, r, _m = run_long(emu, guest, 8)
    assert out == "T3/3"                  # 3 ticks seen at CPL 3, all on the RSP0 stack
    assert r.stats["interrupts"] == 3 and r.stats["syscalls"] == 1


def test_guest_switches_real_to_protected_to_long_mode(emu: Emu, guest: Guest) -> None:
    m = emu(guest("modeswitch"))
    r = m.run()
    assert r.out == "RPL1" and r.exit_code == 0
    assert m.machine.vcpu is not None
    st = m.machine.vcpu.get_state()
    assert st.mode == "long" and st.cs.selector == 0x18 and st.efer & 0x400


def test_sti_shadow_lets_hlt_execute_before_the_interrupt(emu: Emu, guest: Guest) -> None:
    out, r, _m = run_long(emu, guest, 9)
    assert out == "S1"       # woken by the tick that was already pending, not the next one
    assert r.stats["interrupts"] == 1


def test_fault_loop_in_a_handler_overflows_into_df(emu: Emu, guest: Guest) -> None:
    """A #GP handler that faults again nests 4 KiB of frames (85 x 48 bytes), then the
    push runs into an unmapped page: #PF, whose frame cannot be pushed either -> #DF."""
    out, r, _m = run_long(emu, guest, 10)
    assert out == "V8/0/0 DF"
    st = r.stats
    assert st["vector 0xd"] == 4096 // 48 + 1 and st["double faults"] == 1
