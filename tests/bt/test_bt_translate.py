"""The translator and the translation cache without /dev/kvm: guest bytes in, the
translation decoded back with iced-x86 and checked instruction by instruction."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import iced_x86 as ix
import pytest

from pyhv.engines.bt import area as A
from pyhv.engines.bt.cache import TranslationCache
from pyhv.engines.bt.translate import ADD, RESTORE, Site, Translator
from pyhv.engines.trap.guestmem import GuestFault

AT = A.BT_GVA + A.TC_OFF
COMMON, MISS = A.BT_GVA + A.HEADER_OFF, A.BT_GVA + A.HEADER_OFF + 0x100
KEYS, VALS = A.BT_GVA + A.KEYS_OFF, A.BT_GVA + A.VALS_OFF


class Pages:
    """Guest code: {page number: 4 KiB}; anything else faults like a missing page."""

    def __init__(self, base: int, code: bytes) -> None:
        self.pages: dict[int, bytearray] = {}
        for off in range(0, len(code)):
            page = self.pages.setdefault((base + off) >> 12, bytearray(b"\x90" * 0x1000))
            page[(base + off) & 0xFFF] = code[off]

    def __call__(self, va: int) -> tuple[bytes, int]:
        page = self.pages.get(va >> 12)
        if page is None:
            raise GuestFault(14, 0x10, cr2=va)
        return bytes(page[va & 0xFFF:]), (va >> 12) << 12


def translate(code: bytes, base: int = 0x100000, fetch: Pages | None = None):
    sites: list[Site] = []

    def new(s: Site) -> None:
        s.id = len(sites)
        sites.append(s)
    t = Translator(COMMON, MISS, KEYS, VALS, new)
    out, b, locs, _ = t.translate(base, AT, fetch or Pages(base, code))
    return out, b, locs, sites


def insns(code: bytes) -> Iterator[ix.Instruction]:
    return iter(ix.Decoder(64, code, ip=AT))


def text(code: bytes) -> list[str]:
    f = ix.Formatter(ix.FormatterSyntax.INTEL)
    return [f.format(i) for i in insns(code)]


def test_innocuous_instructions_are_copied_and_ret_is_a_lookup() -> None:
    guest = bytes.fromhex("4801d8" "48c1e005" "c3")         # add rax,rbx; shl rax,5; ret
    out, b, locs, sites = translate(guest)
    assert out[:7] == guest[:7]                            # copied byte for byte
    assert [s.kind for s in sites] == ["lookup"]
    t = text(out)
    assert "pop r11" in t
    assert any(x.startswith("jrcxz") for x in t)          # the flag-free compare
    assert any(x == "not r11" for x in t)
    assert locs[AT].guest == 0x100000 and locs[AT].boundary
    assert locs[AT + 3].guest == 0x100003
    assert b.insns == [(0x100000, guest[:3]), (0x100003, guest[3:7]), (0x100007, guest[7:])]


def test_rip_relative_operands_become_absolute() -> None:
    guest = bytes.fromhex("488b0500010000" "488d3d00020000" "ff0500030000" "f4")
    out, _, _, _ = translate(guest)
    i = list(insns(out))
    assert i[0].mnemonic == ix.Mnemonic.MOV and not i[0].is_ip_rel_memory_operand
    assert i[0].memory_displacement == 0x100007 + 0x100       # the same address
    assert str(i[1]) == "mov edi,10020Eh"                     # LEA rip -> MOV imm
    assert i[2].mnemonic == ix.Mnemonic.INC and i[2].memory_displacement == 0x100014 + 0x300


def test_far_rip_relative_uses_a_scratch_register_with_a_fixup() -> None:
    base = 0x4000_0000_0000
    out, _, locs, _ = translate(bytes.fromhex("4c8b1d00100000" "f4"), base=base)  # mov r11,[rip+..]
    t = text(out)
    assert t[0].startswith("mov ") and "r10" in t[0]          # r11 is used: r10 scratch
    assert t[1] == f"mov r10,{base + 7 + 0x1000:X}h"
    faulting = [a for a, loc in locs.items() if loc.fixups]
    assert len(faulting) == 1
    assert locs[faulting[0]].guest == base
    assert locs[faulting[0]].fixups == ((10, RESTORE, A.S_SCRATCH),)


def test_call_pushes_the_guest_return_address_and_exits_to_a_stub() -> None:
    out, b, _, sites = translate(bytes.fromhex("e8fb0f0000"))  # call 0x101000
    i = list(insns(out))
    assert i[0].code == ix.Code.PUSHQ_IMM32 and i[0].immediate32 == 0x100005
    assert i[1].mnemonic == ix.Mnemonic.JMP
    (s,) = sites
    assert (s.kind, s.target) == ("branch", 0x101000)
    assert i[1].near_branch_target == s.stub                   # unchained: to its stub
    assert b.exits == [s]


def test_cli_sti_inline_and_no_interrupt_right_after_sti() -> None:
    out, _, locs, sites = translate(bytes.fromhex("fa" "fb" "90" "f4"))
    t = text(out)
    assert t[0] == f"mov qword ptr [{A.S + A.S_VIF:X}h],0"
    assert t[1] == f"mov qword ptr [{A.S + A.S_VIF:X}h],200h"
    starts = {loc.guest: loc for loc in locs.values()}
    assert starts[0x100000].boundary and starts[0x100001].boundary
    assert not starts[0x100002].boundary                      # STI's shadow
    assert sites[0].kind == "emulate" and sites[0].insn == b"\xf4"   # HLT calls out


def test_port_io_calls_out_and_the_block_goes_on() -> None:
    out, _, _, sites = translate(bytes.fromhex("ee" "4801c0" "c3"))   # out dx,al; add; ret
    emulate, lookup = sites
    assert emulate.kind == "emulate" and emulate.insn == b"\xee"
    assert emulate.cont > AT and lookup.kind == "lookup"
    assert out[emulate.cont - AT:emulate.cont - AT + 3] == bytes.fromhex("4801c0")


def test_undecodable_byte_ends_the_block_with_a_ud_callout() -> None:
    _, b, _, sites = translate(bytes.fromhex("90" "06" "90"))
    assert [(s.kind, s.vector) for s in sites] == [("emulate", 6)]
    assert len(b.insns) == 2


def test_pushfq_second_push_undoes_the_first_on_a_fault() -> None:
    _, _, locs, _ = translate(bytes.fromhex("9c" "f4"))
    fix = [loc.fixups for a, loc in sorted(locs.items()) if loc.fixups]
    assert fix == [((4, ADD, 8),)]


def test_block_ends_at_the_page_end() -> None:
    base = 0x100FFE
    out, b, _, sites = translate(bytes.fromhex("9090") + bytes.fromhex("90"), base=base)
    assert len(b.insns) == 2 and [s.target for s in sites] == [0x101000]


def test_instruction_straddling_pages() -> None:
    code = bytes.fromhex("90" "48b8" + "11" * 8)           # nop; movabs across the page
    base = 0x100FFD
    _, b, _, sites = translate(code, base=base)
    assert len(b.insns) == 1 and sites[0].target == 0x100FFE     # not first: own block
    _, b2, _, _ = translate(code[1:], base=0x100FFE)
    assert b2.frames == [0x100000, 0x101000] and len(b2.insns) >= 1


def test_fetch_fault_of_the_first_instruction_is_the_guests() -> None:
    with pytest.raises(GuestFault) as f:
        translate(b"", base=0x200000, fetch=Pages(0x100000, b"\x90"))
    assert f.value.cr2 == 0x200000


def test_cache_chains_invalidates_and_flushes() -> None:
    bt = A.BtArea(A.MIN_TC)
    try:
        tc = TranslationCache(bt)
        # block 0 jumps to block 1 (0x100010), which halts
        code = bytes.fromhex("eb0e") + b"\x90" * 14 + bytes.fromhex("f4")
        fetch = Pages(0x100000, code)
        b0, new = tc.translate(0x100000, fetch)
        b1, _ = tc.translate(0x100010, fetch)
        assert new and b0.exits[0].chained is None
        tc.chain(b0.exits[0], b1)
        rel_at = b0.exits[0].patch
        assert struct.unpack("<i", bt.read_code(rel_at, 4))[0] == b1.tc - (rel_at + 4)
        assert struct.unpack_from("<Q", bt.view, A.KEYS_OFF + 8 * 0x0010)[0] == 0x100010
        assert tc.invalidate_frame(0x100000) == [b0, b1]
        assert struct.unpack("<i", bt.read_code(rel_at, 4))[0] == b0.exits[0].stub - (rel_at + 4)
        assert struct.unpack_from("<Q", bt.view, A.KEYS_OFF + 8 * 0x0010)[0] == A.SENTINEL
        # fill the 64 KiB cache with one-jump blocks until it flushes
        many = b"".join(bytes.fromhex("eb00") for _ in range(3000))
        fetch = Pages(0x200000, many)
        for n in range(3000):
            tc.translate(0x200000 + 2 * n, fetch)
        assert tc.count["flushes (full)"] >= 1
        assert tc.alloc - bt.tc_start <= bt.tc_size
        assert not b0.valid and all(b.valid for b in tc.blocks.values())
    finally:
        bt.close()


def test_ret_imm16_pops_its_bytes() -> None:
    out, _, _, sites = translate(bytes.fromhex("c21000"))      # ret 16
    t = text(out)
    assert "pop r11" in t and "lea rsp,[rsp+10h]" in t
    assert sites[0].kind == "lookup" and sites[0].undo_rsp == -24


def test_iretq_and_int_n_are_inline_with_an_emulator_slow_path() -> None:
    out, _, locs, sites = translate(bytes.fromhex("48cf"))      # iretq
    assert [s.kind for s in sites] == ["emulate", "lookup"]      # slow path, then lookup
    t = text(out)
    assert any(x == "popfq" for x in t)                         # flags from the frame
    assert sum(1 for loc in locs.values() if loc.fixups) == 6    # 5 frame loads + pushfq
    out, _, locs, sites = translate(bytes.fromhex("cd80"))      # int 0x80
    assert [s.kind for s in sites] == ["emulate", "lookup"]
    t = text(out)
    assert "mov rcx,[r11+800h]" in t and "mov r10,[r11+808h]" in t   # the gate
    assert any(x.startswith("mov rcx,10000") and x.endswith("2h") for x in t)  # return RIP
    flag_fix = [loc for loc in locs.values() if any(f[1] == 2 for f in loc.fixups)]
    assert len(flag_fix) == 7                                   # gate reads + 5 frame stores
