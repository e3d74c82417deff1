"""The binary-translation engine: guest kernel code translated, then run at CPL 3.

Design: the trap engine's machinery (engines/trap: hidden monitor slot, shadow GDT/IDT
and page tables, virtual CPU, reflection, the emulator of privileged instructions) with
one change of principle: guest code never runs as it stands. Every guest page is mapped
XD in the shadow page tables; the real CPU only ever executes translations, in the
translation cache of the translator's area (area.py), which translate.py writes a
basic block at a time and cache.py keeps. So the sensitive instructions that trap-and-
emulate cannot see (POPF, PUSHF, MOV from CS, SGDT...) are rewritten before they run.

Where the guest stands when pyhv holds it (`self.stop`):

    callout   a translation stored to CALLOUT (MMIO exit): COMMON spilled the registers
              into S, `SHeld` is them, S.SITE names the site (translate.Site). pyhv
              emulates the instruction (the trap emulator, on the virtual CPU), follows
              a branch exit (translating and chaining the target) or a lookup miss, and
              writes where to go on into S.RESUME. No register ioctl. When the guest
              falls through into the next call-out of the block (`Site.then`: e.g.
              `in al, 0x61; out 0x80, al`), pyhv takes that one too before resuming:
              one exit for both, the instructions still done in order, interrupts
              still checked between them.
    parked    the translation faulted (#PF, #GP, #UD, ...): the CPU pushed a frame on
              the monitor's stack, as under trap. A #PF that the shadow MMU fills is
              retried at the same TC address. Anything else is made precise first: the
              faulting TC address maps (translate.Loc) to the guest RIP of its
              instruction, its fix-ups restore the guest's registers, and then the
              fault is handled in guest terms (reflected through the guest's IDT, or a
              store to a page table or to translated code emulated).
    live      a kick or a guest MMIO access: KVM's registers are the guest's, RIP a TC
              address.

In every case a `Held` whose `rip` is a guest address (`self.guest_held`) is turned
back into a TC address on the way out (`_enter`), translating on demand; a guest fault
found while translating (an unmapped or NX page, a non-canonical RIP) is delivered to
the guest then, at that RIP. Interrupts from the 8259 are taken when the virtual IF
(S.VIF, which inline CLI/STI change without pyhv) is 1 and the guest is at a call-out
or at a `Loc.boundary` (the start of a translated guest instruction, not after STI);
elsewhere they wait for the next kick or call-out.

Guest user mode (user.py): while the virtual CPU is at CPL 3 (`self.user`: the real
CPU runs on the user root `ushadow`) the guest's own code runs natively, no
translation; `held` is then always at a guest address. The kernel's IRETQ/SYSRETQ to
CPL 3 are call-outs that leave COMMON behind (KVM_SET_REGS to the user's RIP, and the
user root, CS and SS with KVM_SET_SREGS); every exception, INT n, SYSCALL and interrupt
in user mode reaches pyhv through the monitor's IDT, is delivered into the guest
kernel with the privilege change, and the kernel's handler runs translated again.

Self-modifying code: every guest page a block was translated from is write-protected
in the shadow (ShadowMmu.protect); a write faults, the page's blocks are invalidated
and its protection dropped, and the store is emulated (MOV/XCHG) and execution goes on
with a fresh translation; any other store is retried natively and the rest of its own
block runs as translated (counted as `bt smc: rest of block stale`).
"""

from __future__ import annotations

import struct
import threading
import time
from collections import Counter
from typing import TextIO

import iced_x86 as ix

from pyhv.arch.x86.cpustate import CpuState
from pyhv.engines.base import EngineOption
from pyhv.engines.bt import area as A
from pyhv.engines.bt import user as U
from pyhv.engines.bt.cache import TranslationCache
from pyhv.engines.bt.sensitive import lar_family
from pyhv.engines.bt.state import SHeld
from pyhv.engines.bt.trace import trace_block
from pyhv.engines.bt.translate import ADD, FLAGS, RESTORE, Block, Loc, Site
from pyhv.engines.trap import descriptors, guestmem
from pyhv.engines.trap import monitor as MON
from pyhv.engines.trap.context import Held
from pyhv.engines.trap.engine import TrapEngine, TrapVcpu
from pyhv.engines.trap.guestmem import GuestFault, canonical
from pyhv.engines.trap.paging import PF_I, PF_U, PF_W
from pyhv.engines.trap.reflect import DF, GP, PF, UD, Event, Kind, TripleFault, deliver, name
from pyhv.engines.trap.shadow import Refused, ShadowMmu
from pyhv.errors import GuestMemoryError
from pyhv.exits import Exit, InternalError, Interrupted, MmioRead, MmioWrite, Shutdown
from pyhv.kvm.vcpu import Vcpu
from pyhv.memory import GuestMemory

