"""The CPU model pyhv presents to guests: one CPUID table for every engine.

Design: a guest must see the same processor whichever engine runs it, or a snapshot taken
on one engine would resume on a CPU with different features. `CpuModel` is that
processor. Its feature set is the conservative one both engines can honour:

- the software engine (unicorn 2.1.4, QEMU 5 TCG) implements every feature listed;
- deliberately absent: XSAVE/AVX (unicorn's XSAVE support is partial and KVM-PVM cannot
  hide it consistently, docs/host.md), FSGSBASE, SMEP/SMAP, PCID, 1 GiB pages, RDTSCP,
  MONITOR/MWAIT, performance counters;
- added by an engine where it is true: the local APIC bit when the machine has one
  (`set_apic_present`), x2APIC and TSC-deadline where the engine routes the APIC's MSRs
  (`attach_msr`), the invariant TSC (leaf 0x80000007) where the TSC runs at a constant
  rate on the machine's clock (emu with its interposed helpers);
- KVM may present the same table intersected with what the host supports
  (`CpuModel.intersect`).

Fields follow the Intel SDM Vol. 2A, CPUID (and AMD's extended leaves):

    leaf 0           max basic leaf, vendor string (EBX, EDX, ECX)
    leaf 1           EAX family/model/stepping, EBX CLFLUSH size + APIC id,
                     ECX/EDX feature flags
    leaf 7.0         structured extended features (none)
    leaf 0xB         with `cores` > 1 (emu, several vCPUs): the vCPUs are the cores of one
                     package, one thread each (APIC ID = index), and leaf 1 says so
                     (EBX[23:16], EDX.HTT). Linux then runs its boot-time TSC sync check
                     for 2 ms per AP instead of 20 ms with interrupts off, which on a
                     round-robin SMP cost ticks (jiffies) enough to fail its watchdog
    leaf 0x40000000  hypervisor leaf: max hypervisor leaf, "pyhvpyhvpyhv"
    leaf 0x80000000  max extended leaf
    leaf 0x80000001  extended features (SYSCALL, NX, LM, LAHF in long mode)
    0x80000002..4    brand string
    0x80000007       EDX bit 8: invariant TSC
    0x80000008       physical / linear address bits
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# leaf 1 EDX
FPU, DE, PSE, TSC, MSR, PAE, MCE, CX8 = (1 << 0, 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 6,
                                         1 << 7, 1 << 8)
APIC, SEP, MTRR, PGE, MCA, CMOV, PAT, PSE36 = (1 << 9, 1 << 11, 1 << 12, 1 << 13, 1 << 14,
                                               1 << 15, 1 << 16, 1 << 17)
CLFSH, MMX, FXSR, SSE, SSE2 = 1 << 19, 1 << 23, 1 << 24, 1 << 25, 1 << 26
HTT = 1 << 28
# leaf 1 ECX
SSE3, PCLMULQDQ, SSSE3, CX16, SSE41, SSE42, POPCNT = (1 << 0, 1 << 1, 1 << 9, 1 << 13,
                                                      1 << 19, 1 << 20, 1 << 23)
X2APIC, TSC_DEADLINE = 1 << 21, 1 << 24
XSAVE, OSXSAVE, AVX, HYPERVISOR = 1 << 26, 1 << 27, 1 << 28, 1 << 31
# leaf 0x80000007 EDX
INVARIANT_TSC = 1 << 8
# leaf 0x80000001 EDX / ECX
EXT_SYSCALL, EXT_NX, EXT_PDPE1GB, EXT_RDTSCP, EXT_LM = (1 << 11, 1 << 20, 1 << 26, 1 << 27,
                                                        1 << 29)
EXT_LAHF_LM = 1 << 0

BASE_EDX = (FPU | DE | PSE | TSC | MSR | PAE | MCE | CX8 | SEP | MTRR | PGE | MCA | CMOV
            | PAT | PSE36 | CLFSH | MMX | FXSR | SSE | SSE2)
BASE_ECX = SSE3 | SSSE3 | CX16 | SSE41 | SSE42 | POPCNT | HYPERVISOR
EXT_EDX = EXT_SYSCALL | EXT_NX | EXT_LM
EXT_ECX = EXT_LAHF_LM

Regs = tuple[int, int, int, int]   # EAX, EBX, ECX, EDX


def _str_regs(s: bytes) -> tuple[int, ...]:
    return struct.unpack("<" + "I" * (len(s) // 4), s)


@dataclass
class CpuModel:
    """One virtual processor: `leaf(eax, ecx)` answers CPUID for it."""

    vendor: bytes = b"GenuineIntel"
    family: int = 6
    model: int = 6
    stepping: int = 3
    brand: bytes = b"pyhv virtual CPU"
    features_edx: int = BASE_EDX
    features_ecx: int = BASE_ECX
    ext_edx: int = EXT_EDX
    ext_ecx: int = EXT_ECX
    ext7_edx: int = 0           # leaf 0x80000007 EDX (invariant TSC: engines that have it)
    kvm_leaves: bool = False    # the KVM paravirt signature at 0x40000100, no features
    cores: int = 1              # vCPUs shown as cores of one package (leaf 0xB)
    phys_bits: int = 40
    virt_bits: int = 48
    overrides: dict[tuple[int, int], Regs] = field(default_factory=dict)

    MAX_BASIC = 7
    MAX_EXT = 0x80000008
    HV_SIGNATURE = b"pyhvpyhvpyhv"
    KVM_BASE = 0x40000100
    KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"

    def signature(self) -> int:
        """Leaf 1 EAX: stepping, model, family with the extended fields (SDM Figure 3-6)."""
        fam, mod = self.family, self.model
        ext_fam = fam - 0xF if fam > 0xF else 0
        base_fam = min(fam, 0xF)
        ext_mod = mod >> 4 if fam in (6, 0xF) else 0
        return ((self.stepping & 0xF) | ((mod & 0xF) << 4) | (base_fam << 8)
                | (ext_mod << 16) | (ext_fam << 20))

    def leaf(self, eax: int, ecx: int = 0, *, apic_id: int = 0) -> Regs:
        eax &= 0xFFFFFFFF
        if (eax, ecx) in self.overrides:
            return self.overrides[(eax, ecx)]
        if eax == 0:
            b, d, c = _str_regs(self.vendor)
            return (self.MAX_BASIC if self.cores == 1 else 0xB), b, c, d
        if eax == 1:
            if self.cores == 1:       # CLFLUSH 64 B, 1 logical processor in the package
                ebx = (8 << 8) | (1 << 16) | ((apic_id & 0xFF) << 24)
                return self.signature(), ebx, self.features_ecx, self.features_edx
            ebx = (8 << 8) | ((1 << self._core_shift()) << 16) | ((apic_id & 0xFF) << 24)
            return self.signature(), ebx, self.features_ecx, self.features_edx | HTT
        if eax == 0xB and self.cores > 1:
            # x2APIC topology: level 0 SMT (1 thread a core), level 1 core (all vCPUs)
            if ecx == 0:
                return 0, 1, 0x100, apic_id
            if ecx == 1:
                return self._core_shift(), self.cores, 0x201, apic_id
            return 0, 0, ecx & 0xFF, apic_id
        if eax == 0x40000000:
            b, c, d = _str_regs(self.HV_SIGNATURE)
            return 0x40000000, b, c, d
        if eax == self.KVM_BASE and self.kvm_leaves:
            b, c, d = _str_regs(self.KVM_SIGNATURE)
            return self.KVM_BASE + 1, b, c, d
        if eax == 0x80000000:
            b, d, c = _str_regs(self.vendor)
            return self.MAX_EXT, b, c, d
        if eax == 0x80000001:
            return self.signature(), 0, self.ext_ecx, self.ext_edx
        if 0x80000002 <= eax <= 0x80000004:
            brand = self.brand.ljust(48, b"\0")[:47] + b"\0"
            i = (eax - 0x80000002) * 16
            a, b, c, d = _str_regs(brand[i:i + 16])
            return a, b, c, d
        if eax == 0x80000007:
            return 0, 0, 0, self.ext7_edx
        if eax == 0x80000008:
            return self.phys_bits | (self.virt_bits << 8), 0, 0, 0
        return 0, 0, 0, 0

    def _core_shift(self) -> int:
        return (self.cores - 1).bit_length()

    def intersect(self, host: dict[int, Regs]) -> CpuModel:
        """This model with features the host lacks removed (host: leaf -> regs)."""
        m = CpuModel(**{k: getattr(self, k) for k in ("vendor", "family", "model",
                                                      "stepping", "brand", "phys_bits",
                                                      "virt_bits")})
        if 1 in host:
            m.features_ecx = self.features_ecx & (host[1][2] | HYPERVISOR)
            m.features_edx = self.features_edx & host[1][3]
        if 0x80000001 in host:
            m.ext_ecx = self.ext_ecx & host[0x80000001][2]
            m.ext_edx = self.ext_edx & host[0x80000001][3]
        return m

    def table(self, apic_id: int = 0) -> dict[tuple[int, int], Regs]:
        """Every leaf the model defines, for engines that load CPUID up front (KVM)."""
        leaves = [*range(0, self.MAX_BASIC + 1), 0x40000000,
                  *range(0x80000000, self.MAX_EXT + 1)]
        return {(lf, 0): self.leaf(lf, 0, apic_id=apic_id) for lf in leaves}


DEFAULT_MODEL = CpuModel()
