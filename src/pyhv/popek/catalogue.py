"""The instructions probed: each a hand-assembled 64-bit snippet and what to look at.

Design: a `Probe` is a few instructions (bytes commented; tests/popek decodes them with
iced-x86 to check the comments), the registers and DATA contents they start with, the
offset of the instruction under test, and an `observe` function that turns a completed
run into one line of text, such as "GDTR base=0x2000 limit=0x47". The same line is made
from the deprivileged run (what the CPL 3 code saw) and from the reference run (what a
guest kernel at CPL 0 on its own tables sees); equal lines mean "same".

Two groups (Robin and Irvine, 2000; SDM Vol. 3A, 2.8 and 5.9):

    sensitive    read or depend on privileged state, but do not need CPL 0 to execute:
                 SGDT SIDT SLDT STR SMSW, PUSHF POPF, LAR LSL VERR VERW, MOV from CS/SS,
                 MOV to DS/SS, far CALL/JMP/RET, IRET, INT n
    privileged   fault with #GP(0) outside CPL 0 (the control group): CLI STI HLT LGDT
                 LIDT LLDT LTR, MOV to/from CR0/CR3/DR7, LMSW CLTS, RDMSR WRMSR, IN OUT
                 (IOPL 0, no I/O bitmap), INVLPG WBINVD SWAPGS

64-bit mode has no PUSH CS/SS/DS/ES or POP DS/ES/SS (they are #UD there), so the segment
register group uses MOV r32,CS/SS and MOV DS/SS,r32 instead; direct far CALL/JMP (9A/EA)
are gone too, so the far transfers go through a m16:32 pointer in DATA.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from pyhv.arch.x86.cpustate import RFLAGS_IF, RFLAGS_IOPL
from pyhv.popek import layout as L
from pyhv.popek.snippet import SnippetResult

Kind = Literal["sensitive", "privileged"]
ZF = 1 << 6


def _abs(addr: int) -> bytes:
    """ModRM/SIB tail for `[disp32]` (mod=00 rm=100, SIB base=101 index=100)."""
    return b"\x25" + struct.pack("<i", addr)


def _mov_eax(v: int) -> bytes:
    return b"\xb8" + struct.pack("<I", v)          # mov eax, imm32


PUSHF_POP_RAX = b"\x9c\x58"                        # pushfq; pop rax
PUSHF_POP_RCX = b"\x9c\x59"                        # pushfq; pop rcx


@dataclass(frozen=True)
class Probe:
    name: str
    kind: Kind
    code: bytes
    at: int                                   # offset of the instruction under test
    observe: Callable[[SnippetResult], str]
    regs: dict[str, int] = field(default_factory=dict)
    data: Callable[[int], bytes] = lambda _landing: b""   # DATA image, given the landing
    handler_vector: int | None = None         # a vector whose delivery means "completed"
    about: str = ""


# ---------------------------------------------------------------------- observers


def _rax(r: SnippetResult) -> int:
    return r.state.rax if r.state is not None else 0


def _flags(value: int) -> str:
    return f"IF={int(bool(value & RFLAGS_IF))} IOPL={(value & RFLAGS_IOPL) >> 12}"


def _sel(name: str) -> Callable[[SnippetResult], str]:
    def obs(r: SnippetResult) -> str:
        v = _rax(r) & 0xFFFF
        return f"{name}={v:#06x} (RPL {v & 3})"
    return obs


def _table(name: str) -> Callable[[SnippetResult], str]:
    def obs(r: SnippetResult) -> str:
        if len(r.data) < 10:
            return "no data"
        limit, base = struct.unpack_from("<HQ", r.data, 0)
        return f"{name} base={base:#x} limit={limit:#x}"
    return obs


def _msw(r: SnippetResult) -> str:
    v = _rax(r) & 0xFFFF
    bits = [n for i, n in enumerate(("PE", "MP", "EM", "TS", "ET", "NE")) if v >> i & 1]
    return f"MSW={v:#06x} ({' '.join(bits)})"


def _zf(what: str) -> Callable[[SnippetResult], str]:
    def obs(r: SnippetResult) -> str:
        st = r.state
        if st is None:
            return "no state"
        if not st.rcx & ZF:
            return "ZF=0 (selector refused)"
        v = st.rdx & 0xFFFF_FFFF
        if what == "ar":
            return f"ZF=1 access rights={v:#x} (DPL {(v >> 13) & 3})"
        if what == "limit":
            return f"ZF=1 limit={v:#x}"
        return "ZF=1"
    return obs


def _if(r: SnippetResult) -> str:
    return _flags(_rax(r))


def _done(text: str) -> Callable[[SnippetResult], str]:
    def obs(r: SnippetResult) -> str:
        return "halted" if r.end == "halt" else text
    return obs


def _reg(name: str, reg: str) -> Callable[[SnippetResult], str]:
    def obs(r: SnippetResult) -> str:
        st = r.state
        return f"{name}={getattr(st, reg):#x}" if st is not None else "no state"
    return obs


def _edx_eax(name: str) -> Callable[[SnippetResult], str]:
    def obs(r: SnippetResult) -> str:
        st = r.state
        if st is None:
            return "no state"
        return f"{name}={(st.rdx & 0xFFFF_FFFF) << 32 | (st.rax & 0xFFFF_FFFF):#x}"
    return obs


def _arrived(r: SnippetResult) -> str:
    st = r.state
    if st is None:
        return "no state"
    return f"reached the target, CS={st.cs.selector:#06x}"


def _in(r: SnippetResult) -> str:
    reads = [a for a in r.io if not a.write]
    where = f" (port {reads[0].port:#x} read)" if reads else " (no port access)"
    return f"AL={_rax(r) & 0xFF:#04x}{where}"


def _out(r: SnippetResult) -> str:
    writes = [a for a in r.io if a.write]
    if not writes:
        return "completed, no port access"
    return f"port {writes[0].port:#x} <- {writes[0].value:#x}"


def _int(r: SnippetResult) -> str:
    if r.end == "exception" and r.vector == L.INT_VECTOR:
        return f"gate {L.INT_VECTOR:#x} taken: the kernel's handler runs"
    return "completed without entering the handler"


# ---------------------------------------------------------------------- snippets

_FAR_PTR = b"\x25" + struct.pack("<i", L.DATA)


def _far_ptr(selector: int) -> Callable[[int], bytes]:
    return lambda landing: struct.pack("<IH", landing, selector)


_GUEST_GDTR = struct.pack("<HQ", L.gdt_limit(False), L.GUEST_GDT)
_GUEST_IDTR = struct.pack("<HQ", L.IDT_LIMIT, L.GUEST_IDT)

_POPF = (PUSHF_POP_RAX[:1] + b"\x5b"               # pushfq; pop rbx
         + b"\x48\x81\xe3\xff\xfd\xff\xff"         # and rbx, ~IF
         + b"\x48\x81\xcb\x00\x30\x00\x00"         # or rbx, IOPL=3
         + b"\x53\x9d"                             # push rbx; popfq   <- under test
         + PUSHF_POP_RAX)                          # pushfq; pop rax

_IRET_KERNEL = (b"\x48\x89\xe0"                    # mov rax, rsp
                + b"\x6a" + bytes([L.G_KDATA])     # push 0x10        (SS)
                + b"\x50"                          # push rax         (RSP)
                + b"\x9c"                          # pushfq           (RFLAGS)
                + b"\x6a" + bytes([L.G_KCODE])     # push 0x08        (CS)
                + b"\x48\x8d\x05\x03\x00\x00\x00"  # lea rax, [rip+3] (RIP: after iretq)
                + b"\x50"                          # push rax
                + b"\x48\xcf")                     # iretq            <- under test

_IRET_IF = (b"\x48\x89\xe0"                        # mov rax, rsp
            + b"\x8c\xd2\x52"                      # mov edx, ss; push rdx
            + b"\x50"                              # push rax
            + b"\x9c"                              # pushfq
            + b"\x48\x81\x24\x24\xff\xfd\xff\xff"  # and qword [rsp], ~IF
            + b"\x8c\xca\x52"                      # mov edx, cs; push rdx
            + b"\x48\x8d\x05\x03\x00\x00\x00"      # lea rax, [rip+3]
            + b"\x50"                              # push rax
            + b"\x48\xcf"                          # iretq            <- under test
            + PUSHF_POP_RAX)                       # pushfq; pop rax

_RETF_KERNEL = (b"\x6a" + bytes([L.G_KCODE])       # push 0x08
                + b"\x48\x8d\x05\x03\x00\x00\x00"  # lea rax, [rip+3]
                + b"\x50"                          # push rax
                + b"\x48\xcb")                     # retfq            <- under test


SENSITIVE: tuple[Probe, ...] = (
    Probe("sgdt", "sensitive", b"\x0f\x01\x04" + _abs(L.DATA), 0, _table("GDTR"),
          about="sgdt [DATA]: stores GDTR"),
    Probe("sidt", "sensitive", b"\x0f\x01\x0c" + _abs(L.DATA), 0, _table("IDTR"),
          about="sidt [DATA]: stores IDTR"),
    Probe("sldt", "sensitive", b"\x0f\x00\xc0", 0, _sel("LDTR"),
          about="sldt eax: the LDT selector"),
    Probe("str", "sensitive", b"\x0f\x00\xc8", 0, _sel("TR"),
          about="str eax: the task register selector"),
    Probe("smsw", "sensitive", b"\x0f\x01\xe0", 0, _msw,
          about="smsw eax: CR0 bits 15:0"),
    Probe("pushf", "sensitive", PUSHF_POP_RAX, 0, _if,
          about="pushfq; pop rax: IF and IOPL as the code sees them"),
    Probe("popf", "sensitive", _POPF, 17, _if,
          about="popfq of an image with IF=0 IOPL=3, then read RFLAGS back"),
    Probe("lar", "sensitive", _mov_eax(L.G_KCODE) + b"\x31\xd2\x0f\x02\xd0" + PUSHF_POP_RCX,
          7, _zf("ar"), about="lar edx, eax on the kernel code selector 0x08"),
    Probe("lsl", "sensitive", _mov_eax(L.G_KDATA) + b"\x31\xd2\x0f\x03\xd0" + PUSHF_POP_RCX,
          7, _zf("limit"), about="lsl edx, eax on the kernel data selector 0x10"),
    Probe("verr", "sensitive", _mov_eax(L.G_KDATA) + b"\x0f\x00\xe0" + PUSHF_POP_RCX, 5,
          _zf("zf"), about="verr ax on the kernel data selector 0x10"),
    Probe("verw", "sensitive", _mov_eax(L.G_KDATA) + b"\x0f\x00\xe8" + PUSHF_POP_RCX, 5,
          _zf("zf"), about="verw ax on the kernel data selector 0x10"),
    Probe("mov r,cs", "sensitive", b"\x8c\xc8", 0, _sel("CS"),
          about="mov eax, cs (PUSH CS is #UD in 64-bit mode)"),
    Probe("mov r,ss", "sensitive", b"\x8c\xd0", 0, _sel("SS"),
          about="mov eax, ss"),
    Probe("mov ds,r", "sensitive", _mov_eax(L.G_KDATA) + b"\x8e\xd8\x8c\xd8", 5, _sel("DS"),
          about="mov ds, ax with the kernel data selector 0x10 (POP DS is #UD in 64-bit)"),
    Probe("mov ss,r", "sensitive", _mov_eax(L.G_KDATA) + b"\x8e\xd0\x8c\xd0", 5, _sel("SS"),
          about="mov ss, ax with the kernel data selector 0x10"),
    Probe("call far", "sensitive", b"\xff\x1c" + _FAR_PTR, 0, _arrived,
          data=_far_ptr(L.G_KCODE), about="call far [DATA] to 0x08:landing"),
    Probe("jmp far", "sensitive", b"\xff\x2c" + _FAR_PTR, 0, _arrived,
          data=_far_ptr(L.G_KCODE), about="jmp far [DATA] to 0x08:landing"),
    Probe("retf", "sensitive", _RETF_KERNEL, 10, _arrived,
          about="retfq to 0x08:landing (a kernel returning to itself)"),
    Probe("iret", "sensitive", _IRET_KERNEL, 17, _arrived,
          about="iretq to 0x08:landing with SS 0x10"),
    Probe("iret IF=0", "sensitive", _IRET_IF, 27, _if,
          about="iretq to the current CS/SS with IF=0 in the image, read RFLAGS back"),
    Probe("int 0x80", "sensitive", b"\xcd\x80", 0, _int, handler_vector=L.INT_VECTOR,
          about="int 0x80 through the kernel's DPL 0 gate"),
)

PRIVILEGED: tuple[Probe, ...] = (
    Probe("cli", "privileged", b"\xfa" + PUSHF_POP_RAX, 0, _if, about="cli"),
    Probe("sti", "privileged", b"\xfb" + PUSHF_POP_RAX, 0, _if, about="sti"),
    Probe("hlt", "privileged", b"\xf4", 0, _done("completed"), about="hlt"),
    Probe("lgdt", "privileged", b"\x0f\x01\x14" + _abs(L.DATA), 0, _done("GDTR loaded"),
          data=lambda _l: _GUEST_GDTR, about="lgdt [DATA] (the guest's own GDTR)"),
    Probe("lidt", "privileged", b"\x0f\x01\x1c" + _abs(L.DATA), 0, _done("IDTR loaded"),
          data=lambda _l: _GUEST_IDTR, about="lidt [DATA] (the guest's own IDTR)"),
    Probe("lldt", "privileged", _mov_eax(L.G_LDT) + b"\x0f\x00\xd0", 5, _done("LDTR loaded"),
          about="lldt ax with 0x38"),
    Probe("ltr", "privileged", _mov_eax(L.G_TSS) + b"\x0f\x00\xd8", 5, _done("TR loaded"),
          about="ltr ax with 0x28 (an available TSS)"),
    Probe("mov cr0,r", "privileged", b"\x0f\x22\xc0", 0, _done("CR0 written"),
          regs={"rax": L.GUEST_CR0}, about="mov cr0, rax (its current value)"),
    Probe("mov r,cr0", "privileged", b"\x0f\x20\xc0", 0, _reg("CR0", "rax"),
          about="mov rax, cr0"),
    Probe("mov cr3,r", "privileged", b"\x0f\x22\xd8", 0, _done("CR3 written"),
          regs={"rax": L.PAGE_TABLES}, about="mov cr3, rax (its current value)"),
    Probe("mov r,dr7", "privileged", b"\x0f\x21\xf8", 0, _reg("DR7", "rax"),
          about="mov rax, dr7"),
    Probe("lmsw", "privileged", b"\x0f\x01\xf0", 0, _done("MSW written"),
          regs={"rax": L.GUEST_CR0 & 0xFFFF}, about="lmsw ax (its current value)"),
    Probe("clts", "privileged", b"\x0f\x06", 0, _done("CR0.TS cleared"), about="clts"),
    Probe("rdmsr", "privileged", b"\x0f\x32", 0, _edx_eax("EFER"),
          regs={"rcx": 0xC0000080}, about="rdmsr EFER"),
    Probe("wrmsr", "privileged", b"\x0f\x30", 0, _done("KERNEL_GS_BASE written"),
          regs={"rcx": 0xC0000102}, about="wrmsr KERNEL_GS_BASE <- 0"),
    Probe("in", "privileged", b"\xec", 0, _in, regs={"rdx": 0x80},
          about="in al, dx from port 0x80 (IOPL 0, no I/O bitmap)"),
    Probe("out", "privileged", b"\xee", 0, _out, regs={"rdx": 0x80, "rax": 0x5A},
          about="out dx, al to port 0x80 (IOPL 0, no I/O bitmap)"),
    Probe("invlpg", "privileged", b"\x0f\x01\x3c" + _abs(L.DATA), 0, _done("TLB entry flushed"),
          about="invlpg [DATA]"),
    Probe("wbinvd", "privileged", b"\x0f\x09", 0, _done("caches written back"),
          about="wbinvd"),
    Probe("swapgs", "privileged", b"\x0f\x01\xf8", 0, _done("GS base swapped"),
          about="swapgs"),
)

ALL: tuple[Probe, ...] = SENSITIVE + PRIVILEGED


def by_name(name: str) -> Probe:
    for p in ALL:
        if p.name == name:
            return p
    raise KeyError(name)