SEL_UCODE, SEL_UDATA = MON.SEL_UCODE, MON.SEL_UDATA
REKICK_S = 0.0005          # how soon a deferred interrupt is retried
SYSCALL_TRAP = A.BT_GVA + 0x1000   # the real LSTAR: never mapped in the user root
USER_POOL = 64             # shadow pages of the user root (the kernel's root keeps the rest)
KERNEL_POOL = MON.SHADOW_POOL_PAGES - USER_POOL - 1
USER_PML4_OFF = MON.SHADOW_POOL_OFF + KERNEL_POOL * 0x1000
USER_CR3 = MON.MON_GPA + USER_PML4_OFF
ARITH_FLAGS = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x400 | 0x800 | 0x40000   # CF PF AF ZF SF DF OF AC


class BtVcpu(TrapVcpu):
    """One vCPU whose kernel code runs as translations at CPL 3."""

    def __init__(self, kv: Vcpu, index: int, mem: GuestMemory, area: MON.MonitorArea,
                 bt: A.BtArea, *, trace: TextIO | None = None) -> None:
        self.bt = bt
        self.tc = TranslationCache(bt)
        self.stop = "live"
        self.site: Site | None = None
        self.guest_held = False
        self.bt_count: Counter[str] = Counter()
        self.trace = trace
        self.rekick: threading.Timer | None = None
        self.user = False                     # the real CPU runs guest user mode
        self._synced: tuple[object, ...] | None = None   # what _sync_out last wrote
        self.ushadow: ShadowMmu | None = None
        super().__init__(kv, index, mem, area, umip=False)

    # ------------------------------------------------------------------ virtual CPU <-> S

    def _sync_in(self) -> None:
        """What inline code changed: the virtual IF and IOPL."""
        self.v.if_ = bool(self.bt.s_get(A.S_VIF) & 0x200)
        self.v.iopl = (self.bt.s_get(A.S_VIOPL) >> 12) & 3

    def _sync_out(self) -> None:
        """The virtual CPU into S. Skipped when nothing changed since the last time:
        between two syncs only inline CLI/STI/POPF write S (VIF/VIOPL), and _sync_in
        has read those back into `v` at the exit, so an unchanged `v` means S is
        already right (the cheap path of a call-out, docs/modes.md)."""
        v, bt = self.v, self.bt
        key = (v.if_, v.iopl, v.cs.selector, v.ss.selector, v.tr.selector,
               v.ldt.selector, v.cr0, v.gdt.limit, v.gdt.base, v.idt.limit, v.idt.base)
        if key == self._synced:
            return
        self._synced = key
        bt.s_put(A.S_VIF, 0x200 if v.if_ else 0)
        bt.s_put(A.S_VIOPL, v.iopl << 12)
        bt.s_put(A.S_VCS, v.cs.selector & 0xFFFF)
        bt.s_put(A.S_VSS, v.ss.selector & 0xFFFF)
        bt.s_put(A.S_VTR, v.tr.selector & 0xFFFF)
        bt.s_put(A.S_VLDTR, v.ldt.selector & 0xFFFF)
        bt.s_put(A.S_VCR0, v.cr0)
        struct.pack_into("<HQ", bt.view, A.S_OFF + A.S_VGDTR, v.gdt.limit & 0xFFFF,
                         v.gdt.base)
        struct.pack_into("<HQ", bt.view, A.S_OFF + A.S_VIDTR, v.idt.limit & 0xFFFF,
                         v.idt.base)

    # ------------------------------------------------------------------ running

    def run(self) -> Exit:
        kv = self.kv
        if self.pending_in is not None:
            self._complete_in()
        while True:
            try:
                shut = self._maybe_interrupt()
                if shut is not None:
                    return shut
                out = self._leave()
            except (GuestMemoryError, OSError, ValueError, struct.error) as e:
                return self._failure(e)
            if out is not None:
                return out
            nxt = self._adjacent()
            if nxt is not None:
                # the guest would run straight into another call-out: take it now, in
                # the same stop (its registers are in S as COMMON would leave them)
                self.bt.s_put(A.S_SITE, nxt.id)
                self.bt_count["call-outs taken without an exit"] += 1
                try:
                    out = self._callout(0.0, time.perf_counter(), adjacent=True)
                except (GuestMemoryError, OSError, ValueError, struct.error) as e:
                    return self._failure(e)
                if out is not None:
                    return out
                continue
            self._resync_shadow()
            t0 = time.perf_counter()
            ex = kv.run()
            t1 = time.perf_counter()
            if isinstance(ex, MmioWrite) and ex.addr == self.bt.callout_gpa:
                self.stop = "callout"
                self._sync_in()
                try:
                    out = self._callout(t1 - t0, t1)
                except (GuestMemoryError, OSError, ValueError, struct.error) as e:
                    return self._failure(e)
                if out is not None:
                    return out
                continue
            if isinstance(ex, MmioWrite) and MON.SIGNAL_GPA <= ex.addr < MON.SIGNAL_GPA + 256:
                self.stop = "parked"
                self._sync_in()
                try:
                    out = self._fault(ex.addr - MON.SIGNAL_GPA, t1 - t0, t1)
                except (GuestMemoryError, OSError, ValueError, struct.error) as e:
                    return self._failure(e)
                if out is not None:
                    return out
                continue
            self._sync_in()
            self.trap_stats.exits[type(ex).__name__] += 1
            if isinstance(ex, Interrupted):
                if self.parked is None or not self.area.is_stub(kv.get_regs().rip):
                    self._left_stub()
                    self.stop = "live"
                return ex
            self._left_stub()
            self.stop = "live"
            if isinstance(ex, MmioRead | MmioWrite):
                self.mmio_pending = True
            if isinstance(ex, Shutdown):
                return Shutdown(f"triple fault of the real CPU ({ex.reason})",
                                self._guest_rip())
            return ex

    def _adjacent(self) -> Site | None:
        """After a call-out that fell through: the call-out its translation runs into
        next with nothing in between (Site.then), if any."""
        site = self.site
        if self.stop != "callout" or site is None or site.then is None:
            return None
        b = site.block
        if b is None or not b.valid or self.bt.s_get(A.S_RESUME) != site.cont:
            return None
        return site.then

    def _failure(self, e: BaseException) -> Exit:
        return InternalError(f"bt engine failure: {type(e).__name__}: {e}", self._guest_rip())

    def _guest_rip(self) -> int | None:
        h = self.held
        if h is None:
            return None
        if self.guest_held:
            return h.rip
        loc = self.tc.loc(h.rip)
        return loc.guest if loc is not None else None

    # ------------------------------------------------------------------ call-outs

    def _callout(self, kvm_s: float, t_exit: float, *, adjacent: bool = False
                 ) -> Exit | None:
        sid = self.bt.s_get(A.S_SITE) & 0xFFFF_FFFF
        site = self.tc.site(sid)
        h = SHeld(self.bt, 0)
        self.held = h
        self.guest_held = True
        self.site = site
        if site is None:
            return InternalError(f"bt engine: call-out from unknown site {sid}", None)
        h.rip = site.guest
        result: Exit | None = None
        if site.kind == "branch":
            kind = "branch exit"
            h.rip = site.target
            try:
                t = self._block(site.target)
            except GuestFault:
                t = None                          # delivered on the way out (_enter)
            if t is not None:
                self.tc.chain(site, t)
        elif site.kind == "lookup":
            kind = "lookup miss"
            target = self.bt.s_get(A.S_TARGET)
            if canonical(target):
                h.rip = target
            else:                                 # #GP at the branch, nothing popped
                h.rsp = (h.rsp + site.undo_rsp) & 0xFFFF_FFFF_FFFF_FFFF
                result = self._deliver(h, Event(GP, Kind.EXCEPTION, 0))
        elif site.kind == "lar":
            kind = _insn_name(site.insn)
            out = lar_family(self.view, self.v, h, site.insn, self.emu)
            if out is not None:
                result = self._deliver(h, out)
        elif site.kind == "emulate" and _to_user(self.view, h, site.insn):
            kind, result = self._to_user(h, site.insn)
        else:
            out2 = self.emu.emulate(h, site.vector, 0 if site.vector == GP else None,
                                    site.insn)
            kind = out2.kind
            result = self._apply(h, out2, site.guest, site.insn)
        self.trap_stats.record(f"call-out {kind}" + (" (adjacent: no exit)" if adjacent
                                                     else ""),
                               time.perf_counter() - t_exit, kvm_s)
        return result

    def _to_user(self, h: Held, insn: bytes) -> tuple[str, Exit | None]:
        """IRETQ to an RPL 3 CS, or SYSRETQ: the guest kernel enters its user mode."""
        sysret = insn[:3] == b"\x48\x0f\x07"
        kind = "sysretq to user" if sysret else "iretq to user"
        try:
            if sysret:
                U.sysret(self.v, h)
            else:
                U.iret_to_user(self.view, self.v, h)
        except GuestFault as f:
            return kind, self._deliver(h, Event(f.vector, Kind.EXCEPTION, f.error_code,
                                                cr2=f.cr2))
        except U.Refused as r:
            return kind, InternalError(f"cannot emulate: {r}", h.rip, insn)
        self.bt_count["user mode entries"] += 1
        return kind, None

    # ------------------------------------------------------------------ faults

    def _fault(self, vector: int, kvm_s: float, t_exit: float) -> Exit | None:
        """An exception inside a translation (the trap monitor's stub reported it)."""
        err, rip, cs, rflags, rsp, _ss = self.area.read_frame(vector)
        self.parked = vector
        self.loaded = (self.real_cs, self.real_ss)
        if cs & 3 != 3:
            return InternalError(f"bt engine: {name(vector)} in monitor code", rip)
        h = Held(self.kv, parked=True, rip=rip, rsp=rsp, rflags=rflags)
        self.held = h
        self.guest_held = self.user
        self.site = None
        if self.user:
            kind, result = self._user_fault(h, vector, err)
            self.trap_stats.record(kind, time.perf_counter() - t_exit, kvm_s)
            return result
        if not self.tc.in_tc(rip):
            return InternalError(f"bt engine: {name(vector)} at {rip:#x}, outside the "
                                 "translation cache (guest code must never run as it "
                                 "stands)", None)
        kind, result = self._handle_fault(h, vector, err)
        self.trap_stats.record(kind, time.perf_counter() - t_exit, kvm_s)
        return result

    def _handle_fault(self, h: Held, vector: int, err: int | None
                      ) -> tuple[str, Exit | None]:
        if vector == PF:
            cr2 = int(self.kv.get_sregs().cr2)
            e = err or 0
            if not self.v.efer & 0x800:
                e &= ~PF_I
            if self.bt.in_area(cr2):
                # a store to the translator's read-only pages: not there for the guest
                if not self._precise(h):
                    return "fault in bt code", self._lost(h, vector)
                return "reflect #PF", self._deliver(h, Event(PF, Kind.EXCEPTION, e & PF_W,
                                                              cr2=cr2))
            sh = self.shadow
            assert sh is not None
            try:
                if sh.fault(cr2, e):
                    return "shadow fill", None
            except GuestFault as f:
                if not self._precise(h):
                    return "fault in bt code", self._lost(h, vector)
                return "reflect #PF", self._deliver(h, Event(PF, Kind.EXCEPTION,
                                                              f.error_code, cr2=f.cr2))
            except Refused as r:
                return "shadow refused", InternalError(f"cannot emulate: {r}",
                                                       self._guest_rip())
            frame = sh.walk(cr2).frame
            if frame in sh.protected:
                return "self-modifying code", self._smc(h, frame)
            return "pt write", self._emulate_store(h)
        if not self._precise(h):
            return "fault in bt code", self._lost(h, vector)
        if vector in (GP, UD):
            insn = guestmem.fetch(self.view, h.rip)
            out = self.emu.emulate(h, vector, err, insn)
            return out.kind, self._apply(h, out, h.rip, insn)
        return f"reflect {name(vector)}", self._deliver(h, Event(vector, Kind.EXCEPTION, err))

    def _user_fault(self, h: Held, vector: int, err: int | None
                    ) -> tuple[str, Exit | None]:
        """An exception of guest user code, run natively: as a CPU at CPL 3 takes it."""
        if vector == PF:
            cr2 = int(self.kv.get_sregs().cr2)
            if cr2 == h.rip == SYSCALL_TRAP:
                return self._user_syscall(h)
            e = err or 0
            if not self.v.efer & 0x800:
                e &= ~PF_I
            us = self.ushadow
            assert us is not None
            try:
                if us.fault(cr2, e):
                    return "user shadow fill", None
            except GuestFault as f:
                return "user reflect #PF", self._deliver(h, Event(
                    PF, Kind.EXCEPTION, (f.error_code or 0) | PF_U, cr2=f.cr2))
            except Refused as r:
                return "shadow refused", InternalError(f"cannot emulate: {r}", h.rip)
            frame = us.walk(cr2).frame
            if frame in us.protected and frame not in us.table_pages and (
                    self.shadow is None or frame not in self.shadow.table_pages):
                self.tc.invalidate_frame(frame)   # user code wrote translated code
                us.unprotect(frame)
                self.bt_count["smc: user writes"] += 1
                return "user smc", None           # retried natively, now writable
            insn = guestmem.fetch(self.view, h.rip)
            out = self.emu.pt_write(h, insn)
            return "user pt write", self._apply(h, out, h.rip, insn)
        i = ix.Decoder(64, guestmem.fetch(self.view, h.rip), ip=h.rip).decode()
        if vector == UD and i.mnemonic == ix.Mnemonic.SYSCALL:
            try:
                U.syscall(self.v, h, i.next_ip)
            except GuestFault as f:
                return "user reflect #UD", self._deliver(h, Event(f.vector, Kind.EXCEPTION,
                                                                  f.error_code))
            return "user syscall", None
        if i.mnemonic in (ix.Mnemonic.INT, ix.Mnemonic.INT3, ix.Mnemonic.INTO):
            n = 3 if i.mnemonic == ix.Mnemonic.INT3 else (
                4 if i.mnemonic == ix.Mnemonic.INTO else i.immediate8)
            # KVM-PVM raises #UD for INT n at CPL 3 (docs/host.md); elsewhere the
            # monitor's DPL 0 gate refuses it with #GP(n*8+2)
            if vector == UD or (vector == GP and err == n * 8 + 2):
                if U.int_refused(self.view, self.v, n):
                    return "user reflect #GP", self._deliver(h, Event(GP, Kind.EXCEPTION,
                                                                      n * 8 + 2))
                h.rip = i.next_ip
                return "user int n", self._deliver(h, Event(n, Kind.SOFTWARE))
        return f"user reflect {name(vector)}", self._deliver(h, Event(vector, Kind.EXCEPTION,
                                                                      err))

    def _user_syscall(self, h: Held) -> tuple[str, Exit | None]:
        """SYSCALL in user mode. On KVM-PVM it does not fault: the real CPU goes on at
        CPL 3 at the vCPU's LSTAR with RCX = the next RIP and R11 = RFLAGS (docs/
        host.md); pyhv points that LSTAR at SYSCALL_TRAP, never mapped in the user
        root, so the fetch there is a #PF naming it. The guest's SYSCALL is then done on
        the virtual CPU (user.py). A jump to SYSCALL_TRAP that no SYSCALL made is the
        guest's own #PF."""
        rcx, r11 = h.gpr(1), h.gpr(11)
        try:
            was_syscall = guestmem.read(self.view, rcx - 2, 2) == b"\x0f\x05"
        except GuestFault:
            was_syscall = False
        if not was_syscall:
            return "user reflect #PF", self._deliver(h, Event(
                PF, Kind.EXCEPTION, PF_U | (PF_I if self.v.efer & 0x800 else 0),
                cr2=SYSCALL_TRAP))
        h.rflags = r11
        try:
            U.syscall(self.v, h, rcx)
        except GuestFault as f:                   # EFER.SCE off: #UD at the SYSCALL
            h.rip = rcx - 2
            return "user reflect #UD", self._deliver(h, Event(f.vector, Kind.EXCEPTION,
                                                              f.error_code))
        return "user syscall", None

    def _lost(self, h: Held, vector: int) -> Exit:
        return InternalError(f"bt engine: {name(vector)} at TC address {h.rip:#x}, which "
                             "maps to no guest instruction", None)

    def _precise(self, h: Held) -> bool:
        """The TC address in `h` -> the guest RIP of its instruction, guest registers."""
        if self.guest_held:
            return True
        loc = self.tc.loc(h.rip)
        if loc is None:
            return False
        self._apply_loc(h, loc)
        return True

    def _apply_loc(self, h: Held, loc: Loc) -> None:
        for reg, how, value in loc.fixups:
            if how == RESTORE:
                h.set_gpr(reg, self.bt.s_get(value))
            elif how == ADD:
                h.set_gpr(reg, h.gpr(reg) + value)
            elif how == FLAGS:                    # the arithmetic flags saved in S
                keep = ARITH_FLAGS
                h.rflags = (h.rflags & ~keep) | (self.bt.s_get(value) & keep)
        h.rip = loc.guest
        self.guest_held = True

    def _smc(self, h: Held, frame: int) -> Exit | None:
        """A store to a page with translations on it: they go, and the store is done."""
        sh = self.shadow
        assert sh is not None
        tc_rip = h.rip
        gone = self.tc.invalidate_frame(frame)
        sh.unprotect(frame)
        self.bt_count["smc: pages unprotected"] += 1
        if not any(b.tc <= tc_rip < b.tc + b.size for b in gone):
            return None                      # retried natively: no stale code runs after
        return self._emulate_store(h, code_page=frame not in sh.table_pages)

    def _emulate_store(self, h: Held, *, code_page: bool = False) -> Exit | None:
        """Carry out the faulting store in pyhv (MOV/XCHG) and go on after it. On a code
        page, any other store is retried natively (the rest of its block is stale)."""
        tc_rip = h.rip
        loc = self.tc.loc(tc_rip)
        if loc is None:
            return self._lost(h, PF)
        self._apply_loc(h, loc)
        insn = guestmem.fetch(self.view, h.rip)
        out = self.emu.pt_write(h, insn)
        if out.error is not None and code_page and not loc.fixups:
            h.rip = tc_rip
            self.guest_held = False
            self.bt_count["smc: rest of block stale"] += 1
            return None
        if code_page:
            self.bt_count["smc: store emulated"] += 1
        elif out.error is None and self.shadow is not None:
            self.shadow.count["page-table writes emulated"] += 1
        return self._apply(h, out, h.rip, insn)

    # ------------------------------------------------------------------ interrupts

    def _maybe_interrupt(self) -> Exit | None:
        src = self.interrupt_source
        v = self.v
        if src is None or not v.if_ or v.sti_shadow or not src.pending():
            return None
        if self.stop == "live" and self.mmio_pending and self.held is None:
            self.kv.kvm_run.immediate_exit = 1    # let KVM finish the guest's MMIO first
            self.kv.run()
            self.mmio_pending = False
        h = self._hold()
        if not self.guest_held:
            loc = self.tc.loc(h.rip)
            if loc is None or not loc.boundary or loc.fixups:
                self._defer()
                return None                       # not at a guest instruction: later
            h.rip = loc.guest
            self.guest_held = True
        vector = src.acknowledge()
        if vector is None:
            return None
        self.trap_stats.interrupts += 1
        return self._deliver(h, Event(vector, Kind.EXTERNAL))

    def _defer(self) -> None:
        """The vCPU stopped inside a rewritten sequence with an interrupt due: kick it
        again shortly, so the interrupt is taken at the next boundary even if no
        call-out or timer comes (one timer thread at a time, cancelled at close)."""
        self.bt_count["interrupts deferred"] += 1
        t = self.rekick
        if t is None or not t.is_alive():
            t = threading.Timer(REKICK_S, self.kv.kick)
            t.daemon = True
            t.start()
            self.rekick = t

    # ------------------------------------------------------------------ holding

    def _hold(self) -> Held:
        if self.held is None:
            if self.stop == "callout":
                nxt = self.site.next if self.site is not None else 0
                self.held = SHeld(self.bt, nxt)
                self.guest_held = True
            elif self.parked is not None:
                rip, _cs, fl, rsp, _ss = struct.unpack_from(
                    "<5Q", self.area.view, MON.frame_offset(self.parked))
                self.held = Held(self.kv, parked=True, rip=rip, rsp=rsp, rflags=fl)
                self.guest_held = self.user
            else:
                self.held = Held(self.kv, parked=False)
                self.guest_held = self.user
        return self.held

    def _leave(self) -> Exit | None:
        h = self.held
        if h is None:
            return None
        want_user = U.in_user(self.v)
        if self.guest_held and not want_user:
            entered = self._enter(h)
            if isinstance(entered, Exit):
                return entered
            tc_rip = entered
            want_user = U.in_user(self.v)
        else:
            tc_rip = h.rip                        # a TC address, or user code's own RIP
        self.held = None
        self.guest_held = False
        switch = want_user != self.user
        if self.stop == "callout" and switch:
            # into user mode from translated code: COMMON is left behind
            r = h.regs()
            r.rip, r.rsp, r.rflags = tc_rip, h.rsp, h.rflags
            self.kv.set_regs(r)
            self.stop = "live"
            self._switch_mode(want_user, parked=False)
        elif self.stop == "callout":
            h.commit()
            self.bt.s_put(A.S_RESUME, tc_rip)
        elif h.parked:
            assert self.parked is not None
            if switch:
                self._switch_mode(want_user, parked=True)
            self.area.write_frame(self.parked, tc_rip, self.real_cs, h.rflags, h.rsp,
                                  self.real_ss)
            h.commit()
        else:
            h.rip = tc_rip
            h.commit()
            if switch:
                self._switch_mode(want_user, parked=False)
        self._sync_out()
        return None

    def _switch_mode(self, user: bool, *, parked: bool) -> None:
        """The real CPU to guest user mode (the user root, the guest's user CS/SS where
        the shadow GDT holds them) or back to translated kernel code."""
        if user:
            self.real_cs, self.real_ss = descriptors.real_selectors(self.area, self.v)
        else:
            self.real_cs, self.real_ss = SEL_UCODE, SEL_UDATA
        self.user = user
        sr = self.kv.get_sregs()
        sr.cr3 = USER_CR3 if user else MON.SHADOW_CR3
        if not parked:                            # a parked guest gets them from the frame
            self._put_real_segments(sr)
        self.kv.set_sregs(sr)
        self.loaded = (self.real_cs, self.real_ss)
        self.bt_count["user mode switches"] += 1

    def _enter(self, h: Held) -> int | Exit:
        """The TC address for guest `h.rip` (translating it); a fault found on the way
        is the guest's, delivered at that RIP, and a handler that cannot be fetched
        escalates to #DF and then a triple fault (as trap's policy, docs/trap.md)."""
        site = self.site
        if (self.stop == "callout" and site is not None and site.cont and
                h.rip == site.next and site.block is not None and site.block.valid
                and site.kind in ("emulate", "lar")):
            return site.cont
        for attempt in range(3):
            try:
                return self._block(h.rip).tc
            except GuestFault as f:
                if attempt == 2:
                    return Shutdown(f"triple fault: the #DF handler at {h.rip:#x} cannot "
                                    "be fetched", h.rip)
                ev = (Event(f.vector, Kind.EXCEPTION, f.error_code, cr2=f.cr2) if attempt == 0
                      else Event(DF, Kind.EXCEPTION, 0))
                self.bt_count["faults at translation"] += 1
                out = self._deliver(h, ev)
                if out is not None:
                    return out
        raise AssertionError("unreachable")

    def _block(self, guest: int) -> Block:
        b, new = self.tc.translate(guest, self._fetch)
        if new:
            sh = self.shadow
            if sh is not None:
                for f in b.frames:
                    sh.protect(f)
            if self.trace is not None:
                trace_block(self.trace, b, self.bt, self.tc)
        return b

    def _fetch(self, va: int) -> tuple[bytes, int]:
        """Guest code at `va` up to its page end, as an instruction fetch sees it."""
        va &= 0xFFFF_FFFF_FFFF_FFFF
        nxe = bool(self.v.efer & 0x800)
        if not canonical(va):
            raise GuestFault(GP, 0)
        if (va >> 39) & 511 == A.BT_SLOT and not va >> 47:
            raise GuestFault(PF, PF_I if nxe else 0, cr2=va)   # the translator's slot
        sh = self.shadow
        assert sh is not None
        w = sh.walk(va, fetch=True)
        n = 0x1000 - (va & 0xFFF)
        if not self.mem.contains(w.gpa, n):
            raise GuestFault(PF, PF_I if nxe else 0, cr2=va)
        return self.mem.read(w.gpa, n), w.gpa & ~0xFFF

    # ------------------------------------------------------------------ trap hooks

    def _deliver(self, h: Held, ev: Event) -> Exit | None:
        try:
            d = deliver(self.view, self.v, h, ev)
        except TripleFault as t:
            return Shutdown(f"triple fault ({t})", h.rip)
        self.entered = (d.target, d.vector)
        return None

    def _reload_shadow(self) -> None:
        self.area.mirror_gdt(descriptors.shadow_image(self.view, self.v.gdt))
        self.real_cs, self.real_ss = SEL_UCODE, SEL_UDATA

    def _paging(self, what: str, address: int) -> None:
        sh = self.shadow
        assert sh is not None
        us = self.ushadow
        if what == "invlpg":
            sh.invlpg(address)
            if us is not None:
                us.invlpg(address)
            if self.tc.invalidate_vpage((address & 0xFFFF_FFFF_FFFF_FFFF) >> 12):
                self.bt_count["invlpg: blocks invalidated"] += 1
            return
        sh.flush_all("mov cr3" if what == "cr3" else "control register")
        if us is not None:
            us.flush_all("mov cr3" if what == "cr3" else "control register")
        self._flush_tc("mov cr3" if what == "cr3" else "control register")

    def _flush_tc(self, reason: str) -> None:
        sh = self.shadow
        if sh is not None:
            for f in list(sh.protected):
                sh.unprotect(f)
        self.tc.flush(reason)

    def _enter_shadow(self) -> None:
        self.shadow = ShadowMmu(self.mem, self.area.view, self.v, force_xd=True,
                                extra_slots={A.BT_SLOT: self.bt.pml4e()},
                                on_code_write=self._code_written, pages=KERNEL_POOL)
        # guest user mode's root: no translator area (slot 255 kept empty), U/S enforced
        self.ushadow = ShadowMmu(self.mem, self.area.view, self.v, extra_slots={A.BT_SLOT: 0},
                                 pml4_off=USER_PML4_OFF, pool_off=USER_PML4_OFF + 0x1000,
                                 pages=USER_POOL, user_only=True, peer=self.shadow)
        self.view.paging = self.shadow

    def _resync_shadow(self) -> None:
        us = self.ushadow
        if us is not None and us.resync_needed and self.shadow is not None:
            us.resync_needed = False            # one resync drops KVM's copy of both
            self.shadow.resync_needed = True
        super()._resync_shadow()

    def _code_written(self, frame: int, size: int) -> None:
        """pyhv itself wrote a translated page (a frame it pushed, a store it emulated)."""
        if self.tc.invalidate_frame(frame) and self.shadow is not None:
            self.shadow.unprotect(frame)
            self.bt_count["smc: monitor writes"] += 1

    # ------------------------------------------------------------------ state

    def set_state(self, st: CpuState) -> None:
        super().set_state(st)
        if self.shadow is None:
            self._enter_shadow()                  # always paged: guest pages are XD
        sr = self.kv.get_sregs()
        sr.cr3 = MON.SHADOW_CR3
        self.kv.set_sregs(sr)
        self._flush_tc("reset")
        self.real_cs, self.real_ss = SEL_UCODE, SEL_UDATA
        self._load_real_segments()
        self.user = False
        self._synced = None
        self.kv.set_msrs({0xC0000082: SYSCALL_TRAP, 0xC0000084: 0})
        self.stop = "live"
        self.site = None
        h = Held(self.kv, parked=False)
        h.rip = st.rip
        self.held = h
        self.guest_held = True
        self._sync_out()

    def get_state(self) -> CpuState:
        h = self._hold()
        if not self.guest_held:
            loc = self.tc.loc(h.rip)
            if loc is not None:
                self._apply_loc(h, loc)
        st = super().get_state()
        if self.guest_held:
            st.rip = h.rip
        return st

    def close(self) -> None:
        t = self.rekick
        if t is not None:
            t.cancel()
            t.join(timeout=1.0)
        super().close()

    def stats(self) -> dict[str, int | float]:
        out = super().stats()
        out.update(self.tc.stats())
        if self.ushadow is not None:
            for k, n in self.ushadow.stats().items():
                out[f"user {k}"] = n
        for k, n in sorted(self.bt_count.items()):
            out[f"bt {k}"] = n
        return out


