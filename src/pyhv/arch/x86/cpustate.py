"""The engine-neutral architectural state of one x86 vCPU.

Design: every engine (KVM, the software CPU, trap-and-emulate, binary translation) reads
and writes a vCPU's state as one `CpuState` value. Snapshots store it and migration sends
it, so a guest saved on one engine can be restored on another. It holds what the
architecture defines, with segment registers including their hidden (cached descriptor)
parts, never an engine's private encoding.

Segment attributes follow the descriptor fields (Intel SDM Vol. 3A, 3.4.5):
`type` is the 4-bit type, `s` 1 for code/data, `dpl`, `present`, `avl`, `l` (64-bit
code), `db` (default size), `g` (granularity; `limit` is always stored in bytes, already
scaled). `unusable` marks a null-loaded segment (VMX's "unusable" bit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")

# Control-register and EFER bits used throughout pyhv (SDM Vol. 3A, 2.5 and 2.2.1).
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_EM = 1 << 2
CR0_TS = 1 << 3
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_NW = 1 << 29
CR0_CD = 1 << 30
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_PGE = 1 << 7
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
CR4_UMIP = 1 << 11
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
RFLAGS_CF = 1 << 0
RFLAGS_FIXED = 1 << 1
RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_DF = 1 << 10
RFLAGS_IOPL = 3 << 12
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17
RFLAGS_AC = 1 << 18


@dataclass
class Segment:
    """A segment register: visible selector plus the hidden descriptor cache."""

    selector: int = 0
    base: int = 0
    limit: int = 0xFFFF
    type: int = 3
    s: int = 1
    dpl: int = 0
    present: int = 1
    avl: int = 0
    l: int = 0
    db: int = 0
    g: int = 0
    unusable: int = 0

    @classmethod
    def real_mode(cls, selector: int, *, code: bool = False) -> Segment:
        """A segment as real mode loads it: base = selector * 16, 64 KiB limit."""
        return cls(selector=selector, base=selector << 4, limit=0xFFFF,
                   type=0xB if code else 0x3, s=1, present=1)

    @classmethod
    def flat(cls, selector: int, *, code: bool, bits: int, dpl: int = 0) -> Segment:
        """A 4 GiB flat segment; bits is 16, 32 or 64 (64 only for code)."""
        return cls(selector=selector, base=0, limit=0xFFFFFFFF,
                   type=0xB if code else 0x3, s=1, dpl=dpl, present=1,
                   l=1 if (code and bits == 64) else 0,
                   db=1 if bits == 32 or (not code and bits == 64) else 0, g=1)

    @classmethod
    def system(cls, selector: int, base: int, limit: int, type_: int) -> Segment:
        """A system segment (TSS type 0xB busy 64/32-bit, LDT type 2)."""
        return cls(selector=selector, base=base, limit=limit, type=type_, s=0, present=1)


@dataclass
class DescriptorTable:
    """GDTR/IDTR: base and limit."""

    base: int = 0
    limit: int = 0xFFFF


@dataclass
class CpuState:
    """Everything architectural about one vCPU; the unit of save/restore/migrate."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0xFFF0
    rflags: int = RFLAGS_FIXED
    cs: Segment = field(default_factory=lambda: Segment(selector=0xF000, base=0xFFFF0000,
                                                        type=0xB))
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=lambda: Segment(type=0xB, s=0))
    ldt: Segment = field(default_factory=lambda: Segment(type=0x2, s=0))
    gdt: DescriptorTable = field(default_factory=DescriptorTable)
    idt: DescriptorTable = field(default_factory=DescriptorTable)
    cr0: int = CR0_ET | CR0_NW | CR0_CD
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0xFEE00900
    xcr0: int = 1
    msrs: dict[int, int] = field(default_factory=dict)
    fxsave: bytes | None = None      # 512-byte FXSAVE image (x87 + SSE), None = reset state
    pending_interrupt: int | None = None   # vector accepted but not yet delivered
    interrupt_shadow: int = 0        # STI/MOV SS blocking
    halted: bool = False             # the vCPU is in HLT waiting for an interrupt
    nmi_blocked: bool = False        # an NMI handler runs: NMIs wait for its IRET

    # ------------------------------------------------------------------ queries

    @property
    def cpl(self) -> int:
        """Current privilege level: CS.DPL in protected mode (SS.DPL on real CPUs)."""
        if not self.cr0 & CR0_PE:
            return 0
        if self.rflags & RFLAGS_VM:
            return 3
        return self.cs.dpl

    @property
    def mode(self) -> str:
        """'real', 'protected', 'compat' or 'long' (the mode code at CS runs in)."""
        if not self.cr0 & CR0_PE:
            return "real"
        if self.efer & EFER_LMA:
            return "long" if self.cs.l else "compat"
        return "protected"

    # ------------------------------------------------------------------ (de)serialise

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["msrs"] = {str(k): v for k, v in self.msrs.items()}
        d["fxsave"] = self.fxsave.hex() if self.fxsave is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CpuState:
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            v = d[f.name]
            if f.name in SEGMENTS:
                v = Segment(**v)
            elif f.name in ("gdt", "idt"):
                v = DescriptorTable(**v)
            elif f.name == "msrs":
                v = {int(k): int(x) for k, x in v.items()}
            elif f.name == "fxsave" and v is not None:
                v = bytes.fromhex(v)
            kw[f.name] = v
        return cls(**kw)
