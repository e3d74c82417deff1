"""CPUID reports exactly the interrupt controller the machine has: the local APIC bit
with pyhv's devices, none on a bare board, and x2APIC and TSC-deadline exactly where
their MSRs reach pyhv's APIC (emu with its interposed helpers; not kvm: docs/apic.md)."""

from __future__ import annotations

import pytest

from pyhv.arch.x86 import boot
from pyhv.engines import engine_class
from pyhv.loader import LoadedGuest
from pyhv.machine import Machine, MachineConfig
from pyhv.memory import GuestMemory
from pyhv.runner import Runner

# 16-bit code: CPUID.1, then out 0xf4 <- APIC | X2APIC << 1 | TSC_DEADLINE << 2
CPUID_PROBE = bytes.fromhex(
    "66b801000000" "0fa2"
    "6689d0" "66c1e809" "6683e001" "6689c3"
    "6689c8" "66c1e814" "6683e002" "6609c3"
    "6689c8" "66c1e816" "6683e004" "6609c3"
    "88d8" "e6f4" "f4")


def engines() -> list[object]:
    out: list[object] = []
    for name in ("emu", "kvm"):
        why = engine_class(name).probe()
        out.append(pytest.param(name, marks=pytest.mark.skipif(
            why is not None, reason=f"engine {name} unavailable: {why}")))
    return out


def host_is_pvm() -> bool:
    from pyhv.host import probe_host
    return probe_host().kind == "pvm"


def setup(mem: GuestMemory) -> LoadedGuest:
    mem.write(0x7C00, CPUID_PROBE)
    return LoadedGuest("cpuid", boot.real_mode(0, 0x7C00), "CPUID probe at 0x7c00")


@pytest.mark.parametrize("engine", engines())
def test_cpuid_shows_the_apic_the_engine_routes(engine: str) -> None:
    m = Machine(MachineConfig(engine=engine, mem_size=4 << 20, setup=setup),
                lambda _b: None)
    try:
        result = Runner(m, timeout=30).run()
    finally:
        m.close()
    assert result.reason == "debug-exit", result
    if engine == "emu":
        from pyhv.engines.emu.native import cpuhooks
        want = 0b111 if cpuhooks.available()[0] else 0b001   # + x2APIC, TSC-deadline
    else:                                  # x2APIC where KVM hands its MSRs over
        from pyhv.engines.kvm import KvmEngine
        from pyhv.memory import GuestMemory as Mem
        mem = Mem.with_layout([(0, 1 << 20)])
        try:
            eng = KvmEngine(mem)
            want = 0b011 if eng.msrs_routed else 0b001
            eng.close()
        finally:
            mem.close()
    assert result.status == (want << 1) | 1


@pytest.mark.parametrize("engine", engines())
def test_a_bare_board_has_no_apic_in_cpuid(engine: str) -> None:
    m = Machine(MachineConfig(engine=engine, mem_size=4 << 20, setup=setup, devices=False),
                lambda _b: None)
    try:
        assert m.vcpu is not None
        m.vcpu.attach_io(None, None)
        ex = m.vcpu.run()
    finally:
        m.close()
    # without devices the OUT comes back as an exit carrying the value
    if engine == "kvm" and host_is_pvm() and bytes(getattr(ex, "data", b""))[:1] == b"\1":
        pytest.xfail("KVM-PVM: CPUID.1:EDX.APIC is set in the guest although "
                     "KVM_SET_CPUID2 clears it and IA32_APIC_BASE is 0 (as before pyhv "
                     "had an APIC)")
    assert getattr(ex, "port", None) == 0xF4 and bytes(getattr(ex, "data", b"?"))[:1] == b"\0"


