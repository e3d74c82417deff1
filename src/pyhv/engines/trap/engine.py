"""The trap-and-emulate engine: a CPL 0 guest kernel run at CPL 3 under /dev/kvm.

Design: the guest kernel runs deprivileged, natively at CPL 3, on the monitor's shadow
GDT/IDT/TSS and page tables (monitor.py), while it believes it runs at CPL 0 on its own
(virtual.py). Everything it may do only at CPL 0 faults, and the fault comes back to
pyhv through the monitor's one-store stubs:

    guest at CPL 3 ──#GP/#UD/#PF...──> monitor IDT ──> stub: movabs [SIGNAL+v], al
         ▲                                                   │ (MMIO exit to pyhv)
         │                                                   ▼
         └── stub: iretq <── resume frame <── pyhv: read frame, decode, emulate/reflect

    #GP, #UD     emulate.py: the privileged instruction on the virtual CPU, or an IoIn/
                 IoOut/Halt exit for the run loop, or a reflected exception
    #PF          flat mode: reflected (the monitor's range reads as not present);
                 paged mode: shadow.py fills the shadow from the guest's tables and
                 resumes, or the write to a guest page-table page is emulated
                 (emulate.py pt_write), or the guest's own #PF is reflected
    other        reflect.py: delivered through the guest's own IDT
    interrupts   from the InterruptSource (the 8259) whenever the virtual IF is 1,
                 reflected the same way before the guest resumes

The vCPU keeps to the `EngineVcpu` contract, so machine.py and runner.py drive it as they
drive the KVM engine: `run()` returns IoIn/IoOut for port I/O (an IN's value is merged
into RAX when `run()` is called again), Halt with the virtual IF, MMIO exits for the
guest's own MMIO, Interrupted on a kick, Shutdown on a triple fault (the monitor's, by
the double-fault rules) and InternalError with the instruction bytes when the monitor
cannot emulate what the guest did.

CR4.UMIP: off by default, so SGDT/SIDT/SLDT/STR/SMSW do not trap and the guest sees the
monitor's values (the failure the Popek-Goldberg probe predicts, kept visible on
purpose). The engine option `umip=on` (`pyhv run --engine trap --engine-opt umip=on`)
turns UMIP on where the host has it: those instructions then trap and are emulated with
the virtual values.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import ClassVar

import iced_x86 as ix

from pyhv.arch.x86 import gdt, layout
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
    EFER_NXE,
    GPRS,
    RFLAGS_FIXED,
    RFLAGS_IF,
    RFLAGS_IOPL,
    CpuState,
    Segment,
)
from pyhv.engines.base import Engine, EngineOption, EngineVcpu, InterruptSource, on_off
from pyhv.engines.kvm import (
    _fpu_to_fxsave,
    _fxsave_to_fpu,
    machine_cpuid,
    probe_kvm,
    ram_dirty_pages,
)
from pyhv.engines.trap import descriptors, guestmem
from pyhv.engines.trap import monitor as MON
from pyhv.engines.trap.context import Held
from pyhv.engines.trap.emulate import Emulator, Outcome
from pyhv.engines.trap.guestmem import GuestFault, GuestView
from pyhv.engines.trap.paging import PF_I
from pyhv.engines.trap.reflect import DF, GP, PF, UD, Event, Kind, TripleFault, deliver, name
from pyhv.engines.trap.shadow import Refused, ShadowMmu
from pyhv.engines.trap.stats import TrapStats
from pyhv.engines.trap.virtual import VirtualCpu
from pyhv.errors import GuestMemoryError, HostError
from pyhv.exits import (
    Exit,
    Halt,
    InternalError,
    Interrupted,
    IoIn,
    MmioRead,
    MmioWrite,
    Shutdown,
)
from pyhv.kvm import Kvm, Vm
from pyhv.kvm import structs as ks
from pyhv.kvm.vcpu import Vcpu
from pyhv.memory import GuestMemory

REAL_CR0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG
REAL_CR4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
PF_PRESENT, PF_USER = 1 << 0, 1 << 2
SEG_FIELDS = ("selector", "base", "limit", "type", "s", "dpl", "present", "avl", "l", "db",
              "g", "unusable")


def _load(k: ks.KvmSegment, seg: Segment) -> None:
    for f in SEG_FIELDS:
        setattr(k, f, getattr(seg, f))


def _segment(k: ks.KvmSegment) -> Segment:
    return Segment(**{f: int(getattr(k, f)) for f in SEG_FIELDS})


class TrapVcpu(EngineVcpu):
    """One deprivileged vCPU: a KVM vCPU at CPL 3 and the virtual CPU it believes in."""

    def __init__(self, kv: Vcpu, index: int, mem: GuestMemory, area: MON.MonitorArea,
                 *, umip: bool) -> None:
        self.kv = kv
        self.index = index
        self.mem = mem
        self.area = area
        self.umip = umip
        self.interrupt_source: InterruptSource | None = None
        self.v = VirtualCpu()
        self.view = GuestView(mem)
        self.emu = Emulator(self.view, self.v, umip=umip)
        self.shadow: ShadowMmu | None = None  # set once the guest uses its own tables
        self.resync: Callable[[], None] | None = None   # drop KVM's copy of the shadow
        self.parked: int | None = None       # vector whose resume frame holds the guest
        self.held: Held | None = None
        self.pending_in: tuple[IoIn, int] | None = None
        self.mmio_pending = False             # a guest MMIO exit awaits KVM's completion
        self.entered: tuple[int, int] | None = None   # (handler, vector) just delivered
        self.real_cs, self.real_ss = MON.SEL_UCODE, MON.SEL_UDATA
        self.loaded = (self.real_cs, self.real_ss)    # what the real CPU has in CS/SS
        self.trap_stats = TrapStats()

    # ------------------------------------------------------------------ running

    def _resync_shadow(self) -> None:
        """Before KVM_RUN: when the shadow changed what KVM must reload, reload it (once)."""
        sh = self.shadow
        if sh is not None and sh.resync_needed:
            sh.resync_needed = False
            sh.count["kvm resyncs"] += 1
            if self.resync is not None:
                self.resync()

    def run(self) -> Exit:
        kv = self.kv
        if self.pending_in is not None:
            self._complete_in()
        while True:
            shut = self._maybe_interrupt()
            if shut is not None:
                return shut
            self._release()
            self._resync_shadow()
            t0 = time.perf_counter()
            ex = kv.run()
            t1 = time.perf_counter()
            if isinstance(ex, MmioWrite) and MON.SIGNAL_GPA <= ex.addr < MON.SIGNAL_GPA + 256:
                try:
                    out = self._trap(ex.addr - MON.SIGNAL_GPA, t1 - t0, t1)
                except (GuestMemoryError, OSError, ValueError, struct.error) as e:
                    # a monitor bug must end the run with a report, never a traceback
                    return InternalError(f"trap engine failure: {type(e).__name__}: {e}",
                                         self.held.rip if self.held else None)
                if out is not None:
                    return out
                continue
            if not (isinstance(ex, Interrupted) and self._hlt_still_shadowed()):
                self.v.sti_shadow = False
            self.trap_stats.exits[type(ex).__name__] += 1
            if isinstance(ex, Interrupted):
                if self.parked is not None and not self.area.is_stub(kv.get_regs().rip):
                    self._left_stub()
                return ex
            self._left_stub()
            if isinstance(ex, MmioRead | MmioWrite):
                self.mmio_pending = True
            if isinstance(ex, Shutdown):
                return Shutdown(f"triple fault of the real CPU ({ex.reason})", ex.rip)
            return ex

    def _hlt_still_shadowed(self) -> bool:
        """After STI, a kick (Interrupted) can end KVM_RUN before the guest ran the
        instruction in STI's shadow. When that instruction is the HLT of "sti; hlt" (which
        always traps here, so an Interrupted exit at it means it has not run) the shadow
        holds: an interrupt taken now would return to the HLT and sleep past the wake-up
        the guest was waiting for (with a handler that returns with IF=0: a halt with
        interrupts off). Any other instruction may have run, so the shadow ends."""
        if not self.v.sti_shadow:
            return False
        rip = self.kv.get_regs().rip
        if self.parked is not None and self.area.is_stub(rip):
            # still in the monitor's return path (the usual case: a kick makes KVM_RUN
            # return before anything ran): the guest resumes at its frame's RIP
            rip = struct.unpack_from("<Q", self.area.view, MON.frame_offset(self.parked))[0]
        return guestmem.fetch(self.view, rip, 1) == b"\xf4"

    def _left_stub(self) -> None:
        if self.parked is not None:
            self.parked = None
            self.loaded = (self.real_cs, self.real_ss)

    def _trap(self, vector: int, kvm_s: float, t_exit: float) -> Exit | None:
        """One exception from the guest: emulate or reflect; an Exit ends `run()`."""
        err, rip, cs, rflags, rsp, _ss = self.area.read_frame(vector)
        self.parked = vector
        self.loaded = (self.real_cs, self.real_ss)
        if cs & 3 != 3:
            return InternalError(f"trap engine: {name(vector)} in monitor code", rip)
        h = Held(self.kv, parked=True, rip=rip, rsp=rsp, rflags=rflags)
        self.held = h
        entered, self.entered = self.entered, None
        self.v.sti_shadow = False
        result: Exit | None = None
        if vector in (GP, UD):
            insn = guestmem.fetch(self.view, rip)
            out = self.emu.emulate(h, vector, err, insn)
            kind = out.kind
            result = self._apply(h, out, rip, insn)
        else:
            kind = f"reflect {name(vector)}"
            ev = Event(vector, Kind.EXCEPTION, err)
            if vector == PF:
                cr2 = int(self.kv.get_sregs().cr2)
                done = self._shadow_fault(h, err or 0, cr2, rip)
                if isinstance(done, tuple):
                    kind, result = done
                    self.trap_stats.record(kind, time.perf_counter() - t_exit, kvm_s)
                    return result
                ev = done if done is not None else self._page_fault(err or 0, cr2)
                if ev.cr2 == rip and entered is not None and entered[0] == rip:
                    # The handler just entered cannot even be fetched: without this the
                    # guest would fault on it forever. Treat it as a fault during
                    # delivery (monitor policy; docs/trap.md).
                    if entered[1] == DF:
                        result = Shutdown(f"triple fault: the #DF handler at {rip:#x} "
                                          "cannot be fetched", rip)
                    ev = Event(DF, Kind.EXCEPTION, 0)
            if result is None:
                result = self._deliver(h, ev)
        now = time.perf_counter()
        self.trap_stats.record(kind, now - t_exit, kvm_s)
        return result

    def _apply(self, h: Held, out: Outcome, rip: int, insn: bytes) -> Exit | None:
        if out.error is not None:
            length = ix.Decoder(64, insn, ip=rip).decode().len if insn else 0
            return InternalError(out.error, rip, insn[:length] or insn)
        if out.reload_gdt:
            self._reload_shadow()
        if out.kind in ("wrmsr", "swapgs"):
            self._sync_bases()
        if out.paging is not None:
            self._paging(out.paging, out.address)
        if out.event is not None:
            return self._deliver(h, out.event)
        ex = out.exit
        if isinstance(ex, IoIn):
            self.pending_in = (ex, out.in_size)
        if isinstance(ex, Halt) and ex.interrupts_enabled:
            src = self.interrupt_source
            if src is not None and src.pending():
                return None                       # woken at once: deliver and go on
        return ex

    def _page_fault(self, err: int, cr2: int) -> Event:
        """#PF as the guest's own flat map would report it (CPL 0, hidden = absent)."""
        code = err & ~PF_USER                     # the guest "is" at CPL 0
        if not self.v.efer & EFER_NXE:
            code &= ~PF_I                         # I/D is reported only with NXE
        if MON.HIDDEN_START <= cr2 < MON.HIDDEN_END:
            code &= ~PF_PRESENT                   # the monitor is not there for it
        return Event(PF, Kind.EXCEPTION, code, cr2=cr2)

    def _shadow_fault(self, h: Held, err: int, cr2: int, rip: int
                      ) -> tuple[str, Exit | None] | Event | None:
        """Paged mode: (kind, result) when the monitor handled the #PF itself, the
        guest's own #PF as an Event, or None in flat mode."""
        sh = self.shadow
        if sh is None:
            return None
        if not self.v.efer & EFER_NXE:
            err &= ~PF_I
        try:
            if sh.fault(cr2, err):
                return "shadow fill", None
        except GuestFault as f:
            return Event(PF, Kind.EXCEPTION, f.error_code, cr2=f.cr2)
        except Refused as r:
            return "shadow refused", InternalError(f"cannot emulate: {r}", rip)
        insn = guestmem.fetch(self.view, rip)
        out = self.emu.pt_write(h, insn)
        if out.kind == "pt write" and out.error is None:
            sh.count["page-table writes emulated"] += 1
        return "pt write", self._apply(h, out, rip, insn)

    def _paging(self, what: str, address: int) -> None:
        """MOV CR3, INVLPG, or a CR0.WP/CR4/EFER.NXE change: the shadow follows."""
        sh = self.shadow
        if sh is None:
            if what != "flush":
                self._enter_shadow()
                sr = self.kv.get_sregs()
                sr.cr3 = MON.SHADOW_CR3
                self.kv.set_sregs(sr)
            return
        if what == "invlpg":
            sh.invlpg(address)
        else:
            sh.flush_all("mov cr3" if what == "cr3" else "control register")

    def _enter_shadow(self) -> None:
        """From now on the guest runs on its own page tables, shadowed."""
        self.shadow = ShadowMmu(self.mem, self.area.view, self.v)
        self.view.paging = self.shadow

    def _deliver(self, h: Held, ev: Event) -> Exit | None:
        try:
            d = deliver(self.view, self.v, h, ev)
        except TripleFault as t:
            return Shutdown(f"triple fault ({t})", h.rip)
        self.entered = (d.target, d.vector)
        self.real_cs, self.real_ss = descriptors.real_selectors(self.area, self.v)
        return None

    def _maybe_interrupt(self) -> Exit | None:
        """Reflect the 8259's interrupt now if the virtual CPU can take it."""
        src = self.interrupt_source
        v = self.v
        if src is None or not v.if_ or v.sti_shadow or not src.pending():
            return None
        if self.mmio_pending:
            self.kv.kvm_run.immediate_exit = 1    # let KVM finish the guest's MMIO first
            self.kv.run()
            self.mmio_pending = False
        vector = src.acknowledge()
        if vector is None:
            return None
        self.trap_stats.interrupts += 1
        return self._deliver(self._hold(), Event(vector, Kind.EXTERNAL))

    def _complete_in(self) -> None:
        assert self.pending_in is not None
        ex, size = self.pending_in
        self.pending_in = None
        h = self._hold()
        value = int.from_bytes(ex.data[:size], "little")
        rax = h.gpr(0)
        if size == 4:
            rax = value
        else:
            mask = (1 << (8 * size)) - 1
            rax = (rax & ~mask) | value
        h.set_gpr(0, rax)

    # ------------------------------------------------------------------ holding

    def _hold(self) -> Held:
        if self.held is None:
            if self.parked is not None:
                rip, _cs, fl, rsp, _ss = struct.unpack_from(
                    "<5Q", self.area.view, MON.frame_offset(self.parked))
                self.held = Held(self.kv, parked=True, rip=rip, rsp=rsp, rflags=fl)
            else:
                self.held = Held(self.kv, parked=False)
        return self.held

    def _release(self) -> None:
        """Hand the held registers back to the CPU (the frame, or KVM_SET_REGS)."""
        h = self.held
        if h is None:
            return
        self.held = None
        if h.parked:
            assert self.parked is not None
            self.area.write_frame(self.parked, h.rip, self.real_cs, h.rflags, h.rsp,
                                  self.real_ss)
        elif self.loaded != (self.real_cs, self.real_ss):
            self._load_real_segments()
        h.commit()

    def _load_real_segments(self) -> None:
        sr = self.kv.get_sregs()
        self._put_real_segments(sr)
        self.kv.set_sregs(sr)
        self.loaded = (self.real_cs, self.real_ss)

    def _put_real_segments(self, sr: ks.KvmSregs) -> None:
        """Fill `sr`'s CS and SS from the shadow GDT's descriptors for the real selectors
        (the caller sets the sregs and `loaded`)."""
        for reg, sel in (("cs", self.real_cs), ("ss", self.real_ss)):
            seg = gdt.decode(sel, self.area.shadow_descriptor(sel))
            seg.selector = sel
            _load(getattr(sr, reg), seg)

    def _reload_shadow(self) -> None:
        self.area.mirror_gdt(descriptors.shadow_image(self.view, self.v.gdt))
        self.real_cs, self.real_ss = descriptors.real_selectors(self.area, self.v)

    def _sync_bases(self) -> None:
        sr = self.kv.get_sregs()
        sr.fs.base = self.emu.segment_base.get("fs", 0)
        sr.gs.base = self.emu.segment_base.get("gs", 0)
        self.kv.set_sregs(sr)

    # ------------------------------------------------------------------ control

    def kick(self) -> None:
        self.kv.kick()

    def stats(self) -> dict[str, int | float]:
        out = self.trap_stats.as_dict()
        if self.shadow is not None:
            out.update(self.shadow.stats())
        return out

    # ------------------------------------------------------------------ state

    def set_state(self, st: CpuState) -> None:
        if st.mode != "long" or not st.cr0 & CR0_PG:
            raise HostError("the trap engine runs 64-bit kernels entered in long mode "
                            f"(ELF64 images); this guest starts in {st.mode} mode")
        if st.cpl != 0:
            raise HostError("the trap engine starts guests at (virtual) CPL 0 only")
        self.v = VirtualCpu.from_state(st)
        self.view = GuestView(self.mem)
        self.emu = Emulator(self.view, self.v, umip=self.umip)
        self.shadow = None
        # pyhv's loader enters on its identity tables, which the flat map equals; any
        # other CR3 (a snapshot of a guest on its own tables) is shadowed from the start
        paged = (st.cr3 & ~0xFFF) != layout.PAGE_TABLES
        if paged:
            self._enter_shadow()
        self.emu.segment_base = {"fs": st.fs.base, "gs": st.gs.base}
        self.parked = None
        self.held = None
        self.pending_in = None
        self.mmio_pending = False
        self.entered = None
        self._reload_shadow()
        kv = self.kv
        sr = kv.get_sregs()
        for reg, sel in (("cs", self.real_cs), ("ss", self.real_ss)):
            seg = gdt.decode(sel, self.area.shadow_descriptor(sel))
            seg.selector = sel
            _load(getattr(sr, reg), seg)
        for reg in ("ds", "es", "fs", "gs"):
            seg = Segment(**vars(getattr(st, reg)))
            if seg.s and seg.present and not seg.unusable:
                seg.dpl = 3
            _load(getattr(sr, reg), seg)
        _load(sr.tr, Segment.system(MON.SEL_TSS, MON.MON_GVA + MON.TSS_OFF, MON.TSS_LIMIT,
                                    0xB))
        _load(sr.ldt, Segment(selector=0, base=0, limit=0, type=2, s=0, present=0,
                              unusable=1))
        sr.gdt.base, sr.gdt.limit = MON.MON_GVA + MON.GDT_OFF, MON.GDT_LIMIT
        sr.idt.base, sr.idt.limit = MON.MON_GVA + MON.IDT_OFF, MON.IDT_LIMIT
        sr.cr0, sr.cr2, sr.cr3 = REAL_CR0, st.cr2, MON.SHADOW_CR3 if paged else MON.CR3
        sr.cr4 = REAL_CR4 | (CR4_UMIP if self.umip else 0)
        sr.efer = EFER_LME | EFER_LMA | EFER_NXE     # shadow entries may carry XD
        kv.set_sregs(sr)
        self.loaded = (self.real_cs, self.real_ss)
        r = ks.KvmRegs()
        for n in GPRS:
            setattr(r, n, getattr(st, n))
        r.rip = st.rip
        r.rflags = (st.rflags & ~(RFLAGS_IF | RFLAGS_IOPL)) | RFLAGS_FIXED | RFLAGS_IF
        kv.set_regs(r)
        if st.fxsave is not None:
            kv.set_fpu(_fxsave_to_fpu(st.fxsave))

    def get_state(self) -> CpuState:
        h = self._hold()
        r = h.regs()
        st = CpuState()
        for n in GPRS:
            setattr(st, n, int(getattr(r, n)))
        st.rip, st.rsp = h.rip, h.rsp
        st.rflags = self.v.rflags(h.rflags)
        sr = self.kv.get_sregs()
        for reg in ("ds", "es", "fs", "gs"):
            setattr(st, reg, _segment(getattr(sr, reg)))
        self.v.fill(st)
        st.fxsave = _fpu_to_fxsave(self.kv.get_fpu())
        return st

    def close(self) -> None:
        self.kv.close()


