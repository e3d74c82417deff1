"""The translation cache: where translations live, how they find each other, how they go.

Design: one bounded code area (area.py: `tc_size` bytes after a fixed header), filled
from the bottom by the translator (translate.py); nothing in it is ever freed one block
at a time. The header holds the two shared routines every translation jumps to:

    COMMON   spill the 16 GPRs and RFLAGS into S (RSP pointed into S for the pushfq,
             so the guest's stack is never touched), store to CALLOUT (the MMIO exit
             to pyhv, S.SITE names the site), then reload everything, RFLAGS by popfq
             from S, and `jmp [S.RESUME]`
    MISS     an indirect-branch lookup missed: put back RCX/R10/R11, then COMMON

What pyhv keeps per translation: the `Block` (guest range, guest-physical frames, exits,
the chained jumps coming in), its `Site`s by id, and a `Loc` for every TC address that
may fault or take an interrupt. Guest RIP -> block is a dict here and, for translated
code's own indirect branches, the KEYS/VALS tables in the area (64 Ki entries indexed
by the low 16 bits of the guest RIP; a collision only costs a miss).

Chaining: a block's direct exits first jump to their own exit stubs (call-outs); when
pyhv has the target's translation it patches the rel32 to jump there directly, and
records the jump in the target's `incoming`, so it can be unpatched.

Invalidation (`invalidate_frame`, `invalidate_vpage`): the blocks go out of the dict
and the lookup tables, and every jump chained into them is pointed back at its stub;
their code stays where it is (a vCPU may be inside it) until the next flush.

Flush (`flush`): when fewer than RESERVE bytes are left (or the guest's address space
changed under every translation: MOV CR3), everything goes at once: blocks, sites,
locations, lookup tables; the allocation restarts at the bottom and every block object
is marked invalid, so no stale continuation address can be used.
"""

from __future__ import annotations

from collections import Counter

import iced_x86 as ix

from pyhv.engines.bt import area as A
from pyhv.engines.bt.asm import GPR64, R10, R11, RCX, Emitter, rel32_patch
from pyhv.engines.bt.translate import Block, Fetch, Loc, Site, Translator

RESERVE = 16 << 10        # a block never needs more than this
ALIGN = 16


