"""The translator: one guest basic block in, its translation out.

Design: guest kernel code is decoded with iced-x86 from the guest's own address space
(through its page tables: an instruction fetch, so NX and not-present pages fault as
they would for the CPU) one basic block at a time, and assembled at its final address
in the translation cache (asm.Emitter). Each guest instruction becomes one of:

    copied       innocuous instructions, byte for byte; a RIP-relative operand is made
                 absolute (asm.absolute), LEA of a RIP-relative address becomes MOV imm
    inline       sensitive instructions rewritten to work on the virtual CPU in S
                 (area.py) without leaving the guest:
                   CLI / STI          mov qword [S.VIF], 0 / 0x200
                   PUSHFQ             pushfq, then IF and IOPL replaced by the virtual ones
                   POPFQ              VIF/VIOPL from the popped value, popfq for the rest
                   MOV r/m, CS|SS     the virtual selector (RPL 0) from S
                   SGDT/SIDT          the virtual GDTR/IDTR image from S
                   SLDT/STR/SMSW      the virtual LDTR/TR selectors, CR0 from S
                   IRETQ              to the same CS/SS: the frame popped onto the
                                      virtual IF/IOPL, RFLAGS, RSP, then a lookup
                   INT n              through the guest's IDT gate: the CPL 0 frame,
                                      the virtual IF cleared, then a lookup
                 (IRETQ and INT n fall back to a call-out for anything unusual)
    call-out     `mov dword [S.SITE], id; jmp COMMON`: COMMON spills the registers into
                 S and stores to the CALLOUT page (an MMIO exit to pyhv), which handles
                 site `id` and says where to go on in S.RESUME. A call-out that directly
                 follows another in the block is its `then`: pyhv takes it in the same
                 stop when the first falls through (one exit for both). Privileged instructions
                 (port I/O, CR/DR/MSR access, LGDT..., HLT, INVLPG), LAR/LSL/VERR/VERW,
                 RETF, IRETD, INT3, SYSCALL, UD2 and undecodable bytes. A call-out whose
                 instruction falls through lets the block go on after it.
    branches     direct JMP/Jcc/LOOP/JRCXZ/CALL end the block with rel32 jumps to exit
                 stubs (call-outs naming the guest target); pyhv translates the target
                 and patches the jump to it (chaining). CALL pushes the *guest* return
                 address. Indirect JMP/CALL and RET look the guest target up in the
                 KEYS/VALS tables inline (`_lookup`, no flags touched) and jump to the
                 translation on a hit; a miss is a call-out (MISS).

Precise state (`Loc`): every TC instruction that can fault, and every place an
interrupt may be taken, maps back to the guest instruction it belongs to, with the
fix-ups that restore the guest's registers (a scratch register from S, an RSP
adjustment). So a fault inside a translation is reported at the guest RIP of the
instruction that faulted, with the guest's registers, and an interrupt is taken only at
the start of a guest instruction (never right after an inline STI: its shadow).

Blocks end at a control transfer, before an instruction that would straddle into the
next page (unless it is the block's first: then it is fetched across), at the end of
the page and after MAX_INSNS instructions. Nothing here touches KVM; the cache
(cache.py) places the code and keeps the maps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import iced_x86 as ix

from pyhv.engines.bt import area as A
from pyhv.engines.bt.asm import (
    GPR64,
    R10,
    R11,
    RCX,
    Emitter,
    absolute,
    fits32,
    mem_operand,
    needs_scratch,
    pick_scratch,
    reg16,
    reg32,
    regs_used,
    s_mem,
)
from pyhv.engines.trap.guestmem import GuestFault

M = ix.Mnemonic
R = ix.Register
C = ix.Code
GP, UD = 13, 6
MAX_INSNS = 48
RESTORE, ADD, FLAGS = 0, 1, 2
RFLAGS_IF_IOPL = 0x3200

# Privileged instructions that fall through: call out, then the block goes on.
PRIV_NEXT = frozenset((
    M.HLT, M.IN, M.OUT, M.INSB, M.INSW, M.INSD, M.OUTSB, M.OUTSW, M.OUTSD, M.LGDT, M.LIDT,
    M.LLDT, M.LTR, M.LMSW, M.CLTS, M.INVLPG, M.INVPCID, M.WBINVD, M.INVD, M.RDMSR, M.WRMSR,
    M.SWAPGS, M.MONITOR, M.MWAIT, M.XSETBV, M.RDPMC, M.LSS, M.LFS, M.LGS))
# Control transfers pyhv carries out itself (the emulator): the block ends.
PRIV_END = frozenset((M.IRET, M.IRETD, M.IRETQ, M.RETF, M.INT, M.INT3, M.INTO, M.INT1,
                      M.SYSCALL, M.SYSENTER, M.SYSRET, M.SYSRETQ, M.SYSEXIT, M.SYSEXITQ))
UD_END = frozenset((M.UD0, M.UD1, M.UD2))
LAR_FAMILY = frozenset((M.LAR, M.LSL, M.VERR, M.VERW))


@dataclass
class Loc:
    """Where a TC address stands in the guest's program."""

    guest: int                                    # guest RIP of its instruction
    fixups: tuple[tuple[int, int, int], ...] = ()  # (gpr, RESTORE, S off) | (gpr, ADD,
    #                                                delta) | (0, FLAGS, S off of RFLAGS)
    boundary: bool = False                        # an interrupt may be taken here


