"""`--trace-bt`: each guest block next to its translation, as it is translated.

Design: a teaching view, written when a block is translated (never on the hot path of
running translations). Each line of the translation is printed; where a guest
instruction starts, the guest instruction is shown on the left, so the reader sees
which guest instruction became which code: copied bytes, an absolute operand for a
RIP-relative one, an inline rewrite onto the S page (`[S.VIF]`...), a call-out
(`mov dword [S.SITE], n; jmp COMMON`), an exit stub.
"""

from __future__ import annotations

from typing import TextIO

import iced_x86 as ix

from pyhv.engines.bt import area as A
from pyhv.engines.bt.cache import TranslationCache
from pyhv.engines.bt.translate import Block

S_NAMES = {A.S_RSP: "S.RSP", A.S_RFLAGS: "S.RFLAGS", A.S_RESUME: "S.RESUME",
           A.S_SITE: "S.SITE", A.S_JUMP: "S.JUMP", A.S_TARGET: "S.TARGET",
           A.S_VIF: "S.VIF", A.S_VIOPL: "S.VIOPL", A.S_VCS: "S.VCS", A.S_VSS: "S.VSS",
           A.S_VTR: "S.VTR", A.S_VLDTR: "S.VLDTR", A.S_VCR0: "S.VCR0",
           A.S_VGDTR: "S.VGDTR", A.S_VGDTR + 8: "S.VGDTR+8", A.S_VIDTR: "S.VIDTR",
           A.S_VIDTR + 8: "S.VIDTR+8", A.S_SAVE_RCX: "S.SAVE_RCX",
           A.S_SAVE_R10: "S.SAVE_R10", A.S_SAVE_R11: "S.SAVE_R11",
           A.S_SCRATCH: "S.SCRATCH", A.S_GATE: "S.GATE",
           **{A.S_IRET + 8 * k: f"S.IRET+{8 * k}" for k in range(5)},
           **{A.S_VIDTR + 2: "S.VIDTR+2"}}


def _fmt() -> ix.Formatter:
    f = ix.Formatter(ix.FormatterSyntax.INTEL)
    f.first_operand_char_index = 8
    return f


def _annotate(text: str, i: ix.Instruction, tc: TranslationCache) -> str:
    if i.is_ip_rel_memory_operand:
        addr = i.ip_rel_memory_address
        if addr == A.S + A.S_SITE and i.op1_kind == ix.OpKind.IMMEDIATE32:
            site = tc.site(i.immediate32)
            what = site.kind if site is not None else "?"
            if site is not None and site.kind == "branch":
                what = f"exit to guest {site.target:#x}"
            elif site is not None and site.kind in ("emulate", "lar"):
                what = f"call-out: {site.kind}"
            return f"{text}    ; S.SITE ({what})"
        if A.S <= addr < A.S + 0x1000:
            return f"{text}    ; {S_NAMES.get(addr - A.S, f'S+{addr - A.S:#x}')}"
        if addr == tc.bt.callout_gva:
            return f"{text}    ; CALLOUT (exit to pyhv)"
    if i.flow_control != ix.FlowControl.NEXT and i.near_branch_target:
        t = i.near_branch_target
        if t == tc.common:
            return f"{text}    ; COMMON"
        if t == tc.miss:
            return f"{text}    ; MISS"
    return text


def trace_block(out: TextIO, b: Block, bt: A.BtArea, tc: TranslationCache) -> None:
    fmt = _fmt()
    guest = {rip: raw for rip, raw in b.insns}
    shown: set[int] = set()
    print(f"bt: block {b.guest:#x} ({len(b.insns)} guest instructions) -> "
          f"{b.tc:#x} ({b.size} bytes)", file=out)
    code = bt.read_code(b.tc, b.size)
    for i in ix.Decoder(64, code, ip=b.tc):
        left = ""
        loc = tc.loc(i.ip)
        if loc is not None and loc.guest not in shown and loc.guest in guest:
            shown.add(loc.guest)
            g = ix.Decoder(64, guest[loc.guest], ip=loc.guest).decode()
            left = f"{loc.guest:#014x}  {fmt.format(g)}"
        right = _annotate(f"{i.ip:#x}  {fmt.format(i)}", i, tc)
        print(f"  {left:<52} | {right}", file=out)
    out.flush()