# 16-bit code: enable x2APIC through IA32_APIC_BASE (EN | EXTD), read the x2APIC ID
# (MSR 0x802) and version (0x803), write TPR (0x808) and read it back, then
# out 0xf4 <- ID | (version & 0xff) << 1 | TPR << 1: exactly 0x14 << 1 | 0x20 << 1 -> the
# exit status 0x7 with ID 0, version 0x14, TPR 0x30 would not fit; so the guest stores
# the three values at 0x500 and writes 0xf4 <- 1 (done). A #GP anywhere: the IVT's
# vector 13 is 0, which holds `hlt` bytes, so the run halts instead.
X2APIC_PROBE = bytes.fromhex(
    "66b91b000000" "0f32" "660d00040000" "0f30"          # APIC_BASE |= EXTD
    "66b902080000" "0f32" "66a30005"                     # [0x500] = ID
    "66b903080000" "0f32" "66a30405"                     # [0x504] = version
    "66b908080000" "66b830000000" "6631d2" "0f30"        # TPR = 0x30
    "0f32" "66a30805"                                    # [0x508] = TPR
    "b001" "e6f4" "f4")


def x2apic_setup(mem: GuestMemory) -> LoadedGuest:
    mem.write(0x7C00, X2APIC_PROBE)
    return LoadedGuest("x2apic", boot.real_mode(0, 0x7C00), "x2APIC probe at 0x7c00")


@pytest.mark.parametrize("engine", engines())
def test_x2apic_msrs_reach_the_apic(engine: str) -> None:
    """Where CPUID offers x2APIC, a guest enables it and reads and writes its registers
    through RDMSR/WRMSR (emu: interposed helpers; kvm: user-space MSR exits)."""
    m = Machine(MachineConfig(engine=engine, mem_size=4 << 20, setup=x2apic_setup),
                lambda _b: None)
    try:
        assert m.vcpu is not None
        offered = bool(getattr(m.vcpu, "model", None) and
                       m.vcpu.model.features_ecx & (1 << 21)) or \
            bool(getattr(m.vcpu, "_msr", None))
        if not offered:
            m.close()
            pytest.skip(f"{engine} does not route the x2APIC MSRs here")
        result = Runner(m, timeout=30).run()
        assert m.memory is not None
        got = [m.memory.read_u32(0x500 + 4 * k) for k in range(3)]
        lapic = m.lapics[0]
        assert (result.reason, result.status) == ("debug-exit", 3), result
        assert got == [0, 0x00050014, 0x30], got
        assert lapic.x2apic and lapic.tpr == 0x30
    finally:
        m.close()


# 16-bit code (assembled from GNU as .code16 source; listing in the comment): IVT[2] =
# handler; cli; x2APIC on; an NMI to itself through the x2APIC ICR (MSR 0x830, delivery
# mode NMI, destination 0); wait (bounded) for the handler to count it; out 0xf4 <- count.
# The handler: inc byte [0x600]; iret.
NMI_PROBE = bytes.fromhex(
    "c7060800407cc7060a000000fa66b91b0000000f32660d000400000f3066b93008000066b800040000"
    "6631d20f30b9ffff803e0006007502e2f7a00006e6f4f4fe060006cf")


def nmi_setup(mem: GuestMemory) -> LoadedGuest:
    mem.write(0x7C00, NMI_PROBE)
    return LoadedGuest("nmi", boot.real_mode(0, 0x7C00), "NMI probe at 0x7c00")


@pytest.mark.parametrize("engine", engines())
def test_an_nmi_is_taken_with_interrupts_off(engine: str) -> None:
    """NMIs ignore IF: with IF=0 the self-NMI is taken at once (emu: its own delivery;
    kvm: KVM_NMI), where the engine routes the x2APIC MSRs the probe uses."""
    m = Machine(MachineConfig(engine=engine, mem_size=4 << 20, setup=nmi_setup),
                lambda _b: None)
    try:
        assert m.vcpu is not None
        if not (getattr(m.vcpu, "cpu", None) is not None or
                getattr(m.vcpu, "_msr", None) is not None):
            pytest.skip(f"{engine} does not route the x2APIC MSRs here")
        result = Runner(m, timeout=30).run()
    finally:
        m.close()
    assert (result.reason, result.status) == ("debug-exit", (1 << 1) | 1), result