@dataclass(eq=False)
class Site:
    """One call-out site (or branch exit) in the TC, as pyhv knows it."""

    id: int
    kind: str               # "emulate", "lar", "branch", "lookup"
    guest: int              # guest RIP of the instruction
    next: int               # guest RIP after it
    insn: bytes = b""       # its bytes (emulate, lar)
    vector: int = GP        # emulate: the fault a CPU at CPL 3 would have raised
    cont: int = 0           # TC address where the block goes on after the call-out
    target: int = 0         # branch: the guest target
    patch: int = 0          # branch: TC address of the rel32 to chain
    stub: int = 0           # branch: the exit stub (the unchained target)
    undo_rsp: int = 0       # lookup: RSP change to undo when the target is bad
    block: Block | None = None
    chained: Block | None = None
    then: Site | None = None  # the call-out that starts right at `cont` (adjacent ones)


@dataclass(eq=False)
class Block:
    """One translated guest basic block."""

    guest: int
    tc: int
    size: int = 0
    frames: list[int] = field(default_factory=list)     # guest-physical code pages
    vpages: list[int] = field(default_factory=list)     # guest-virtual page numbers
    insns: list[tuple[int, bytes]] = field(default_factory=list)
    exits: list[Site] = field(default_factory=list)
    incoming: list[Site] = field(default_factory=list)
    inline: dict[str, int] = field(default_factory=dict)   # rewritten kinds, for stats
    valid: bool = True


Fetch = Callable[[int], tuple[bytes, int]]
"""fetch(va) -> (guest bytes from va to the end of its page, guest-physical frame);
raises GuestFault as an instruction fetch would."""