class TranslationCache:
    def __init__(self, bt: A.BtArea) -> None:
        self.bt = bt
        self.common, self.miss = self._write_header()
        self.translator = Translator(self.common, self.miss, A.BT_GVA + A.KEYS_OFF,
                                     A.BT_GVA + A.VALS_OFF, self._new_site)
        self.blocks: dict[int, Block] = {}
        self.by_frame: dict[int, list[Block]] = {}
        self.by_vpage: dict[int, list[Block]] = {}
        self.sites: list[Site] = []
        self.locs: dict[int, Loc] = {}
        self.all_blocks: list[Block] = []
        self.alloc = bt.tc_start
        self.count: Counter[str] = Counter()
        self.inline: Counter[str] = Counter()
        self.peak = 0
        bt.reset_lookup(self.miss)

    # ------------------------------------------------------------------ header

    def _write_header(self) -> tuple[int, int]:
        e = Emitter(self.bt.header)
        common = e.here
        for r in range(16):
            if r != 4:
                e.store(r, A.S_GPRS + 8 * r)
        e.store(4, A.S_RSP)
        e.ins(ix.Instruction.create_reg_mem(ix.Code.LEA_R64_M, ix.Register.RSP,
                                            ix.MemoryOperand(ix.Register.RIP,
                                                             displ=A.S + A.S_RFLAGS + 8)))
        e.raw(b"\x9c")                                      # pushfq -> S.RFLAGS
        e.ins(ix.Instruction.create_mem_u32(ix.Code.MOV_RM32_IMM32,
                                            ix.MemoryOperand(ix.Register.RIP,
                                                             displ=self.bt.callout_gva), 0))
        e.ins(ix.Instruction.create_reg_mem(ix.Code.LEA_R64_M, ix.Register.RSP,
                                            ix.MemoryOperand(ix.Register.RIP,
                                                             displ=A.S + A.S_RFLAGS)))
        e.raw(b"\x9d")                                      # popfq <- S.RFLAGS
        for r in range(16):
            if r != 4:
                e.load(r, A.S_GPRS + 8 * r)
        e.load(4, A.S_RSP)
        e.jmp_s(A.S_RESUME)
        miss = e.here
        e.load(RCX, A.S_SAVE_RCX)
        e.load(R10, A.S_SAVE_R10)
        e.load(R11, A.S_SAVE_R11)
        e.jmp(common)
        assert len(e.code) < A.TC_OFF - A.HEADER_OFF and GPR64
        self.bt.write_code(self.bt.header, bytes(e.code))
        return common, miss

    # ------------------------------------------------------------------ lookups

    def _new_site(self, s: Site) -> None:
        s.id = len(self.sites)
        self.sites.append(s)

    def site(self, sid: int) -> Site | None:
        """The site `sid` names (S is writable by the guest: any value may come)."""
        return self.sites[sid] if 0 <= sid < len(self.sites) else None

    def loc(self, tc: int) -> Loc | None:
        return self.locs.get(tc)

    def in_tc(self, addr: int) -> bool:
        return self.bt.header <= addr < self.bt.tc_end

    def block_at(self, tc: int) -> Block | None:
        """The block whose code holds TC address `tc` (linear; for rare paths)."""
        for b in reversed(self.all_blocks):
            if b.tc <= tc < b.tc + b.size:
                return b
        return None

    # ------------------------------------------------------------------ translating

    def translate(self, guest: int, fetch: Fetch) -> tuple[Block, bool]:
        """The valid block for `guest`, translated now if needed (True: it is new).
        A GuestFault from `fetch` propagates: the guest's own fault at `guest`."""
        b = self.blocks.get(guest)
        if b is not None:
            return b, False
        if self.bt.tc_end - self.alloc < RESERVE:
            self.flush("full")
        n_sites = len(self.sites)
        try:
            code, b, locs, _ = self.translator.translate(guest, self.alloc, fetch)
        except BaseException:
            del self.sites[n_sites:]
            raise
        self.bt.write_code(self.alloc, code)
        self.alloc = (self.alloc + len(code) + ALIGN - 1) & ~(ALIGN - 1)
        self.peak = max(self.peak, self.alloc - self.bt.tc_start)
        self.blocks[guest] = b
        self.all_blocks.append(b)
        self.locs.update(locs)
        for f in b.frames:
            self.by_frame.setdefault(f, []).append(b)
        for vp in b.vpages:
            self.by_vpage.setdefault(vp, []).append(b)
        self.bt.set_lookup(guest, b.tc)
        self.count["blocks translated"] += 1
        self.count["guest instructions translated"] += len(b.insns)
        self.count["tc bytes written"] += len(code)
        self.inline.update(b.inline)
        for s in b.exits:
            t = self.blocks.get(s.target)
            if t is not None:
                self.chain(s, t)
        return b, True

    def chain(self, s: Site, t: Block) -> None:
        """Patch branch exit `s` to jump straight into `t`."""
        if s.chained is t or s.block is None or not s.block.valid or not t.valid:
            return
        self.bt.write_code(s.patch, rel32_patch(s.patch, t.tc))
        s.chained = t
        t.incoming.append(s)
        self.count["jumps chained"] += 1

    # ------------------------------------------------------------------ invalidation

    def _drop(self, b: Block) -> None:
        if not b.valid:
            return
        b.valid = False
        if self.blocks.get(b.guest) is b:
            del self.blocks[b.guest]
        self.bt.drop_lookup(b.guest, self.miss)
        for s in b.incoming:
            if s.chained is b:
                self.bt.write_code(s.patch, rel32_patch(s.patch, s.stub))
                s.chained = None
        b.incoming.clear()
        self.count["blocks invalidated"] += 1

    def invalidate_frame(self, frame: int) -> list[Block]:
        """Every block translated from guest-physical page `frame` (self-modifying code)."""
        gone = [b for b in self.by_frame.pop(frame, []) if b.valid]
        for b in gone:
            self._drop(b)
        return gone

    def invalidate_vpage(self, vpn: int) -> list[Block]:
        """Every block fetched through guest-virtual page `vpn` (INVLPG)."""
        gone = [b for b in self.by_vpage.pop(vpn, []) if b.valid]
        for b in gone:
            self._drop(b)
        return gone

    def frames(self) -> set[int]:
        return {f for f, bs in self.by_frame.items() if any(b.valid for b in bs)}

    def flush(self, reason: str) -> None:
        for b in self.all_blocks:
            b.valid = False
        self.all_blocks.clear()
        self.blocks.clear()
        self.by_frame.clear()
        self.by_vpage.clear()
        self.sites.clear()
        self.locs.clear()
        self.alloc = self.bt.tc_start
        self.bt.reset_lookup(self.miss)
        self.count[f"flushes ({reason})"] += 1

    def stats(self) -> dict[str, int]:
        out = {f"bt {k}": n for k, n in sorted(self.count.items())}
        out["bt flushes"] = sum(n for k, n in self.count.items() if k.startswith("flushes"))
        out["bt tc bytes in use"] = self.alloc - self.bt.tc_start
        out["bt tc bytes peak"] = self.peak
        out["bt tc size"] = self.bt.tc_size
        for k, n in sorted(self.inline.items()):
            out[f"bt translated {k}"] = n
        return out
