"""The emu engine's fast paths keep guests exact.

- Paging off: pyhv's TLB-fill hook gives pages without code non-executable entries, so
  their stores take unicorn's fast path. Self-modifying code must still be seen: code
  written into a page that held only data, rewritten after data stores on the same page
  (enough of them for QEMU's per-page code bitmap), and rewritten again through a data
  TLB entry filled after the code was fetched (INVLPG in between).
- The guest turning paging on under that hook (modeswitch guest, in test_guests.py) and
  a guest entered with paging on never use it.
- unicorn's per-access exit checks are off with the native hook.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from emuguests import Booted, build_source, missing_tools

# A multiboot guest (entered in flat protected mode, paging off).
SMC32 = r"""
#include "guest.h"
#include "pc.inc"
    .intel_syntax noprefix
    MULTIBOOT_HEADER
    .code32
    .text
    .globl start
start:
    mov edi, offset page + 0x800     /* the page holds only data first */
    mov ecx, 256
    xor eax, eax
    rep stosd
    mov esi, 1
1:  mov byte ptr [page], 0xb8        /* mov eax, imm32 ; ret */
    mov dword ptr [page + 1], esi
    mov byte ptr [page + 5], 0xc3
    mov dword ptr [page + 0x900], esi
    call page
    add al, 'A' - 1
    putc_al
    inc esi
    cmp esi, 20
    jbe 1b
    mov ecx, 50                      /* data stores next to the code, code unchanged; */
2:  invlpg [page]                    /* INVLPG: the next store fills a new data entry */
    mov dword ptr [page + 0x900], ecx
    call page
    loop 2b
    invlpg [page]
    mov dword ptr [page + 0x900], ecx
    mov dword ptr [page + 1], 26     /* then the code changes once more */
    call page
    add al, 'A' - 1
    putc_al
    mov al, 0
    exit_al
    hlt
    .balign 4096
page:
    .space 4096
"""


def build_smc32(tmp: Path) -> Path:
    src = tmp / "smc32.S"
    src.write_text(SMC32)
    return build_source(src, "multiboot", tmp)


def test_self_modifying_code_with_paging_off(emu: Callable[..., Booted],
                                            tmp_path: Path) -> None:
    if missing_tools():
        pytest.skip(f"cannot build the guest: {', '.join(missing_tools())} missing")
    m = emu(build_smc32(tmp_path))
    r = m.run()
    assert r.out == "ABCDEFGHIJKLMNOPQRST" + "Z"
    assert r.exit_code == 0
    vcpu = m.machine.vcpu
    if getattr(vcpu, "tlb", None) is not None:
        assert r.stats["tlb mode switches"] == 1          # to the paging-off fill hook
        assert vcpu.tlb.code_pages_seen >= 2  # type: ignore[union-attr]


def test_paging_on_guest_keeps_unicorns_tlb(emu: Callable[..., Booted],
                                           guest: Callable[[str], Path]) -> None:
    r = emu(guest("long64"), append="0").run()
    assert r.out.split()[0] == "V0/0/0"
    assert r.stats.get("tlb mode switches", 0) == 0
    if r.stats["native block hook"]:
        assert r.stats["per-access exit checks"] == 0
