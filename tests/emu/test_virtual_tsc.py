"""The emu TSC is constant-rate on the machine's virtual clock (1 GHz: one tick per
virtual ns), through pyhv's interposed RDTSC/RDMSR/WRMSR helpers (native/cpuhelpers.c).

A real-mode guest reads the TSC, runs a 1000-round loop (one translated block a round)
and reads it again: the difference is exactly the virtual time of the blocks between,
10 ns each, whatever the host's speed; IA32_TSC (MSR 0x10) reads the same TSC, a write
to it moves the TSC there. The clock ends at or after the last TSC read."""

from __future__ import annotations

import pytest

from pyhv.arch.x86.boot import real_mode
from pyhv.clock import TimerQueue, VirtualClock
from pyhv.engines.emu import EmuEngine
from pyhv.engines.emu.native import cpuhooks
from pyhv.exits import Halt
from pyhv.memory import GuestMemory

# 16-bit code at 0x1000:
#   rdtsc; mov esi, eax; mov ecx, 1000; 1: dec ecx; jnz 1b; rdtsc; mov edi, eax
#   mov ecx, 0x10; mov eax, 0x40000000; xor edx, edx; wrmsr; rdmsr; mov ebp, eax; hlt
CODE = bytes.fromhex(
    "0f31" "6689c6" "66b9e8030000" "6649" "75fc" "0f31" "6689c7"
    "66b910000000" "66b800000040" "6631d2" "0f30" "0f32" "6689c5" "f4")


def run_once() -> tuple[int, int, int, int]:
    memory = GuestMemory.with_layout([(0, 1 << 20)])
    try:
        vcpu = EmuEngine(memory).create_vcpu(0)
        if vcpu.cpu is None:           # type: ignore[attr-defined]
            pytest.skip(f"no virtual TSC here: {cpuhooks.available()[1]}")
        clock = VirtualClock()
        vcpu.attach_clock(clock, TimerQueue(clock))
        memory.write(0x1000, CODE)
        vcpu.set_state(real_mode(0, 0x1000))
        ex = vcpu.run()
        assert isinstance(ex, Halt), ex
        st = vcpu.get_state()
        result = (st.rsi & 0xFFFFFFFF, st.rdi & 0xFFFFFFFF, st.rbp & 0xFFFFFFFF,
                  clock.now_ns())
        vcpu.close()
        return result
    finally:
        memory.close()


def test_tsc_counts_virtual_time_exactly() -> None:
    first, second, after_write, clock_end = run_once()
    assert second - first == 1000 * 10         # 1000 blocks of 10 ns, 1 tick per ns
    assert second <= clock_end
    assert 0x40000000 <= after_write < 0x40000000 + 1000   # IA32_TSC written, read back
    assert run_once() == (first, second, after_write, clock_end)   # deterministic


def test_cpuid_offers_the_invariant_tsc_only_with_the_virtual_tsc() -> None:
    memory = GuestMemory.with_layout([(0, 1 << 20)])
    try:
        vcpu = EmuEngine(memory).create_vcpu(0)
        edx = vcpu.model.leaf(0x80000007)[3]   # type: ignore[attr-defined]
        assert bool(edx & (1 << 8)) == (vcpu.cpu is not None)   # type: ignore[attr-defined]
        vcpu.close()
    finally:
        memory.close()
