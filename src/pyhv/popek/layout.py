"""The probe guest: one small machine, two views of its CPU.

Design: every probe runs a few instructions in a guest that *believes* it is a kernel at
CPL 0 with its own descriptor tables (the "virtual CPU" a trap-and-emulate monitor keeps
for it), while the monitor really runs it at CPL 3 on the monitor's own tables (the
shadow tables). The two views live side by side in one guest-physical map, so the same
snippet can run in either and the difference is exactly what deprivileging changes:

    0x0000_1000  monitor GDT (real)   guest's entries copied, then the monitor's own
    0x0000_2000  guest GDT (virtual)  what the guest kernel loaded
    0x0000_3000  monitor IDT (real)   gates 0..31 and 0x80 -> stubs, via 0x50 (DPL 0)
    0x0000_4000  guest IDT (virtual)  the same gates via the guest's 0x08 (DPL 0)
    0x0000_5000  monitor TSS          RSP0 = KSTACK_TOP (where CPL 3 faults land)
    0x0000_5800  guest TSS
    0x0000_6000  guest LDT            (null entries: only its selector matters)
    0x0000_9000  page tables          identity map of 2 GiB, user-accessible
    0x0001_0000  exception stubs      16 bytes a vector (below)
    0x0002_0000  CODE                 the probe's snippet, then the "done" store
    0x0003_0000  DATA                 scratch memory the snippet reads and writes
    0x0004_0000  USER_STACK_TOP       the snippet's stack (both views)
    0x0005_0000  KSTACK_TOP           the monitor's CPL 0 stack (TSS.RSP0)
    0x4000_0000  DONE (MMIO)          the snippet's last store: "I completed"
    0x4000_1000  EXC + vector (MMIO)  a stub's store: "vector N was delivered"

Selectors (guest GDT; the monitor GDT holds the same first 0x48 bytes):

    0x08 guest kernel code (64-bit, DPL 0)    0x28 guest TSS     0x38 guest LDT
    0x10 guest kernel data (DPL 0)
    monitor only: 0x50 monitor code (DPL 0)   0x58 monitor data (DPL 0)
                  0x60 deprivileged guest code (DPL 3, CS = 0x63)
                  0x68 deprivileged guest data (DPL 3, SS = 0x6b)
                  0x70 monitor TSS

Signalling without CPL 0 code of our own: KVM-PVM emulates every CPL 0 instruction and
cannot deliver a guest's #GP/#UD to user space through KVM_SET_GUEST_DEBUG (docs/host.md).
So both "done" and "exception" reach the monitor as MMIO writes (no RAM at 0x4000_0000):
the snippet ends with `mov byte [DONE], 0` (natively executed at CPL 3, an MMIO exit),
and IDT gate N points at a stub whose only work is `mov byte [EXC + N], 0` (one
instruction for KVM's emulator at CPL 0). The monitor then reads the exception frame
from the stack the CPU switched to. The same stubs serve the software engine, which
delivers exceptions through the guest IDT itself (engines/emu/deliver.py).

The virtual CPU differs from the real one where a monitor's must: another GDT/IDT
base, another TR (0x70 vs 0x28) and LDTR (null vs 0x38), CS/SS of RPL 3 vs 0, CR0.MP
set by the monitor (its lazy-FPU bookkeeping) but not by the guest, and RFLAGS: the guest
kernel runs with interrupts disabled (virtual IF=0), while the real IF stays 1 and
IOPL 0 so that no instruction that depends on them runs unchecked.
"""

from __future__ import annotations

import struct

from pyhv.arch.x86 import gdt, paging
from pyhv.arch.x86.cpustate import (
    CR0_ET,
    CR0_MP,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR4_OSFXSR,
    CR4_OSXMMEXCPT,
    CR4_PAE,
    CR4_UMIP,
    EFER_LMA,
    EFER_LME,
    RFLAGS_FIXED,
    RFLAGS_IF,
    CpuState,
    DescriptorTable,
    Segment,
)
from pyhv.memory import GuestMemory

RAM_SIZE = 2 << 20