class TrapEngine(Engine):
    """Trap-and-emulate on /dev/kvm: the guest kernel deprivileged to CPL 3."""

    name = "trap"
    options: ClassVar[tuple[EngineOption, ...]] = (EngineOption(
        "umip", "on|off", on_off, False,
        "CR4.UMIP for the deprivileged guest: SGDT/SIDT/SLDT/STR/SMSW then trap and are "
        "emulated with the guest's own values (needs a CPU with UMIP; default off, so "
        "they show the monitor's)"),)

    @classmethod
    def probe(cls) -> str | None:
        return probe_kvm()

    def __init__(self, memory: GuestMemory, *, umip: bool = False) -> None:
        super().__init__(memory)
        self.umip = umip
        self.kvm = Kvm()
        self.area: MON.MonitorArea | None = None
        self.vcpus: list[TrapVcpu] = []
        try:
            self.vm = Vm(self.kvm)
            self._cpuid = machine_cpuid(self.kvm.supported_cpuid())
            if self.umip and not any(e.function == 7 and e.index == 0 and e.ecx & (1 << 2)
                                     for e in self._cpuid):
                raise HostError("engine option umip=on, but this host's CPU has no UMIP")
            for slot, region in enumerate(memory.regions):
                self.vm.set_memory(slot, region.gpa, region.size, region.host_addr)
            self.area = MON.MonitorArea()
            self.monitor_slot = len(memory.regions)
            self.vm.set_memory(self.monitor_slot, MON.MON_GPA, MON.MON_SIZE,
                               self.area.region.host_addr)
        except BaseException:
            self.close()
            raise

    def create_vcpu(self, index: int) -> TrapVcpu:
        assert self.area is not None
        v = self.vm.create_vcpu(index)
        v.set_cpuid(self._cpuid)
        tv = TrapVcpu(v, index, self.memory, self.area, umip=self.umip)
        tv.resync = self._resync_monitor
        self.vcpus.append(tv)
        return tv

    def _resync_monitor(self) -> None:
        """Make KVM forget its copy of the shadow tables: deleting and re-adding the
        monitor's slot zaps KVM's shadow pages for it (shadow.py, last paragraph)."""
        assert self.area is not None
        self.vm.set_memory(self.monitor_slot, MON.MON_GPA, 0, self.area.region.host_addr)
        self.vm.set_memory(self.monitor_slot, MON.MON_GPA, MON.MON_SIZE,
                           self.area.region.host_addr)

    def enable_dirty_tracking(self, enable: bool = True) -> None:
        for slot, region in enumerate(self.memory.regions):
            self.vm.set_memory(slot, region.gpa, region.size, region.host_addr,
                               log_dirty=enable)
        self.memory.track_dirty(enable)

    def dirty_pages(self) -> set[int]:
        return ram_dirty_pages(self.vm, self.memory)

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus = []
        if hasattr(self, "vm"):
            self.vm.close()
        self.kvm.close()
        if self.area is not None:
            self.area.close()
            self.area = None
