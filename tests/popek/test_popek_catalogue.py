"""The probe catalogue and layout, without running anything: the hand-assembled bytes say
what their comments say (decoded with iced-x86), and the tables hold what layout.py draws.
"""

from __future__ import annotations

import struct

import pytest
from iced_x86 import Decoder, Formatter, FormatterSyntax

from pyhv.arch.x86 import gdt
from pyhv.memory import GuestMemory
from pyhv.popek import layout as L
from pyhv.popek.catalogue import ALL, PRIVILEGED, SENSITIVE, by_name
from pyhv.popek.snippet import DONE_TAIL

pytestmark = pytest.mark.timeout(30)

# The mnemonic iced-x86 prints for the instruction under test (at Probe.at).
MNEMONIC = {
    "sgdt": "sgdt", "sidt": "sidt", "sldt": "sldt", "str": "str", "smsw": "smsw",
    "pushf": "pushfq", "popf": "popfq", "lar": "lar", "lsl": "lsl", "verr": "verr",
    "verw": "verw", "mov r,cs": "mov eax,cs", "mov r,ss": "mov eax,ss",
    "mov ds,r": "mov ds,ax", "mov ss,r": "mov ss,ax", "call far": "call far",
    "jmp far": "jmp far", "retf": "data64 ret far", "iret": "iretq", "iret IF=0": "iretq",
    "int 0x80": "int 80h", "cli": "cli", "sti": "sti", "hlt": "hlt", "lgdt": "lgdt",
    "lidt": "lidt", "lldt": "lldt", "ltr": "ltr", "mov cr0,r": "mov cr0,rax",
    "mov r,cr0": "mov rax,cr0", "mov cr3,r": "mov cr3,rax", "mov r,dr7": "mov rax,dr7",
    "lmsw": "lmsw", "clts": "clts", "rdmsr": "rdmsr", "wrmsr": "wrmsr", "in": "in al,dx",
    "out": "out dx,al", "invlpg": "invlpg", "wbinvd": "wbinvd", "swapgs": "swapgs",
}


def _decode(code: bytes) -> dict[int, str]:
    fmt = Formatter(FormatterSyntax.INTEL)
    return {i.ip - L.CODE: fmt.format(i)
            for i in Decoder(64, code, ip=L.CODE)}


def test_every_probe_is_named_once_and_has_a_mnemonic() -> None:
    names = [p.name for p in ALL]
    assert len(names) == len(set(names))
    assert set(names) == set(MNEMONIC)
    assert {p.kind for p in SENSITIVE} == {"sensitive"}
    assert {p.kind for p in PRIVILEGED} == {"privileged"}
    assert by_name("sgdt").name == "sgdt"


@pytest.mark.parametrize("probe", ALL, ids=lambda p: p.name)
def test_the_instruction_under_test_sits_at_probe_at(probe: object) -> None:
    from pyhv.popek.catalogue import Probe
    assert isinstance(probe, Probe)
    insns = _decode(probe.code)
    assert "(bad)" not in " ".join(insns.values())
    assert probe.at in insns, f"no instruction starts at +{probe.at}: {insns}"
    assert insns[probe.at].startswith(MNEMONIC[probe.name]), insns[probe.at]
    assert len(probe.code + DONE_TAIL) < L.CODE_MAX


def test_the_done_tail_and_stubs_store_to_their_mmio_addresses() -> None:
    tail = _decode(DONE_TAIL)
    assert tail[0] == f"mov byte ptr [{L.DONE:X}h],0"
    for v in L.VECTORS:
        stub = _decode(L.stub_code(v))
        assert stub[0] == f"mov byte ptr [{L.EXC + v:X}h],0"
        assert stub[8] == "hlt"
        assert len(L.stub_code(v)) <= L.STUB_SIZE


def test_the_two_gdts_hold_what_the_layout_draws() -> None:
    mem = GuestMemory.with_layout([(0, L.RAM_SIZE)])
    try:
        L.write_tables(mem)

        def desc(table: int, sel: int) -> tuple[int, int, int]:
            seg = gdt.decode(sel, mem.read_u64(table + sel))
            return seg.dpl, seg.s, seg.type

        for table in (L.GUEST_GDT, L.MON_GDT):
            assert desc(table, L.G_KCODE)[:2] == (0, 1)
            assert desc(table, L.G_KDATA)[:2] == (0, 1)
            assert desc(table, L.G_TSS) == (0, 0, 0x9)
            assert desc(table, L.G_LDT) == (0, 0, 0x2)
        assert desc(L.MON_GDT, L.M_UCODE)[0] == 3
        assert desc(L.MON_GDT, L.M_UDATA)[0] == 3
        assert desc(L.MON_GDT, L.M_TSS) == (0, 0, 0x9)
        assert mem.read_u64(L.MON_TSS + 4) == L.KSTACK_TOP
        # no I/O permission bitmap: every port faults at CPL 3 with IOPL 0
        assert mem.read_u16(L.MON_TSS + 0x66) > L.TSS_LIMIT
        # gate 13 of the monitor IDT: interrupt gate, DPL 0, to the monitor's code
        lo, hi = struct.unpack_from("<QQ", mem.read(L.MON_IDT + 13 * 16, 16))
        assert (lo >> 16) & 0xFFFF == L.M_KCODE and (lo >> 40) & 0xFF == 0x8E
        target = (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF0000) | (hi << 32)
        assert target == L.STUBS + 13 * L.STUB_SIZE
    finally:
        mem.close()


def test_the_two_entry_states_differ_where_a_monitor_must() -> None:
    dep = L.deprivileged_state(L.CODE, umip=True)
    ref = L.reference_state(L.CODE)
    assert dep.cpl == 3 and ref.cpl == 0
    assert dep.cs.selector & 3 == 3 and ref.cs.selector & 3 == 0
    assert dep.gdt.base != ref.gdt.base and dep.idt.base != ref.idt.base
    assert dep.tr.selector != ref.tr.selector
    assert dep.cr4 & (1 << 11) and not ref.cr4 & (1 << 11)
    assert dep.rflags & (1 << 9) and not ref.rflags & (1 << 9)
    assert dep.rflags & (3 << 12) == 0
