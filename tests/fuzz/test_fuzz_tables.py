"""Random descriptor tables: GDT/IDT contents loaded by a prologue, then an event.

The guest (in real mode, 32-bit protected mode or long mode, fuzzkit.image) loads a GDT
and an IDT whose entries are random bytes or random but structured descriptors/gates
(random base, limit, type, DPL, present bit, IST, selector; the flat code/data entries
kept in the first slots or not), with random limits and sometimes a base outside guest
RAM, then triggers one event that makes the CPU read them: INT n, INT3, INTO, UD2, a
divide error, a far jump or IRET to a random selector, loading DS/ES/SS/FS/GS, LTR/LLDT,
a page fault (long mode), or a timer interrupt from the 8259/8254 (in real mode the
prologue can also set CR0.PE first, so the event runs with a stale real-mode CS). Gates
may point at a stub that writes the debug-exit port, so deliveries that succeed end with
an odd status; others must become faults, triple faults or internal errors (status 4),
never a crash of pyhv or a read outside guest memory.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from fuzzkit import CLI_HLT, FLAT_GDT, LOAD, Asm, engines, fuzz_settings, image, run_guest
from hypothesis import given
from hypothesis import strategies as st

TIMEOUT = 1.0
BITS = {"real": 16, "pm32": 32, "long64": 64}
SELECTORS = st.sampled_from([0, 3, 8, 0x10, 0x13, 0x18, 0x1B, 0x20, 0x28, 0x2B, 0x38, 0x40]
                            ) | st.integers(0, 0xFFFF)


def _seg(base: int, limit: int, access: int, flags: int) -> bytes:
    return struct.pack("<HHBBBB", limit & 0xFFFF, base & 0xFFFF, (base >> 16) & 0xFF,
                       access & 0xFF, ((limit >> 16) & 0xF) | ((flags & 0xF) << 4),
                       (base >> 24) & 0xFF)


seg_st = st.one_of(
    st.binary(min_size=8, max_size=8),
    st.builds(_seg, st.sampled_from([0, 0x1000, 0xFFFFF000]) | st.integers(0, 0xFFFFFFFF),
              st.sampled_from([0, 0xFFFFF, 0x67]) | st.integers(0, 0xFFFFF),
              st.sampled_from([0x9A, 0x92, 0x89, 0x8B, 0x82, 0xFA, 0xF2, 0x9E, 0x96, 0x00])
              | st.integers(0, 0xFF),
              st.sampled_from([0xC, 0xA, 0x4, 0x0, 0xE]) | st.integers(0, 0xF)),
)


def _gate(bits: int, offset: int, sel: int, typ: int, dpl: int, p: int, ist: int,
          hi: int) -> bytes:
    attr = (p << 7) | (dpl << 5) | typ
    if bits == 64:
        return struct.pack("<HHBBHII", offset & 0xFFFF, sel, ist, attr, (offset >> 16) & 0xFFFF,
                           (offset >> 32) & 0xFFFFFFFF, hi)
    return struct.pack("<HHBBH", offset & 0xFFFF, sel, 0, attr, (offset >> 16) & 0xFFFF)


def gate_st(bits: int, stub: int) -> st.SearchStrategy[bytes]:
    size = 16 if bits == 64 else (4 if bits == 16 else 8)
    raw = st.binary(min_size=size, max_size=size)
    if bits == 16:        # a real-mode IVT entry: offset, segment
        return raw | st.builds(lambda s, o: struct.pack("<HH", o, s),
                               st.sampled_from([0]) | st.integers(0, 0xFFFF),
                               st.sampled_from([stub]) | st.integers(0, 0xFFFF))
    return raw | st.builds(
        lambda *a: _gate(bits, *a),
        st.sampled_from([stub]) | st.integers(0, (1 << (64 if bits == 64 else 32)) - 1),
        SELECTORS,
        st.sampled_from([0xE, 0xF, 0x6, 0x7, 0x5]) | st.integers(0, 0xF),
        st.integers(0, 3), st.sampled_from([1, 1, 0]), st.integers(0, 7),
        st.sampled_from([0]) | st.integers(0, 0xFFFFFFFF))


event_st = st.one_of(
    st.tuples(st.just("int"), st.integers(0, 255)),
    st.tuples(st.just("int"), st.integers(0, 15)),
    st.tuples(st.sampled_from(["int3", "into", "ud2", "div0", "pf", "timer"]), st.just(0)),
    st.tuples(st.sampled_from(["jmpf", "ds", "es", "ss", "fs", "gs", "ltr", "lldt", "iret"]),
              SELECTORS),
)

SEG_REG = {"es": 0xC0, "ss": 0xD0, "ds": 0xD8, "fs": 0xE0, "gs": 0xE8}


def encode_event(a: Asm, kind: str, arg: int, stub: int) -> None:
    bits = a.bits
    if kind == "int":
        a.raw(bytes([0xCD, arg]))
    elif kind == "int3":
        a.raw(b"\xcc")
    elif kind == "into":
        a.raw(b"\xb0\x7f\x04\x01\xce")                  # mov al,0x7f; add al,1 (OF=1); into
    elif kind == "ud2":
        a.raw(b"\x0f\x0b")
    elif kind == "div0":
        a.raw(b"\x31\xc0\xf7\xf0")                      # xor ax,ax; div ax
    elif kind == "pf":
        if bits == 64:
            a.raw(b"\x8b\x04\x25\x00\x00\x00\x40")      # mov eax, [0x40000000] (unmapped)
        else:
            a.raw(b"\x0f\x0b")
    elif kind == "timer":
        for port, value in ((0x20, 0x11), (0x21, 0x20), (0x21, 4), (0x21, 1), (0x21, 0xFE),
                            (0x43, 0x34), (0x40, 0x00), (0x40, 0x01)):
            a.mov_acc(1, value).raw(bytes([0xE6, port]))
        a.raw(b"\xfb\xeb\xfe")                          # sti; jmp $
    elif kind == "jmpf":
        if bits == 64:
            a.mov_reg32(0, arg).raw(b"\x50").mov_reg32(0, stub).raw(b"\x50\x48\xcb")
        elif bits == 32:
            a.raw(b"\xea" + struct.pack("<IH", stub, arg))
        else:
            a.raw(b"\xea" + struct.pack("<HH", stub & 0xFFFF, arg))
    elif kind in SEG_REG:
        a.mov_reg32(0, arg).raw(bytes([0x8E, SEG_REG[kind]]))
    elif kind in ("ltr", "lldt"):
        a.mov_reg32(0, arg).raw(b"\x0f\x00" + (b"\xd8" if kind == "ltr" else b"\xd0"))
    elif kind == "iret":
        frame = [0x2, arg, stub] if bits != 64 else [0x10, 0x7000, 0x2, arg, stub]
        for v in frame:                                  # pushed last to first
            a.raw(b"\x68" + (struct.pack("<H", v & 0xFFFF) if bits == 16
                             else struct.pack("<I", v & 0xFFFFFFFF)))
        a.raw(b"\x48\xcf" if bits == 64 else b"\xcf")
    else:
        raise AssertionError(kind)


def _lxdt(a: Asm, op: int, addr: int) -> None:
    """lgdt (op 2) / lidt (op 3) [addr] with an absolute address."""
    if a.bits == 16:
        a.raw(b"\x0f\x01" + bytes([0x06 | op << 3]) + struct.pack("<H", addr))
    elif a.bits == 32:
        a.raw(b"\x0f\x01" + bytes([0x05 | op << 3]) + struct.pack("<I", addr))
    else:
        a.raw(b"\x0f\x01" + bytes([0x04 | op << 3, 0x25]) + struct.pack("<I", addr))


@st.composite
def table_guest(draw: st.DrawFn, mode: str) -> bytes:
    bits = BITS[mode]
    base = LOAD + len(image(mode, b""))
    # body: jmp over data | stub | GDT | IDT | GDTR | IDTR | code
    gdt_entries = draw(st.lists(seg_st, min_size=1, max_size=10))
    if draw(st.booleans()):
        gdt_entries = [FLAT_GDT[i:i + 8] for i in range(0, len(FLAT_GDT), 8)] + gdt_entries
    gdt = b"".join(gdt_entries)
    stub_off = 5 if bits != 16 else 3       # after the jmp (e9 rel32 / e9 rel16)
    stub = base + stub_off
    stub_code = b"\xb0\x21\xe6\xf4" + CLI_HLT
    n_gates = draw(st.integers(1, 24))
    idt = b"".join(draw(st.lists(gate_st(bits, stub), min_size=n_gates, max_size=n_gates)))
    data = stub_code + gdt + idt
    gdt_at = stub + len(stub_code)
    idt_at = gdt_at + len(gdt)

    def limit(real: int) -> int:
        return draw(st.sampled_from([real - 1, real - 1, 0, 0xFFFF]) | st.integers(0, 0xFFFF))

    def where(real: int) -> int:
        return draw(st.sampled_from([real, real, real, 0, 0xFFFFF000, MEM_TOP])
                    | st.integers(0, 0xFFFFFFFF))

    fmt = "<HQ" if bits == 64 else "<HI"
    gdtr = struct.pack(fmt, limit(len(gdt)), where(gdt_at))
    idtr = struct.pack(fmt, limit(len(idt)), where(idt_at))
    gdtr_at = stub + len(data)
    idtr_at = gdtr_at + len(gdtr)
    data += gdtr + idtr
    a = Asm(bits)
    a.raw(b"\xe9" + (struct.pack("<h", len(data)) if bits == 16 else struct.pack("<i", len(data))))
    a.raw(data)
    if draw(st.booleans()):
        _lxdt(a, 2, gdtr_at)
    _lxdt(a, 3, idtr_at)
    if mode == "real" and draw(st.booleans()):
        a.raw(b"\x0f\x20\xc0\x0c\x01\x0f\x22\xc0")    # cr0 |= PE, CS still real-mode
    kind, arg = draw(event_st)
    encode_event(a, kind, arg, stub)
    a.raw(CLI_HLT)
    return image(mode, a.bytes())


MEM_TOP = 4 << 20


@pytest.mark.parametrize("mode", ["real", "pm32", "long64"])
@pytest.mark.parametrize("engine", engines())
def test_random_tables(engine: str, mode: str, fuzz_dir: Path) -> None:
    @fuzz_settings(8)  # type: ignore[misc]
    @given(code=table_guest(mode))
    def inner(code: bytes) -> None:
        run_guest(fuzz_dir, code, engine, timeout=TIMEOUT)
    inner()


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("mode", ["real", "pm32", "long64"])
@pytest.mark.parametrize("engine", engines())
def test_random_tables_slow(engine: str, mode: str, fuzz_dir: Path) -> None:
    @fuzz_settings(150)  # type: ignore[misc]
    @given(code=table_guest(mode))
    def inner(code: bytes) -> None:
        run_guest(fuzz_dir, code, engine, timeout=TIMEOUT)
    inner()