class Translator:
    """Translates blocks; `new_site` registers a site and gives it its id."""

    def __init__(self, common: int, miss: int, keys: int, vals: int,
                 new_site: Callable[[Site], None]) -> None:
        self.common, self.miss, self.keys, self.vals = common, miss, keys, vals
        self.new_site = new_site
        self._goes_on: Site | None = None     # the last call-out, if the block went on

    # ------------------------------------------------------------------ blocks

    def translate(self, guest: int, at: int, fetch: Fetch
                  ) -> tuple[bytes, Block, dict[int, Loc], list[Site]]:
        e = Emitter(at)
        b = Block(guest, at)
        self._goes_on = None
        locs: dict[int, Loc] = {}
        sites: list[Site] = []
        pending: list[Site] = []
        data, frame = fetch(guest)             # a fault here is the guest's, at `guest`
        b.frames.append(frame)
        b.vpages.append(guest >> 12)
        page_end = (guest | 0xFFF) + 1
        pos, shadow = guest, False
        while True:
            chunk = data[pos - guest:pos - guest + 15]
            more = b""
            if len(chunk) < 15:
                try:
                    more, frame2 = fetch(page_end)
                except GuestFault:
                    more, frame2 = b"", -1
            dec = ix.Decoder(64, chunk + more[:15 - len(chunk)], ip=pos)
            i = dec.decode()
            straddles = i.next_ip > page_end or (
                i.code == C.INVALID and dec.last_error == ix.DecoderError.NO_MORE_BYTES)
            if straddles and pos != guest:
                self._exit(e, b, sites, pending, pos, pos, None)   # its own block later
                break
            if straddles and not more and dec.last_error == ix.DecoderError.NO_MORE_BYTES:
                fetch(page_end)                # re-raise the fetch fault: the guest's
            if straddles and more:
                b.frames.append(frame2)
                b.vpages.append(page_end >> 12)
            raw = bytes((chunk + more)[:i.len]) if i.code != C.INVALID else bytes(chunk[:1])
            b.insns.append((pos, raw))
            ends = self._one(e, b, i, raw, locs, sites, pending, boundary=not shadow)
            shadow = i.mnemonic == M.STI
            pos = i.next_ip if i.code != C.INVALID else pos + 1
            if ends:
                break
            if pos >= page_end or len(b.insns) >= MAX_INSNS:
                self._exit(e, b, sites, pending, pos, pos, None)
                break
        for s in pending:                      # exit stubs after the body
            s.stub = e.here
            e.callout(s.id, self.common)
            off = s.patch - at
            e.code[off:off + 4] = (s.stub - (s.patch + 4)).to_bytes(4, "little", signed=True)
        b.size = len(e.code)
        return bytes(e.code), b, locs, sites

    def _site(self, sites: list[Site], b: Block, **kw: object) -> Site:
        s = Site(id=-1, block=b, **kw)         # type: ignore[arg-type]
        self.new_site(s)
        sites.append(s)
        return s

    def _exit(self, e: Emitter, b: Block, sites: list[Site], pending: list[Site],
              guest: int, target: int, cc: int | None) -> None:
        """jmp/jcc rel32 to an exit stub for guest `target` (chained later)."""
        s = self._site(sites, b, kind="branch", guest=guest, next=target, target=target)
        s.patch = e.jcc(cc, None) if cc is not None else e.jmp(None)
        b.exits.append(s)
        pending.append(s)

    # ------------------------------------------------------------------ one instruction

    def _one(self, e: Emitter, b: Block, i: ix.Instruction, raw: bytes,
             locs: dict[int, Loc], sites: list[Site], pending: list[Site], *,
             boundary: bool) -> bool:
        """Translate `i`; True when it ends the block."""
        g = i.ip
        start = e.here
        locs[start] = Loc(g, boundary=boundary)
        mn, fc = i.mnemonic, i.flow_control
        if i.code == C.INVALID or mn in UD_END:
            self._callout(e, b, sites, i, raw, "emulate", UD)
            return True
        if i.code == C.IRETQ:
            self._iretq(e, b, i, raw, locs, sites)
            return True
        if mn == M.INT and i.op0_kind == ix.OpKind.IMMEDIATE8:
            self._int_n(e, b, i, raw, locs, sites)
            return True
        if mn in PRIV_END or (fc in (ix.FlowControl.UNCONDITIONAL_BRANCH, ix.FlowControl.CALL,
                                     ix.FlowControl.INDIRECT_BRANCH,
                                     ix.FlowControl.INDIRECT_CALL)
                              and _far(i)):
            self._callout(e, b, sites, i, raw, "emulate", GP)
            return True
        if fc == ix.FlowControl.NEXT:
            if mn in PRIV_NEXT or _cr_dr(i) or (mn == M.MOV and i.op0_register == R.SS):
                self._callout(e, b, sites, i, raw, "emulate", GP, goes_on=True)
                return False
            if mn in LAR_FAMILY:
                self._callout(e, b, sites, i, raw, "lar", GP, goes_on=True)
                return False
            if self._inline(e, b, i, locs):
                return False
            self._copy(e, i, raw, locs, boundary)
            return False
        if fc == ix.FlowControl.UNCONDITIONAL_BRANCH:
            self._exit(e, b, sites, pending, g, i.near_branch_target, None)
            return True
        if fc == ix.FlowControl.CONDITIONAL_BRANCH:
            self._conditional(e, b, i, raw, sites, pending)
            return True
        if fc == ix.FlowControl.CALL:
            self._push_return(e, i, locs)
            self._exit(e, b, sites, pending, g, i.near_branch_target, None)
            return True
        if fc in (ix.FlowControl.INDIRECT_BRANCH, ix.FlowControl.INDIRECT_CALL,
                  ix.FlowControl.RETURN):
            self._lookup(e, b, i, locs, sites)
            return True
        # XBEGIN/XABORT/XEND and anything else unusual: let pyhv's emulator decide
        self._callout(e, b, sites, i, raw, "emulate", UD)
        return True

    def _callout(self, e: Emitter, b: Block, sites: list[Site], i: ix.Instruction,
                 raw: bytes, kind: str, vector: int, *, goes_on: bool = False) -> None:
        """A call-out for `i`; `goes_on`: the block continues after it (S.RESUME may
        then point right after the call-out when the guest falls through)."""
        s = self._site(sites, b, kind=kind, guest=i.ip, next=i.next_ip, insn=raw,
                       vector=vector)
        prev = self._goes_on
        if prev is not None and prev.cont == e.here:
            prev.then = s                     # nothing runs between the two call-outs
        e.callout(s.id, self.common)
        s.cont = e.here if goes_on else 0
        self._goes_on = s if goes_on else None
        b.inline[f"call-out {_name(i)}"] = b.inline.get(f"call-out {_name(i)}", 0) + 1

    # ------------------------------------------------------------------ copies

    def _copy(self, e: Emitter, i: ix.Instruction, raw: bytes, locs: dict[int, Loc],
              boundary: bool) -> None:
        g = i.ip
        if not i.is_ip_rel_memory_operand:
            e.raw(raw)
            return
        target = i.ip_rel_memory_address
        if i.mnemonic == M.LEA:
            reg = i.op0_register
            size = ix.RegisterInfo(reg).size
            idx = ix.RegisterInfo(reg).full_register - R.RAX
            if size == 8 and not target >> 32 or size == 4:
                e.ins(ix.Instruction.create_reg_u32(C.MOV_R32_IMM32, reg32(idx),
                                                    target & 0xFFFF_FFFF))
            elif size == 8:
                e.movabs(idx, target)
            else:
                e.ins(ix.Instruction.create_reg_u32(C.MOV_R16_IMM16, reg16(idx),
                                                    target & 0xFFFF))
            return
        if not needs_scratch(target):
            e.ins(absolute(i, None))
            return
        r = pick_scratch(regs_used(i))
        e.store(r, A.S_SCRATCH)
        e.movabs(r, target)
        at = e.ins(absolute(i, r))
        locs[at] = Loc(g, ((r, RESTORE, A.S_SCRATCH),))
        e.load(r, A.S_SCRATCH)

    # ------------------------------------------------------------------ branches

    def _conditional(self, e: Emitter, b: Block, i: ix.Instruction, raw: bytes,
                     sites: list[Site], pending: list[Site]) -> None:
        g, taken, fall = i.ip, i.near_branch_target, i.next_ip
        op = _opcode(raw)
        if 0x70 <= op[0] <= 0x7F or (op[0] == 0x0F and len(op) > 1 and 0x80 <= op[1] <= 0x8F):
            cc = (op[0] if op[0] != 0x0F else op[1]) & 0xF
            self._exit(e, b, sites, pending, g, taken, cc)
            self._exit(e, b, sites, pending, g, fall, None)
            return
        # LOOP/LOOPE/LOOPNE/JRCXZ/JECXZ: rel8 only; the prefixes (0x67: ECX) are kept
        e.raw(raw[:-1] + b"\x05")              # taken: over the next jmp rel32
        self._exit(e, b, sites, pending, g, fall, None)
        self._exit(e, b, sites, pending, g, taken, None)

    def _push_return(self, e: Emitter, i: ix.Instruction, locs: dict[int, Loc]) -> None:
        ret = i.next_ip
        if fits32(ret):
            e.ins(ix.Instruction.create_i32(C.PUSHQ_IMM32, _s32(ret)))
            return
        e.store(R11, A.S_SCRATCH)
        e.movabs(R11, ret)
        at = e.ins(ix.Instruction.create_reg(C.PUSH_R64, R.R11))
        locs[at] = Loc(i.ip, ((R11, RESTORE, A.S_SCRATCH),))
        e.load(R11, A.S_SCRATCH)

    def _lookup(self, e: Emitter, b: Block, i: ix.Instruction, locs: dict[int, Loc],
                sites: list[Site]) -> None:
        """Indirect JMP/CALL, RET: the target into R11, then the flag-free lookup:

            key = KEYS[target & 0xffff]; rcx = key - target (LEA, NOT: no flags)
            jrcxz hit -> jmp [VALS[...]] ; else MISS (a call-out with S.TARGET)
        """
        g = i.ip
        s = self._site(sites, b, kind="lookup", guest=g, next=i.next_ip)
        e.store_imm32(A.S_SITE, s.id)
        e.store(RCX, A.S_SAVE_RCX)
        e.store(R10, A.S_SAVE_R10)
        e.store(R11, A.S_SAVE_R11)
        fix_r11 = (R11, RESTORE, A.S_SAVE_R11)
        fix_rcx = (RCX, RESTORE, A.S_SAVE_RCX)
        if i.flow_control == ix.FlowControl.RETURN:
            at = e.ins(ix.Instruction.create_reg(C.POP_R64, R.R11))
            locs[at] = Loc(g)
            extra = i.immediate16 if i.op_count and i.op0_kind == ix.OpKind.IMMEDIATE16 else 0
            if extra:
                e.ins(ix.Instruction.create_reg_mem(C.LEA_R64_M, R.RSP,
                                                    ix.MemoryOperand(R.RSP, displ=extra,
                                                                     displ_size=1)))
            s.undo_rsp = -(8 + extra)
        else:
            if i.op0_kind == ix.OpKind.REGISTER:
                e.ins(ix.Instruction.create_reg_reg(C.MOV_R64_RM64, R.R11,
                                                    GPR64[ix.RegisterInfo(i.op0_register)
                                                          .full_register - R.RAX]))
            elif i.is_ip_rel_memory_operand and needs_scratch(i.ip_rel_memory_address):
                e.movabs(RCX, i.ip_rel_memory_address)
                at = e.ins(ix.Instruction.create_reg_mem(C.MOV_R64_RM64, R.R11,
                                                         ix.MemoryOperand(R.RCX)))
                locs[at] = Loc(g, (fix_rcx,))
            else:
                at = e.ins(ix.Instruction.create_reg_mem(C.MOV_R64_RM64, R.R11,
                                                         mem_operand(i)))
                locs[at] = Loc(g)
            if i.flow_control == ix.FlowControl.INDIRECT_CALL:
                ret = i.next_ip
                if fits32(ret):
                    at = e.ins(ix.Instruction.create_i32(C.PUSHQ_IMM32, _s32(ret)))
                else:
                    e.movabs(RCX, ret)
                    at = e.ins(ix.Instruction.create_reg(C.PUSH_R64, R.RCX))
                locs[at] = Loc(g, (fix_r11, fix_rcx))
                s.undo_rsp = 8
        self._lookup_tail(e)

    def _lookup_tail(self, e: Emitter) -> None:
        """The lookup proper: target in R11, guest RCX/R10/R11 saved in S, S.SITE set."""
        e.store(R11, A.S_TARGET)
        e.ins(ix.Instruction.create_reg_reg(C.MOVZX_R32_RM16, R.R10D, R.R11W))
        e.ins(ix.Instruction.create_reg_mem(C.LEA_R64_M, R.RCX,
                                            ix.MemoryOperand(R.RIP, displ=self.keys)))
        e.ins(ix.Instruction.create_reg_mem(C.MOV_R64_RM64, R.RCX,
                                            ix.MemoryOperand(R.RCX, R.R10, 8)))
        e.ins(ix.Instruction.create_reg(C.NOT_RM64, R.R11))
        e.ins(ix.Instruction.create_reg_mem(C.LEA_R64_M, R.RCX,
                                            ix.MemoryOperand(R.RCX, R.R11, 1, 1, 1)))
        e.raw(b"\xe3\x05")                     # jrcxz hit (over the jmp rel32)
        e.jmp(self.miss)
        e.ins(ix.Instruction.create_reg_mem(C.LEA_R64_M, R.RCX,
                                            ix.MemoryOperand(R.RIP, displ=self.vals)))
        e.ins(ix.Instruction.create_reg_mem(C.MOV_R64_RM64, R.R11,
                                            ix.MemoryOperand(R.RCX, R.R10, 8)))
        e.store(R11, A.S_JUMP)
        e.load(RCX, A.S_SAVE_RCX)
        e.load(R10, A.S_SAVE_R10)
        e.load(R11, A.S_SAVE_R11)
        e.jmp_s(A.S_JUMP)

    # ------------------------------------------------------------------ IRETQ, INT n

    def _slow(self, e: Emitter, slow: Site, jumps: list[int]) -> None:
        """The slow path of an inline IRETQ/INT n: the guest's flags and RCX/R10/R11
        back (they were saved before anything changed), then the emulator's call-out."""
        for at in jumps:
            e.patch(at, e.here)
        e.ins(ix.Instruction.create_mem(C.PUSH_RM64, s_mem(A.S_SCRATCH)))
        e.raw(b"\x9d")                                      # popfq: the guest's flags
        e.load(RCX, A.S_SAVE_RCX)
        e.load(R10, A.S_SAVE_R10)
        e.load(R11, A.S_SAVE_R11)
        e.callout(slow.id, self.common)

    def _save3_and_flags(self, e: Emitter, g: int, locs: dict[int, Loc]) -> None:
        e.store(RCX, A.S_SAVE_RCX)
        e.store(R10, A.S_SAVE_R10)
        e.store(R11, A.S_SAVE_R11)
        at = e.raw_at(b"\x9c")                             # pushfq (below RSP, a moment)
        locs[at] = Loc(g)
        e.ins(ix.Instruction.create_mem(C.POP_RM64, s_mem(A.S_SCRATCH)))

    def _canonical_r11(self, e: Emitter, jumps: list[int]) -> None:
        """jump to the slow path unless R11 is canonical (RCX clobbered)."""
        e.ins(ix.Instruction.create_reg_reg(C.MOV_R64_RM64, R.RCX, R.R11))
        e.ins(ix.Instruction.create_reg_i32(C.SAR_RM64_IMM8, R.RCX, 47))
        e.ins(ix.Instruction.create_reg(C.INC_RM64, R.RCX))
        e.ins(ix.Instruction.create_reg_i32(C.CMP_RM64_IMM8, R.RCX, 1))
        jumps.append(e.jcc(0x7, None))                        # ja: not canonical

    def _iretq(self, e: Emitter, b: Block, i: ix.Instruction, raw: bytes,
               locs: dict[int, Loc], sites: list[Site]) -> None:
        """IRETQ to the same CS and SS (a kernel returning from its own interrupt or
        exception handler) inline: the frame copied to S, the virtual IF/IOPL from its
        RFLAGS, the rest by popfq, RSP from it, then the lookup of its RIP. Anything else
        (another CS/SS, NT, a non-canonical RIP) takes the emulator's call-out."""
        g = i.ip
        slow = self._site(sites, b, kind="emulate", guest=g, next=i.next_ip, insn=raw,
                          vector=GP)
        look = self._site(sites, b, kind="lookup", guest=g, next=i.next_ip)
        fix = ((RCX, RESTORE, A.S_SAVE_RCX), (R10, RESTORE, A.S_SAVE_R10),
               (R11, RESTORE, A.S_SAVE_R11))
        e.store(RCX, A.S_SAVE_RCX)
        e.store(R10, A.S_SAVE_R10)
        e.store(R11, A.S_SAVE_R11)
        for k in range(5):                                   # the frame, read once
            at = e.ins(ix.Instruction.create_reg_mem(
                C.MOV_R64_RM64, R.R11, ix.MemoryOperand(R.RSP, displ=8 * k,
                                                        displ_size=1 if k else 0)))
            locs[at] = Loc(g, fix)
            e.store(R11, A.S_IRET + 8 * k)
        at = e.raw_at(b"\x9c")
        locs[at] = Loc(g, fix)
        e.ins(ix.Instruction.create_mem(C.POP_RM64, s_mem(A.S_SCRATCH)))
        jumps: list[int] = []
        e.load(R11, A.S_IRET + 8)
        e.ins(ix.Instruction.create_reg_mem(C.CMP_R16_RM16, R.R11W, s_mem(A.S_VCS)))
        jumps.append(e.jcc(0x5, None))                        # jne: another CS
        e.load(R11, A.S_IRET + 32)
        e.ins(ix.Instruction.create_reg_mem(C.CMP_R16_RM16, R.R11W, s_mem(A.S_VSS)))
        jumps.append(e.jcc(0x5, None))                        # jne: another SS
        e.ins(ix.Instruction.create_mem_i32(C.TEST_RM64_IMM32, s_mem(A.S_IRET + 16), 0x4000))
        jumps.append(e.jcc(0x5, None))                        # NT: #GP in 64-bit mode
        e.load(R11, A.S_IRET)
        self._canonical_r11(e, jumps)
        for off, mask in ((A.S_VIF, 0x200), (A.S_VIOPL, 0x3000)):
            e.load(R11, A.S_IRET + 16)
            e.ins(ix.Instruction.create_reg_i32(C.AND_RM64_IMM32, R.R11, mask))
            e.store(R11, off)
        e.load(R11, A.S_IRET)                                 # the target
        e.ins(ix.Instruction.create_reg_mem(C.LEA_R64_M, R.RSP, s_mem(A.S_IRET + 16)))
        e.raw(b"\x9d")                                      # popfq: the frame's flags
        e.load(4, A.S_IRET + 24)                              # the frame's RSP
        e.store_imm32(A.S_SITE, look.id)
        self._lookup_tail(e)
        self._slow(e, slow, jumps)
        b.inline["iretq"] = b.inline.get("iretq", 0) + 1

    def _int_n(self, e: Emitter, b: Block, i: ix.Instruction, raw: bytes,
               locs: dict[int, Loc], sites: list[Site]) -> None:
        """INT n through the guest's own IDT, inline, as a CPU at CPL 0 delivers it: the
        gate read from the guest's IDT (through S.VIDTR), a present 64-bit interrupt or
        trap gate on the current CS with IST 0 and a canonical target, the frame (RIP
        after INT n, CS, RFLAGS with the virtual IF/IOPL, RSP, SS) pushed on the 16-byte
        aligned stack, the virtual IF cleared for an interrupt gate, TF/NT cleared, then
        the lookup of the handler. Anything else takes the emulator's call-out, which
        reflects it with every check (reflect.py)."""
        g, n = i.ip, i.immediate8
        slow = self._site(sites, b, kind="emulate", guest=g, next=i.next_ip, insn=raw,
                          vector=GP)
        look = self._site(sites, b, kind="lookup", guest=g, next=i.next_ip)
        self._save3_and_flags(e, g, locs)
        fix = ((RCX, RESTORE, A.S_SAVE_RCX), (R10, RESTORE, A.S_SAVE_R10),
               (R11, RESTORE, A.S_SAVE_R11), (0, FLAGS, A.S_SCRATCH))
        jumps: list[int] = []
        e.ins(ix.Instruction.create_mem_i32(C.CMP_RM16_IMM16, s_mem(A.S_VIDTR), n * 16 + 15))
        jumps.append(e.jcc(0x2, None))                        # jb: beyond the IDT limit
        e.load(R11, A.S_VIDTR + 2)
        at = e.ins(ix.Instruction.create_reg_mem(C.MOV_R64_RM64, R.RCX, ix.MemoryOperand(
            R.R11, displ=n * 16, displ_size=1)))
        locs[at] = Loc(g, fix)
        at = e.ins(ix.Instruction.create_reg_mem(C.MOV_R64_RM64, R.R10, ix.MemoryOperand(
            R.R11, displ=n * 16 + 8, displ_size=1)))
        locs[at] = Loc(g, fix)
        e.store(RCX, A.S_GATE)
        e.ins(ix.Instruction.create_reg_reg(C.MOV_R64_RM64, R.R11, R.RCX))   # P, type
        e.ins(ix.Instruction.create_reg_i32(C.SHR_RM64_IMM8, R.R11, 40))
        e.ins(ix.Instruction.create_reg_i32(C.AND_RM32_IMM32, R.R11D, 0x9E))
        e.ins(ix.Instruction.create_reg_i32(C.CMP_RM32_IMM32, R.R11D, 0x8E))
        jumps.append(e.jcc(0x5, None))
        e.ins(ix.Instruction.create_reg_reg(C.MOV_R64_RM64, R.R11, R.RCX))   # selector
        e.ins(ix.Instruction.create_reg_i32(C.SHR_RM64_IMM8, R.R11, 16))
        e.ins(ix.Instruction.create_reg_mem(C.CMP_R16_RM16, R.R11W, s_mem(A.S_VCS)))
        jumps.append(e.jcc(0x5, None))
        e.ins(ix.Instruction.create_reg_reg(C.MOV_R64_RM64, R.R11, R.RCX))   # IST
        e.ins(ix.Instruction.create_reg_i32(C.SHR_RM64_IMM8, R.R11, 32))
        e.ins(ix.Instruction.create_reg_i32(C.TEST_RM8_IMM8, R.R11L, 7))
        jumps.append(e.jcc(0x5, None))
        e.ins(ix.Instruction.create_reg_reg(C.MOV_R64_RM64, R.R11, R.RCX))   # the target
        e.ins(ix.Instruction.create_reg_i32(C.SHR_RM64_IMM8, R.R11, 48))
        e.ins(ix.Instruction.create_reg_i32(C.SHL_RM64_IMM8, R.R11, 16))
        e.ins(ix.Instruction.create_reg_reg(C.MOVZX_R32_RM16, R.ECX, R.CX))
        e.ins(ix.Instruction.create_reg_reg(C.OR_R64_RM64, R.R11, R.RCX))
        e.ins(ix.Instruction.create_reg_i32(C.SHL_RM64_IMM8, R.R10, 32))
        e.ins(ix.Instruction.create_reg_reg(C.OR_R64_RM64, R.R11, R.R10))
        self._canonical_r11(e, jumps)
        # the frame, on the aligned stack; nothing is committed until RSP moves
        e.ins(ix.Instruction.create_reg_reg(C.MOV_R64_RM64, R.R10, R.RSP))
        e.ins(ix.Instruction.create_reg_i32(C.AND_RM64_IMM8, R.R10, -16))
        e.ins(ix.Instruction.create_reg_mem(C.LEA_R64_M, R.R10, ix.MemoryOperand(
            R.R10, displ=-40, displ_size=1)))
        e.load(RCX, A.S_SCRATCH)
        e.ins(ix.Instruction.create_reg_i32(C.AND_RM64_IMM32, R.RCX, ~0x3200))
        e.ins(ix.Instruction.create_reg_mem(C.OR_R64_RM64, R.RCX, s_mem(A.S_VIF)))
        e.ins(ix.Instruction.create_reg_mem(C.OR_R64_RM64, R.RCX, s_mem(A.S_VIOPL)))
        slots: list[tuple[int, int | None]] = [(16, None), (24, -1), (32, A.S_VSS),
                                               (8, A.S_VCS), (0, -2)]
        for disp, src in slots:
            if src == -1:
                e.ins(ix.Instruction.create_reg_reg(C.MOV_R64_RM64, R.RCX, R.RSP))
            elif src == -2:
                e.movabs(RCX, i.next_ip)
            elif src is not None:
                e.ins(ix.Instruction.create_reg_mem(C.MOVZX_R32_RM16, R.ECX, s_mem(src)))
            at = e.ins(ix.Instruction.create_mem_reg(C.MOV_RM64_R64, ix.MemoryOperand(
                R.R10, displ=disp, displ_size=1 if disp else 0), R.RCX))
            locs[at] = Loc(g, fix)
        e.ins(ix.Instruction.create_reg_reg(C.MOV_R64_RM64, R.RSP, R.R10))   # committed
        e.ins(ix.Instruction.create_mem_i32(C.BT_RM64_IMM8, s_mem(A.S_GATE), 40))
        e.raw(b"\x72\x0b")                                  # jc: a trap gate keeps IF
        e.store_imm64(A.S_VIF, 0)                             # (11 bytes)
        e.ins(ix.Instruction.create_mem_i32(C.AND_RM64_IMM32, s_mem(A.S_SCRATCH), ~0x4100))
        e.store(4, A.S_IRET + 24)
        e.ins(ix.Instruction.create_reg_mem(C.LEA_R64_M, R.RSP, s_mem(A.S_SCRATCH)))
        e.raw(b"\x9d")                                      # popfq: flags, TF/NT clear
        e.load(4, A.S_IRET + 24)
        e.store_imm32(A.S_SITE, look.id)
        self._lookup_tail(e)
        self._slow(e, slow, jumps)
        b.inline[f"int {n:#x}"] = b.inline.get(f"int {n:#x}", 0) + 1

    # ------------------------------------------------------------------ inline

    def _inline(self, e: Emitter, b: Block, i: ix.Instruction, locs: dict[int, Loc]
                ) -> bool:
        """The sensitive instructions rewritten onto S; False if `i` is not one."""
        mn, g = i.mnemonic, i.ip
        kind = None
        if mn == M.CLI:
            e.store_imm64(A.S_VIF, 0)
            kind = "cli"
        elif mn == M.STI:
            e.store_imm64(A.S_VIF, 0x200)
            kind = "sti"
        elif i.code == C.PUSHFQ:
            at = e.raw_at(b"\x9c")             # pushfq: the guest's slot
            locs[at] = Loc(g, boundary=locs[at].boundary)
            at = e.raw_at(b"\x9c")             # pushfq: the flags, kept for the end
            locs[at] = Loc(g, ((4, ADD, 8),))
            e.store(R11, A.S_SCRATCH)
            e.load(R11, A.S_VIF)
            e.ins(ix.Instruction.create_reg_mem(C.OR_R64_RM64, R.R11, s_mem(A.S_VIOPL)))
            slot = ix.MemoryOperand(R.RSP, displ=8, displ_size=1)
            e.ins(ix.Instruction.create_mem_i32(C.AND_RM64_IMM32, slot, ~RFLAGS_IF_IOPL))
            e.ins(ix.Instruction.create_mem_reg(C.OR_RM64_R64, slot, R.R11))
            e.load(R11, A.S_SCRATCH)
            e.raw(b"\x9d")                     # popfq: the guest's flags again
            kind = "pushfq"
        elif i.code == C.POPFQ:
            e.store(R11, A.S_SCRATCH)
            top = ix.MemoryOperand(R.RSP)
            at = e.ins(ix.Instruction.create_reg_mem(C.MOV_R64_RM64, R.R11, top))
            locs[at] = Loc(g)
            e.ins(ix.Instruction.create_reg_i32(C.AND_RM64_IMM32, R.R11, 0x200))
            e.store(R11, A.S_VIF)
            e.ins(ix.Instruction.create_reg_mem(C.MOV_R64_RM64, R.R11, top))
            e.ins(ix.Instruction.create_reg_i32(C.AND_RM64_IMM32, R.R11, 0x3000))
            e.store(R11, A.S_VIOPL)
            e.load(R11, A.S_SCRATCH)
            e.raw(b"\x9d")                     # popfq: arithmetic flags (IF ignored)
            kind = "popfq"
        elif mn == M.MOV and i.op1_kind == ix.OpKind.REGISTER and i.op1_register in (R.CS, R.SS):
            self._store16(e, i, locs, A.S_VCS if i.op1_register == R.CS else A.S_VSS)
            kind = "mov r, cs" if i.op1_register == R.CS else "mov r, ss"
        elif mn in (M.SLDT, M.STR):
            self._store16(e, i, locs, A.S_VLDTR if mn == M.SLDT else A.S_VTR)
            kind = _name(i)
        elif mn == M.SMSW:
            self._smsw(e, i, locs)
            kind = "smsw"
        elif mn in (M.SGDT, M.SIDT) and i.op0_kind == ix.OpKind.MEMORY:
            self._sxdt(e, i, locs, A.S_VGDTR if mn == M.SGDT else A.S_VIDTR)
            kind = _name(i)
        if kind is None:
            return False
        b.inline[kind] = b.inline.get(kind, 0) + 1
        return True

    def _mem_dest(self, e: Emitter, i: ix.Instruction, used: set[int]
                  ) -> tuple[ix.MemoryOperand, int | None]:
        """i's memory operand, with an address register loaded when it is far."""
        if i.is_ip_rel_memory_operand and needs_scratch(i.ip_rel_memory_address):
            a = pick_scratch(used)
            e.store(a, A.S_SAVE_RCX)
            e.movabs(a, i.ip_rel_memory_address)
            return ix.MemoryOperand(GPR64[a]), a
        return mem_operand(i), None

    def _store16(self, e: Emitter, i: ix.Instruction, locs: dict[int, Loc], off: int) -> None:
        """A 16-bit value from S into i's destination (register forms zero-extend)."""
        g = i.ip
        if i.op0_kind == ix.OpKind.REGISTER:
            info = ix.RegisterInfo(i.op0_register)
            idx = info.full_register - R.RAX
            if info.size == 2:
                e.ins(ix.Instruction.create_reg_mem(C.MOV_R16_RM16, reg16(idx), s_mem(off)))
            else:
                e.ins(ix.Instruction.create_reg_mem(C.MOVZX_R32_RM16, reg32(idx),
                                                    s_mem(off)))
            return
        used = regs_used(i)
        r = pick_scratch(used)
        e.store(r, A.S_SCRATCH)
        mem, a = self._mem_dest(e, i, used | {r})
        fix = [(r, RESTORE, A.S_SCRATCH)] + ([(a, RESTORE, A.S_SAVE_RCX)] if a is not None
                                              else [])
        e.ins(ix.Instruction.create_reg_mem(C.MOVZX_R32_RM16, reg32(r), s_mem(off)))
        at = e.ins(ix.Instruction.create_mem_reg(C.MOV_RM16_R16, mem, reg16(r)))
        locs[at] = Loc(g, tuple(fix))
        if a is not None:
            e.load(a, A.S_SAVE_RCX)
        e.load(r, A.S_SCRATCH)

    def _smsw(self, e: Emitter, i: ix.Instruction, locs: dict[int, Loc]) -> None:
        if i.op0_kind == ix.OpKind.REGISTER:
            info = ix.RegisterInfo(i.op0_register)
            idx = info.full_register - R.RAX
            if info.size == 8:
                e.load(idx, A.S_VCR0)
            elif info.size == 4:
                e.ins(ix.Instruction.create_reg_mem(C.MOV_R32_RM32, reg32(idx),
                                                    s_mem(A.S_VCR0)))
            else:
                e.ins(ix.Instruction.create_reg_mem(C.MOV_R16_RM16, reg16(idx),
                                                    s_mem(A.S_VCR0)))
            return
        self._store16(e, i, locs, A.S_VCR0)

    def _sxdt(self, e: Emitter, i: ix.Instruction, locs: dict[int, Loc], off: int) -> None:
        """SGDT/SIDT m: 2-byte limit and 8-byte base from S (two stores)."""
        g = i.ip
        used = regs_used(i)
        r = pick_scratch(used)
        e.store(r, A.S_SCRATCH)
        far = i.is_ip_rel_memory_operand and needs_scratch(i.ip_rel_memory_address)
        mem, a = self._mem_dest(e, i, used | {r})
        hi = ix.MemoryOperand(GPR64[a], displ=8, displ_size=1) if a is not None \
            else mem_operand(i, extra=8)
        fix = [(r, RESTORE, A.S_SCRATCH)] + ([(a, RESTORE, A.S_SAVE_RCX)] if far and
                                              a is not None else [])
        e.load(r, off)
        at = e.ins(ix.Instruction.create_mem_reg(C.MOV_RM64_R64, mem, GPR64[r]))
        locs[at] = Loc(g, tuple(fix))
        e.ins(ix.Instruction.create_reg_mem(C.MOVZX_R32_RM16, reg32(r), s_mem(off + 8)))
        at = e.ins(ix.Instruction.create_mem_reg(C.MOV_RM16_R16, hi, reg16(r)))
        locs[at] = Loc(g, tuple(fix))
        if a is not None:
            e.load(a, A.S_SAVE_RCX)
        e.load(r, A.S_SCRATCH)