def _to_user(mem: guestmem.Mem, h: Held, insn: bytes) -> bool:
    """A kernel IRETQ whose frame returns to RPL 3, or a SYSRETQ."""
    if insn[:3] == b"\x48\x0f\x07":
        return True
    if insn[:2] != b"\x48\xcf":
        return False
    try:
        return bool(guestmem.read_u64(mem, h.rsp + 8) & 3 == 3)
    except GuestFault:
        return False                          # the emulator raises the fault itself


def _insn_name(insn: bytes) -> str:
    i = ix.Decoder(64, insn).decode()
    return str(ix.Formatter(ix.FormatterSyntax.INTEL).format_mnemonic(i)) or "?"


def _tc_size(text: str) -> int:
    """`4M`, `64K`, `65536`: the translation cache's size (engines parse their own
    options; pyhv.units is outside the engines' layer)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = {"K": 1 << 10, "M": 1 << 20}.get(t[-1:], 1)
    digits = t[:-1] if unit > 1 else t
    if not digits.isdigit():
        raise ValueError(f"{text!r} is not a size (e.g. 64K, 4M)")
    size = int(digits) * unit
    if not A.MIN_TC <= size <= A.MAX_TC or size % 0x1000:
        raise ValueError(f"{text}: the translation cache takes 64K to 64M, in 4K steps")
    return size


class BtEngine(TrapEngine):
    """Binary translation on /dev/kvm: guest kernel code runs only as translations."""

    name = "bt"
    options = (
        EngineOption("tc", "SIZE", _tc_size, A.DEFAULT_TC,
                     "size of the translation cache (64K..64M, default 4M); when it is "
                     "full every translation is flushed"),
        EngineOption("trace", "off|FILE", lambda s: None if s == "off" else s, None,
                     "write each translated guest block next to its translation to FILE "
                     "(`-` for stderr)"),
    )

    def __init__(self, memory: GuestMemory, *, tc: int = A.DEFAULT_TC,
                 trace: str | None = None) -> None:
        self.bt: A.BtArea | None = None
        self._trace_file: TextIO | None = None
        super().__init__(memory, umip=False)
        try:
            self.bt = A.BtArea(tc)
            self.bt_slot = self.monitor_slot + 1
            self.vm.set_memory(self.bt_slot, A.BT_GPA, self.bt.size, self.bt.region.host_addr)
            if trace is not None:
                import sys
                self._trace_file = sys.stderr if trace == "-" else open(  # noqa: SIM115
                    trace, "w", encoding="utf-8")
        except BaseException:
            self.close()
            raise

    def create_vcpu(self, index: int) -> BtVcpu:
        assert self.area is not None and self.bt is not None
        v = self.vm.create_vcpu(index)
        v.set_cpuid(self._cpuid)
        bv = BtVcpu(v, index, self.memory, self.area, self.bt, trace=self._trace_file)
        bv.resync = self._resync_monitor
        self.vcpus.append(bv)
        return bv

    def close(self) -> None:
        super().close()
        if self.bt is not None:
            self.bt.close()
            self.bt = None
        if self._trace_file is not None:
            import sys
            if self._trace_file is not sys.stderr:
                self._trace_file.close()
            self._trace_file = None