MON_GDT = 0x1000
GUEST_GDT = 0x2000
MON_IDT = 0x3000
GUEST_IDT = 0x4000
MON_TSS = 0x5000
GUEST_TSS = 0x5800
GUEST_LDT = 0x6000
PAGE_TABLES = 0x9000
STUBS = 0x10000
STUB_SIZE = 16
CODE = 0x20000
CODE_MAX = 0x1000
DATA = 0x30000
DATA_SIZE = 0x1000
USER_STACK_TOP = 0x40000
STACK_SIZE = 0x4000
KSTACK_TOP = 0x50000
DONE = 0x4000_0000
EXC = 0x4000_1000

# Selectors
G_KCODE, G_KDATA, G_TSS, G_LDT = 0x08, 0x10, 0x28, 0x38
M_KCODE, M_KDATA, M_UCODE, M_UDATA, M_TSS = 0x50, 0x58, 0x60, 0x68, 0x70
DEPRIV_CS, DEPRIV_SS = M_UCODE | 3, M_UDATA | 3
TSS_LIMIT = 0x67
LDT_LIMIT = 0xF

# Vectors the IDTs route to stubs: every exception, and INT 0x80 (a DPL 0 gate).
INT_VECTOR = 0x80
VECTORS = (*range(32), INT_VECTOR)
IDT_LIMIT = (INT_VECTOR + 1) * 16 - 1
# Exceptions that push an error code (SDM Vol. 3A, Table 6-1).
ERROR_CODE_VECTORS = frozenset((8, 10, 11, 12, 13, 14, 17, 21, 29, 30))
EXCEPTION_NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD",
                   7: "#NM", 8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP",
                   14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC", 19: "#XM", 20: "#VE",
                   21: "#CP"}

GUEST_CR0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG
MONITOR_CR0 = GUEST_CR0 | CR0_MP
CR4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
EFER = EFER_LME | EFER_LMA


def exception_name(vector: int) -> str:
    if vector == INT_VECTOR:
        return f"INT {vector:#x}"
    return EXCEPTION_NAMES.get(vector, f"vector {vector}")


# ---------------------------------------------------------------------- tables


def _code64(sel: int, dpl: int) -> Segment:
    return Segment.flat(sel, code=True, bits=64, dpl=dpl)


def _data(sel: int, dpl: int) -> Segment:
    return Segment.flat(sel, code=False, bits=64, dpl=dpl)


def _guest_entries() -> list[Segment | None]:
    """Guest GDT slots 0..8 (0x00..0x40): what the guest kernel built for itself."""
    tss = Segment.system(G_TSS, GUEST_TSS, TSS_LIMIT, 0x9)     # available 64-bit TSS
    ldt = Segment.system(G_LDT, GUEST_LDT, LDT_LIMIT, 0x2)
    return [None, _code64(G_KCODE, 0), _data(G_KDATA, 0), None, None, tss, None, ldt, None]


def _monitor_entries() -> list[Segment | None]:
    """Monitor GDT: the guest's slots copied, then the monitor's own from 0x50."""
    tss = Segment.system(M_TSS, MON_TSS, TSS_LIMIT, 0x9)
    return [*_guest_entries(), None,
            _code64(M_KCODE, 0), _data(M_KDATA, 0), _code64(M_UCODE, 3), _data(M_UDATA, 3),
            tss, None]


def _gate(target: int, selector: int) -> bytes:
    """A 64-bit interrupt gate (type 0xE, P=1, DPL 0, IST 0)."""
    lo = ((target & 0xFFFF) | (selector << 16) | (0x8E << 40)
          | (((target >> 16) & 0xFFFF) << 48))
    return struct.pack("<QQ", lo, target >> 32)


def stub_code(vector: int) -> bytes:
    """`mov byte [EXC + vector], 0; hlt; jmp $-1`: announce the vector, then stop."""
    return (b"\xc6\x04\x25" + struct.pack("<I", EXC + vector) + b"\x00"
            + b"\xf4" + b"\xeb\xfd")


def _idt(selector: int) -> bytes:
    image = bytearray(IDT_LIMIT + 1)
    for v in VECTORS:
        image[v * 16:v * 16 + 16] = _gate(STUBS + v * STUB_SIZE, selector)
    return bytes(image)