# ---------------------------------------------------------------------- helpers


def _s32(value: int) -> int:
    value &= 0xFFFF_FFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _far(i: ix.Instruction) -> bool:
    return i.op0_kind in (ix.OpKind.FAR_BRANCH16, ix.OpKind.FAR_BRANCH32) or i.code in (
        C.JMP_M1616, C.JMP_M1632, C.JMP_M1664, C.CALL_M1616, C.CALL_M1632, C.CALL_M1664)


def _cr_dr(i: ix.Instruction) -> bool:
    if i.mnemonic != M.MOV:
        return False
    regs = [i.op0_register, i.op1_register] if i.op_count == 2 else []
    return any(R.CR0 <= r <= R.CR15 or R.DR0 <= r <= R.DR15 for r in regs)


_PREFIXES = frozenset((0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3))


def _opcode(raw: bytes) -> bytes:
    n = 0
    while n < len(raw) and raw[n] in _PREFIXES:
        n += 1
    if n < len(raw) and 0x40 <= raw[n] <= 0x4F:
        n += 1                                  # REX
    return raw[n:]


_NAMES: dict[int, str] = {}


def _name(i: ix.Instruction) -> str:
    mn = i.mnemonic
    name = _NAMES.get(mn)
    if name is None:
        name = next((k.lower() for k, v in vars(M).items() if k.isupper() and v == mn),
                    f"mnemonic {mn}")
        _NAMES[mn] = name
    return name
