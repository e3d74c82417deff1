"""The virtual CPU: the privileged state the guest kernel believes it has.

Design: everything the guest can set only at CPL 0 lives here, never in the real CPU:
the interrupt flag (the real IF stays 1 so that the monitor regains control on every
interrupt window it creates, and IOPL stays 0 so that port I/O, CLI and STI fault),
CR0/CR2/CR3/CR4/CR8, EFER, GDTR/IDTR/LDTR/TR, the code and stack segments at virtual
CPL 0, debug registers and MSRs. Emulated instructions read and write it; the state the
engine reports (`CpuState`) is built from it, so a snapshot of a trap guest shows what
the guest sees, not the monitor's tables.

The real CPU runs with CS/SS of RPL 3 whose descriptors the monitor picks
(descriptors.py); `cs` and `ss` here are what the guest loaded (RPL 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyhv.arch.x86.cpustate import (
    RFLAGS_IF,
    RFLAGS_IOPL,
    CpuState,
    DescriptorTable,
    Segment,
)


@dataclass
class VirtualCpu:
    if_: bool = False
    iopl: int = 0
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0xFEE00900
    gdt: DescriptorTable = field(default_factory=DescriptorTable)
    idt: DescriptorTable = field(default_factory=DescriptorTable)
    ldt: Segment = field(default_factory=lambda: Segment(type=0x2, s=0, present=0,
                                                         unusable=1))
    tr: Segment = field(default_factory=lambda: Segment(type=0xB, s=0))
    cs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    dr: list[int] = field(default_factory=lambda: [0, 0, 0, 0, 0, 0, 0xFFFF0FF0, 0x400])
    msrs: dict[int, int] = field(default_factory=dict)
    sti_shadow: bool = False       # the instruction after STI runs before an interrupt

    @classmethod
    def from_state(cls, st: CpuState) -> VirtualCpu:
        return cls(if_=bool(st.rflags & RFLAGS_IF), iopl=(st.rflags & RFLAGS_IOPL) >> 12,
                   cr0=st.cr0, cr2=st.cr2, cr3=st.cr3, cr4=st.cr4, cr8=st.cr8,
                   efer=st.efer, apic_base=st.apic_base,
                   gdt=DescriptorTable(st.gdt.base, st.gdt.limit),
                   idt=DescriptorTable(st.idt.base, st.idt.limit),
                   ldt=Segment(**vars(st.ldt)), tr=Segment(**vars(st.tr)),
                   cs=Segment(**vars(st.cs)), ss=Segment(**vars(st.ss)),
                   msrs=dict(st.msrs), sti_shadow=bool(st.interrupt_shadow))

    def rflags(self, real: int) -> int:
        """The RFLAGS the guest should see: the real arithmetic flags, virtual IF/IOPL."""
        out = real & ~(RFLAGS_IF | RFLAGS_IOPL | (1 << 16))
        return out | (RFLAGS_IF if self.if_ else 0) | (self.iopl << 12)

    def fill(self, st: CpuState) -> None:
        """Write the virtual parts into `st` (GPRs and data segments come from KVM)."""
        st.cs, st.ss = Segment(**vars(self.cs)), Segment(**vars(self.ss))
        st.tr, st.ldt = Segment(**vars(self.tr)), Segment(**vars(self.ldt))
        st.gdt = DescriptorTable(self.gdt.base, self.gdt.limit)
        st.idt = DescriptorTable(self.idt.base, self.idt.limit)
        st.cr0, st.cr2, st.cr3, st.cr4, st.cr8 = (self.cr0, self.cr2, self.cr3, self.cr4,
                                                  self.cr8)
        st.efer, st.apic_base = self.efer, self.apic_base
        st.msrs = dict(self.msrs)
        st.interrupt_shadow = 1 if self.sti_shadow else 0
