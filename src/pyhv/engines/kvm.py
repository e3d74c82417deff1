"""The hardware-assisted engine: guest code runs under /dev/kvm.

Design: `KvmEngine` maps every `GuestMemory` region into one KVM VM (one memory slot per
region) and creates `KvmVcpu`s. The interrupt controller stays in user space (the Python
8259 shared with every other engine): before each KVM_RUN the vCPU asks its
`InterruptSource`; when the guest can take an interrupt (KVM's
ready_for_interrupt_injection with IF=1) it acknowledges it and injects the vector with
KVM_INTERRUPT, otherwise it asks KVM for an exit as soon as an interrupt window opens.
HLT therefore exits to pyhv, which waits for the next interrupt. NMIs of the local APIC
(`take_nmi`) go in with KVM_NMI, whatever IF (KVM blocks NMIs until IRET). With a local
APIC, IA32_APIC_BASE and the x2APIC MSRs exit to user space (KVM_CAP_X86_USER_SPACE_MSR
and an MSR filter, `Vm.route_msrs`) and are answered from the model inside `run()`;
CPUID then offers x2APIC (not TSC-deadline: docs/apic.md).

State conversion: `CpuState` <-> kvm_regs/kvm_sregs/kvm_fpu/MSRs/vcpu events. Segment
attributes map field for field; FXSAVE bytes are rebuilt from kvm_fpu.

On KVM-PVM hosts (no VT-x/SVM, see docs/host.md) this engine still works, but only 64-bit
CPL 3 code runs natively; CPL 0 and 32-bit code go through KVM's instruction emulator.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from pyhv.arch.x86 import msr
from pyhv.arch.x86.cpustate import GPRS, SEGMENTS, CpuState, DescriptorTable, Segment
from pyhv.engines.base import Engine, EngineVcpu, InterruptSource, MsrFault, MsrHandler
from pyhv.errors import HostError
from pyhv.exits import Exit
from pyhv.kvm import Kvm, Vm
from pyhv.kvm import structs as ks
from pyhv.kvm.vcpu import IrqWindowOpen, MsrAccess, Vcpu
from pyhv.memory import PAGE_SHIFT, GuestMemory

# MSRs carried in CpuState.msrs (SDM Vol. 4): SYSENTER_CS/ESP/EIP, STAR, LSTAR, CSTAR,
# SFMASK, KERNEL_GS_BASE, TSC_AUX, PAT, TSC.
STATE_MSRS = [0x174, 0x175, 0x176, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,
              0xC0000102, 0xC0000103, 0x277, 0x10]
REGS = (*GPRS, "rip", "rflags")
TSC_SLACK = 1 << 32            # cycles between writing IA32_TSC and reading it back
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000
# the local APIC's MSRs pyhv's model answers: IA32_APIC_BASE and the x2APIC range
# (IA32_TSC_DEADLINE stays KVM's: the model would need the guest's TSC, KVM's own)
APIC_MSR_RANGES = [(0x1B, 1), (0x800, 0x100)]
CPUID1_ECX_X2APIC = 1 << 21


class KvmVcpu(EngineVcpu):
    def __init__(self, vcpu: Vcpu, index: int,
                 cpuid: list[ks.KvmCpuidEntry2] | None = None) -> None:
        self.v = vcpu
        self.index = index
        self.interrupt_source: InterruptSource | None = None
        self.injected = 0
        self.refused_msrs: list[int] = []    # MSRs a set_state could not write (KVM)
        self.tsc_unset: tuple[int, int] | None = None   # set_state's IA32_TSC not taken
        self._cpuid = cpuid or []
        self.msrs_routed = False              # the engine's VM routes APIC_MSR_RANGES
        self._take_nmi: Callable[[], bool] | None = None
        self.nmis = 0
        self._msr: MsrHandler | None = None
        self._apic = False

    def set_apic_present(self, present: bool) -> None:
        """CPUID.1:EDX.APIC for pyhv's user-space local APIC, reached through MMIO exits
        at 0xfee00000 (KVM itself keeps IA32_APIC_BASE without an in-kernel APIC).
        CPUID.1:ECX.x2APIC once `attach_msr` routes the x2APIC MSRs (user-space MSR
        exits); TSC-deadline stays clear (docs/apic.md)."""
        self._apic = present
        self._set_cpuid()
        # KVM derives CPUID.1:EDX.APIC from IA32_APIC_BASE.EN at run time: a machine
        # without a local APIC gets the MSR's disabled state, so the bit stays clear.
        base = APIC_BASE_ON | (APIC_BASE_BSP if self.index == 0 else 0)
        self.v.set_msrs({MSR_APIC_BASE: base if present else 0})

    def _set_cpuid(self) -> None:
        x2 = self._apic and self._msr is not None
        entries = [ks.KvmCpuidEntry2.from_buffer_copy(e) for e in self._cpuid]
        for e in entries:
            if e.function == 1:
                e.edx = (e.edx | CPUID1_EDX_APIC) if self._apic else \
                    (e.edx & ~CPUID1_EDX_APIC & 0xFFFFFFFF)
                e.ecx = (e.ecx | CPUID1_ECX_X2APIC) if x2 else \
                    (e.ecx & ~CPUID1_ECX_X2APIC & 0xFFFFFFFF)
        self.v.set_cpuid(entries)

    def attach_msr(self, handler: MsrHandler) -> bool:
        """IA32_APIC_BASE and the x2APIC MSRs exit to user space (the VM's MSR filter)
        and go to `handler`; CPUID then offers x2APIC (not TSC-deadline: docs/apic.md)."""
        if not self.msrs_routed:
            return False
        self._msr = handler
        self._set_cpuid()
        return True

    def _answer_msr(self, ex: MsrAccess) -> None:
        handler = self._msr
        try:
            got = None if handler is None else handler(ex.index, ex.value)
        except MsrFault:
            self.v.complete_msr(0, True)
            return
        # not the APIC's (an MSR KVM does not know either): #GP(0), as KVM itself does
        self.v.complete_msr(got or 0, got is None)

    def set_interrupt_source(self, source: InterruptSource | None) -> None:
        """NMIs of a source that separates them (the local APIC, `take_nmi`) go in with
        KVM_NMI, whatever IF; everything else with KVM_INTERRUPT when IF allows."""
        self.interrupt_source = source
        self._take_nmi = None
        if source is not None and hasattr(source, "take_nmi"):
            setattr(source, "nmi_separate", True)  # noqa: B010
            self._take_nmi = getattr(source, "take_nmi")  # noqa: B009

    def run(self) -> Exit:
        v = self.v
        while True:
            if self._take_nmi is not None and self._take_nmi():
                v.nmi()
                self.nmis += 1
            src = self.interrupt_source
            if src is not None and src.pending():
                if v.ready_for_interrupt:
                    vector = src.acknowledge()
                    if vector is not None:
                        v.interrupt(vector)
                        self.injected += 1
                    v.request_interrupt_window(False)
                else:
                    v.request_interrupt_window(True)
            else:
                v.request_interrupt_window(False)
            ex = v.run()
            if isinstance(ex, MsrAccess):
                self._answer_msr(ex)
                continue
            if not isinstance(ex, IrqWindowOpen):
                return ex

    def kick(self) -> None:
        self.v.kick()

    def stats(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {f"exit {k.lower()}": n for k, n in
                                       sorted(self.v.exit_counts.items())}
        out["interrupts injected"] = self.injected
        out["NMIs injected"] = self.nmis
        return out

    # ------------------------------------------------------------------ state

    def get_state(self) -> CpuState:
        v = self.v
        r, sr, fpu = v.get_regs(), v.get_sregs(), v.get_fpu()
        st = CpuState()
        for name in REGS:
            setattr(st, name, getattr(r, name))
        for name in SEGMENTS:
            k = getattr(sr, name)
            setattr(st, name, Segment(selector=k.selector, base=k.base, limit=k.limit,
                                      type=k.type, s=k.s, dpl=k.dpl, present=k.present,
                                      avl=k.avl, l=k.l, db=k.db, g=k.g, unusable=k.unusable))
        st.gdt = DescriptorTable(sr.gdt.base, sr.gdt.limit)
        st.idt = DescriptorTable(sr.idt.base, sr.idt.limit)
        st.cr0, st.cr2, st.cr3, st.cr4, st.cr8 = sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.cr8
        st.efer, st.apic_base = sr.efer, sr.apic_base
        st.msrs = v.get_msrs(STATE_MSRS)
        st.fxsave = _fpu_to_fxsave(fpu)
        ev = v.get_events()
        st.pending_interrupt = ev.int_nr if ev.int_injected else None
        st.interrupt_shadow = ev.int_shadow
        st.nmi_blocked = bool(ev.nmi_masked)
        return st

    def _set_msrs(self, msrs: dict[int, int]) -> None:
        """KVM_SET_MSRS stops at the first MSR it refuses and says how many it took:
        go on past a refused one (each written alone), so one MSR this KVM does not
        take (another engine's value of it) cannot silently drop those after it, such
        as IA32_TSC; a refused IA32_TSC is a HostError (the guest's TSC would jump)."""
        items = list(msrs.items())
        while items:
            done = self.v.set_msrs(dict(items))
            if done < len(items) and items[done][0] == msr.TSC:
                raise HostError(f"kvm: KVM_SET_MSRS refused IA32_TSC = "
                                f"{items[done][1]:#x}")
            self.refused_msrs.extend(i for i, _ in items[done:done + 1])
            items = items[done + 1:]

    def _check_tsc(self, wanted: int | None) -> None:
        """Read IA32_TSC back: on a host where KVM keeps the guest's TSC the host's
        (KVM-PVM here: KVM_SET_MSRS takes the write and changes nothing, docs/host.md),
        `tsc_unset` records (wanted, got) so the caller can say that the guest's TSC
        jumps (a cross-engine restore from emu's virtual TSC); None when it took."""
        self.tsc_unset = None
        if wanted is None:
            return
        got = self.v.get_msrs([msr.TSC])[msr.TSC]
        if abs(got - wanted) > TSC_SLACK:
            self.tsc_unset = (wanted, got)

    def set_state(self, st: CpuState) -> None:
        v = self.v
        r = ks.KvmRegs()
        for name in REGS:
            setattr(r, name, getattr(st, name))
        sr = v.get_sregs()
        for name in SEGMENTS:
            seg: Segment = getattr(st, name)
            k = getattr(sr, name)
            for f in ("selector", "base", "limit", "type", "s", "dpl", "present", "avl", "l",
                      "db", "g", "unusable"):
                setattr(k, f, getattr(seg, f))
        sr.gdt.base, sr.gdt.limit = st.gdt.base, st.gdt.limit
        sr.idt.base, sr.idt.limit = st.idt.base, st.idt.limit
        sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.cr8 = st.cr0, st.cr2, st.cr3, st.cr4, st.cr8
        sr.efer, sr.apic_base = st.efer, st.apic_base
        v.set_sregs(sr)
        v.set_regs(r)
        if st.msrs:
            self._set_msrs(st.msrs)
            self._check_tsc(st.msrs.get(msr.TSC))
        if st.fxsave is not None:
            v.set_fpu(_fxsave_to_fpu(st.fxsave))
        ev = v.get_events()
        ev.int_injected = 1 if st.pending_interrupt is not None else 0
        ev.int_nr = st.pending_interrupt or 0
        ev.int_shadow = st.interrupt_shadow
        ev.nmi_masked = int(st.nmi_blocked)
        ev.flags = 0
        v.set_events(ev)

    def close(self) -> None:
        self.v.close()


def _fpu_to_fxsave(f: ks.KvmFpu) -> bytes:
    img = bytearray(512)
    struct.pack_into("<HHBxHQQII", img, 0, f.fcw, f.fsw, f.ftwx, f.last_opcode, f.last_ip,
                     f.last_dp, f.mxcsr, 0xFFFF)
    img[32:160] = bytes(f.fpr)
    img[160:416] = bytes(f.xmm)
    return bytes(img)


def _fxsave_to_fpu(img: bytes) -> ks.KvmFpu:
    if len(img) != 512:
        raise ValueError("FXSAVE image must be 512 bytes")
    f = ks.KvmFpu()
    (f.fcw, f.fsw, f.ftwx, f.last_opcode, f.last_ip, f.last_dp, f.mxcsr,
     _mask) = struct.unpack_from("<HHBxHQQII", img, 0)
    f.fpr[:] = list(img[32:160])
    f.xmm[:] = list(img[160:416])
    return f


# CPUID.1 bits of the APIC: the local APIC (EDX 9), x2APIC (ECX 21) and the APIC's
# TSC-deadline timer (ECX 24). The interrupt controllers are pyhv's, in user space: the
# base table says "no APIC" (a bare board has none); `KvmVcpu.set_apic_present` sets
# EDX 9 when the machine gives the vCPU its local APIC (xAPIC MMIO). x2APIC and
# TSC-deadline stay clear: their MSRs do not reach pyhv on this engine.
CPUID1_EDX_APIC = 1 << 9
MSR_APIC_BASE = 0x1B
APIC_BASE_ON = 0xFEE00800          # 0xfee00000, enabled
APIC_BASE_BSP = 0x100
CPUID1_ECX_X2APIC = 1 << 21
CPUID1_ECX_TSC_DEADLINE = 1 << 24


def machine_cpuid(entries: list[ks.KvmCpuidEntry2]) -> list[ks.KvmCpuidEntry2]:
    """The host's supported CPUID, less what this machine lacks."""
    for e in entries:
        if e.function == 1:
            e.edx &= ~CPUID1_EDX_APIC & 0xFFFFFFFF
            e.ecx &= ~(CPUID1_ECX_X2APIC | CPUID1_ECX_TSC_DEADLINE) & 0xFFFFFFFF
    return entries


def ram_dirty_pages(vm: Vm, memory: GuestMemory) -> set[int]:
    """Guest page frames written since the last call: KVM's dirty log of each RAM slot
    (slot i holds memory.regions[i]) plus pyhv's own writes (device DMA, loaders)."""
    pages = memory.take_dirty()
    for slot, region in enumerate(memory.regions):
        base = region.gpa >> PAGE_SHIFT
        pages.update(base + p for p in vm.get_dirty_log(slot))
    return pages


def probe_kvm() -> str | None:
    """None when /dev/kvm can be opened and used here, else why not."""
    try:
        Kvm().close()
    except HostError as e:
        return str(e)
    return None


class KvmEngine(Engine):
    """Guest code runs under /dev/kvm."""

    name = "kvm"

    @classmethod
    def probe(cls) -> str | None:
        return probe_kvm()

    def __init__(self, memory: GuestMemory) -> None:
        super().__init__(memory)
        self.kvm = Kvm()
        self.vm = Vm(self.kvm)
        self._cpuid = machine_cpuid(self.kvm.supported_cpuid())
        for slot, region in enumerate(memory.regions):
            self.vm.set_memory(slot, region.gpa, region.size, region.host_addr)
        self.vm.set_tss_addr(TSS_ADDR)
        self.vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        self.msrs_routed = self.vm.route_msrs(APIC_MSR_RANGES)
        self.vcpus: list[KvmVcpu] = []

    def create_vcpu(self, index: int) -> KvmVcpu:
        v = self.vm.create_vcpu(index)
        v.set_cpuid(self._cpuid)
        kv = KvmVcpu(v, index, self._cpuid)
        kv.msrs_routed = self.msrs_routed
        kv.set_apic_present(False)            # until the machine gives it one
        self.vcpus.append(kv)
        return kv

    def enable_dirty_tracking(self, enable: bool = True) -> None:
        self.vm.set_dirty_logging(enable)
        self.memory.track_dirty(enable)

    def dirty_pages(self) -> set[int]:
        return ram_dirty_pages(self.vm, self.memory)

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus = []
        self.vm.close()
        self.kvm.close()