def write_tables(mem: GuestMemory) -> None:
    """Write both views' tables, the stubs and the page tables; clear code/data/stacks."""
    g = gdt.table(_guest_entries())
    m = gdt.table(_monitor_entries())
    mem.fill(MON_GDT, 0x1000)
    mem.fill(GUEST_GDT, 0x1000)
    mem.write(GUEST_GDT, g)
    mem.write(MON_GDT, m)
    mem.write(MON_IDT, _idt(M_KCODE))
    mem.write(GUEST_IDT, _idt(G_KCODE))
    for base in (MON_TSS, GUEST_TSS):
        mem.fill(base, TSS_LIMIT + 1)
        # I/O map base past the limit: no permission bitmap, so with IOPL 0 every port
        # access at CPL 3 faults (a base of 0 would make the TSS's own zero bytes the
        # bitmap and allow ports 0..0x33f).
        mem.write_u16(base + 0x66, TSS_LIMIT + 1)
    mem.write_u64(MON_TSS + 4, KSTACK_TOP)          # RSP0
    mem.write_u64(GUEST_TSS + 4, KSTACK_TOP)
    mem.fill(GUEST_LDT, LDT_LIMIT + 1)
    _, tables = paging.identity_tables(2 << 30, base=PAGE_TABLES, user=True)
    mem.write(PAGE_TABLES, tables)
    mem.fill(STUBS, 0x1000, 0xCC)
    for v in VECTORS:
        mem.write(STUBS + v * STUB_SIZE, stub_code(v))
    mem.fill(CODE, CODE_MAX, 0xCC)
    mem.fill(DATA, DATA_SIZE)
    mem.fill(USER_STACK_TOP - STACK_SIZE, STACK_SIZE)
    mem.fill(KSTACK_TOP - STACK_SIZE, STACK_SIZE)


def gdt_limit(monitor: bool) -> int:
    return len(gdt.table(_monitor_entries() if monitor else _guest_entries())) - 1


# ---------------------------------------------------------------------- CPU states


def _common(entry: int) -> CpuState:
    st = CpuState()
    st.cr0 = MONITOR_CR0
    st.cr3 = PAGE_TABLES
    st.cr4 = CR4
    st.efer = EFER
    st.rip = entry
    st.rsp = USER_STACK_TOP
    return st


def deprivileged_state(entry: int, *, umip: bool) -> CpuState:
    """The real CPU: the monitor's tables, CPL 3, IF=1, IOPL=0."""
    st = _common(entry)
    st.cs = _code64(DEPRIV_CS, 3)
    st.ss = _data(DEPRIV_SS, 3)
    st.ds, st.es, st.fs, st.gs = (_data(DEPRIV_SS, 3) for _ in range(4))
    st.tr = Segment.system(M_TSS, MON_TSS, TSS_LIMIT, 0xB)
    st.ldt = Segment(selector=0, base=0, limit=0, type=0x2, s=0, present=0, unusable=1)
    st.gdt = DescriptorTable(MON_GDT, gdt_limit(True))
    st.idt = DescriptorTable(MON_IDT, IDT_LIMIT)
    st.rflags = RFLAGS_FIXED | RFLAGS_IF
    if umip:
        st.cr4 |= CR4_UMIP
    return st


def reference_state(entry: int) -> CpuState:
    """The virtual CPU the guest believes in: its own tables, CPL 0, IF=0."""
    st = _common(entry)
    st.cr0 = GUEST_CR0
    st.cs = _code64(G_KCODE, 0)
    st.ss = _data(G_KDATA, 0)
    st.ds, st.es, st.fs, st.gs = (_data(G_KDATA, 0) for _ in range(4))
    st.tr = Segment.system(G_TSS, GUEST_TSS, TSS_LIMIT, 0xB)
    st.ldt = Segment.system(G_LDT, GUEST_LDT, LDT_LIMIT, 0x2)
    st.gdt = DescriptorTable(GUEST_GDT, gdt_limit(False))
    st.idt = DescriptorTable(GUEST_IDT, IDT_LIMIT)
    st.rflags = RFLAGS_FIXED
    return st
