"""The emu vCPU: unicorn runs guest code, pyhv supplies the rest of the processor.

    run() ---------------------------------------------------------------------------.
      | queued exit? return it      halted? wake on an interrupt or return Halt      |
      | interrupt pending and IF=1 (no STI/MOV SS shadow)? deliver it through the IDT |
      | budget = blocks until the next timer deadline (virtual clock)                 |
      | emu_start  ... guest code runs; hooks fire inside it:                         |
      |    block start (C)    counts blocks; stops on budget, kick, interrupt window  |
      |    interrupt hook     exception / INT n: delivered through the IDT in place   |
      |    invalid insn hook  #UD delivered in place                                  |
      |    SYSCALL/SYSENTER   done in place (syscall.py)                              |
      |    CPUID              answered from the CPU model (arch/x86/cpuid.py)         |
      |    IN/OUT, MMIO       the run loop's io/mmio callables, synchronously         |
      | advance the virtual clock by the blocks run; map the stop to an exit  -------'

Port I/O and MMIO: an IN or an MMIO load needs its value while the instruction executes
(stopping emulation from a hook only takes effect at the next block, docs/host.md), so the
run loop hands the vCPU two callables with `attach_io(pio, mmio)`:
`pio(port, size, value | None) -> int` and `mmio(addr, size, value | None) -> int`
(value None = read). Without them, writes become IoOut / MmioWrite exits and reads
return all ones (counted as `unrouted reads`); the engine never knows a device.

Time: with `attach_clock(clock, timers)` the vCPU advances the `VirtualClock` by
`ns_per_block` (10 ns) per executed translation block and `ns_per_io` (1 us, an ISA bus
access) per port or MMIO access, synchronised before every I/O callback so that a guest
polling the PIT sees time pass, and returns `Interrupted` when the next timer
deadline is reached; HLT returns `Halt` and the run loop skips the clock ahead.
Interrupts: the `InterruptSource` (8259) is asked before each slice and after every
I/O callback; when one is pending with IF=0 the native code watches for IF to turn on
at every block start (native/blockhook.c: in unicorn's TB-start helper or a block hook).
`kick()` (any thread) stops the vCPU at the next block.

A hostile guest gets architectural results: faults during delivery become #DF, a
fault during #DF becomes `Shutdown` with the chain of vectors; an instruction fetch
outside RAM or a failure inside unicorn becomes `InternalError` with RIP and bytes.
A Python exception inside a hook (an I/O handler's device, delivery, SYSCALL, CPUID) is
pyhv's own failure, not the guest's: the hook stops emulation at once and `run()`
re-raises the exception, with a note naming the hook, for the run loop's one error
policy (pyhv.runner: internal error, status 70).
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyhv.arch.x86 import msr
from pyhv.arch.x86.cpuid import APIC, DEFAULT_MODEL, INVARIANT_TSC, TSC_DEADLINE, X2APIC, CpuModel
from pyhv.arch.x86.cpustate import CpuState
from pyhv.engines.base import EngineVcpu, InterruptSource, MsrHandler
from pyhv.engines.emu import cpu as C
from pyhv.engines.emu import layout as L
from pyhv.engines.emu import native
from pyhv.engines.emu._uc import unicorn, x86
from pyhv.engines.emu.deliver import ERROR_CODE_VECTORS, Event, Kind, TripleFault, deliver
from pyhv.engines.emu.mmu import BadPhysical, Mmu, PageFault
from pyhv.engines.emu.native import cpuhooks
from pyhv.engines.emu.syscall import Undefined, syscall, sysenter
from pyhv.exits import Exit, Halt, InternalError, Interrupted, IoOut, MmioWrite, Shutdown

if TYPE_CHECKING:
    from pyhv.clock import TimerQueue, VirtualClock
    from pyhv.engines.emu import EmuEngine

PioHandler = Callable[[int, int, "int | None"], int]
MmioHandler = Callable[[int, int, "int | None"], int]

UNTIL = 0                            # emu_start's end address: ignored (exits mode, below)
NO_DEADLINE_BUDGET = 1 << 62
FALLBACK_SLICE = 200_000             # instructions per emu_start without the native hook
FALLBACK_INSNS_PER_BLOCK = 5         # progress accounting without the native hook
MMIO_TOP = 1 << 40                   # physical address space mapped (RAM + MMIO holes)
IF_FLAG = 1 << 9
CR0_PG = 1 << 31


class EmuVcpu(EngineVcpu):
    """One software vCPU (one unicorn instance sharing the guest's RAM)."""

    def __init__(self, engine: EmuEngine, index: int, *, model: CpuModel = DEFAULT_MODEL,
                 ns_per_block: int = 10, ns_per_io: int = 1000) -> None:
        self.index = index
        self.engine = engine
        self.mem = engine.memory
        self.model = model
        self.ns_per_block = ns_per_block
        self.ns_per_io = ns_per_io
        self.interrupt_source: InterruptSource | None = None
        self._pio: PioHandler | None = None
        self._mmio: MmioHandler | None = None
        self._clock: VirtualClock | None = None
        self._timers: TimerQueue | None = None
        self._exits: deque[Exit] = deque()
        self._final: Exit | None = None
        self._host_error: Exception | None = None   # raised in a hook; run() re-raises
        self._halted = False
        self._pending_vector: int | None = None
        self._clock_blocks = 0
        self._fallback_halted = False
        self.counters: dict[str, int] = {k: 0 for k in (
            "exceptions", "interrupts", "software interrupts", "syscalls", "cpuid",
            "port reads", "port writes", "mmio reads", "mmio writes", "unrouted reads",
            "halts", "emu_start calls", "double faults")}
        self.vectors: dict[int, int] = {}
        self.t_emu = 0.0
        self.t_run = 0.0

        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        self.uc = uc
        # No end address: with a plain `until`, emu_start probes the page of until - 1 and
        # a failed probe overwrites CR2 with that address, corrupting a page fault whose
        # handler has not read CR2 yet. An empty exit list means "run until stopped".
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        self._map_memory()
        self.blob = L.Blob(uc)
        self.view = C.CpuView(uc, self.blob)
        self.ctl = native.Ctl()
        self._hooks: list[Any] = []
        addr, self.native_info = native.load()
        self.native = addr is not None
        self.exit_checks = "unicorn's per-access exit checks kept (no native hook)"
        self.tb_counter = False
        self.counting = "instruction-count slices (no native code)"
        self._unregister: Callable[[], Any] | None = None
        if addr is not None:
            # before any code is translated: the flag acts at translation time
            self.exit_checks = native.exit_checks_off(uc)
            self._start_counting(addr)
        self.tlb: native.Tlb | None = None
        self._tlb_virtual = False
        fill = native.tlb_fill_address() if self.native else None
        if fill is not None:
            self._add_tlb_hook(fill)
        self._add_hooks()
        self._apic_present = False
        self._msr_cb: Any = None
        self._take_nmi: Callable[[], bool] | None = None
        self._nmi_blocked = False
        self.cpu: cpuhooks.Cpu | None = None
        self._pending_tsc: int | None = None     # IA32_TSC to take at the next run
        self.cpu_helpers = "host TSC (no native code)"
        if self.native:
            self._start_cpu_helpers()
        C.set_state(uc, self.blob, CpuState())

    # ------------------------------------------------------------------ setup

    def _map_memory(self) -> None:
        uc = self.uc
        edge = 0
        for r in self.mem.regions:
            if r.gpa > edge:
                self._map_mmio(edge, r.gpa - edge)
            uc.mem_map_ptr(r.gpa, r.size, unicorn.UC_PROT_ALL, r.host_addr)
            edge = r.end
        if edge < MMIO_TOP:
            self._map_mmio(edge, MMIO_TOP - edge)

    def _map_mmio(self, base: int, size: int) -> None:
        def read(_uc: Any, offset: int, sz: int, _ud: Any) -> int:
            return self._mmio_read(base + offset, sz)

        def write(_uc: Any, offset: int, sz: int, value: int, _ud: Any) -> None:
            self._mmio_write(base + offset, sz, value)

        self.uc.mmio_map(base, size, read, None, write, None)

    def _start_counting(self, addr: int) -> None:
        """Count blocks (and stop at block starts) in unicorn's TB-start helper where
        pyhv's native code took it over (one call less per block), else in a block hook."""
        uclib = unicorn.unicorn_py3.unicorn.uclib
        ctl = self.ctl
        ctl.emu_stop = ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value
        ctl.reg_read = ctypes.cast(uclib.uc_reg_read, ctypes.c_void_p).value
        usable, self.counting = native.tb_counter()
        if usable and native.register(self.uc._uch.value, ctl):
            self.tb_counter = True
            self._unregister = weakref.finalize(self, native.register, self.uc._uch.value, None)
            return
        self._add_native_hook(addr)
        if usable:
            self.counting = "block hook (the TB-start helper's vCPU table is full)"

    def _start_cpu_helpers(self) -> None:
        """RDTSC on the virtual clock, the APIC's MSRs and IRET through pyhv
        (native/cpuhelpers.c), where the scratch check passed."""
        usable, self.cpu_helpers = cpuhooks.available()
        if not usable:
            return
        cpu = cpuhooks.Cpu()
        cpu.ctl = ctypes.addressof(self.ctl)
        cpu.ns_per_block = self.ns_per_block
        if not cpuhooks.register(self.uc._uch.value, cpu):
            self.cpu_helpers = "host TSC (the helpers' vCPU table is full)"
            return
        self.cpu = cpu
        self._cpu_unregister = weakref.finalize(self, cpuhooks.register,
                                                self.uc._uch.value, None)
        self.model = dataclasses.replace(self.model, ext7_edx=self.model.ext7_edx
                                         | INVARIANT_TSC)

    def _add_native_hook(self, addr: int) -> None:
        uclib = unicorn.unicorn_py3.unicorn.uclib
        ctl = self.ctl
        handle = ctypes.c_size_t()
        err = uclib.uc_hook_add(self.uc._uch, ctypes.byref(handle), unicorn.UC_HOOK_BLOCK,
                                ctypes.c_void_p(addr), ctypes.cast(ctypes.pointer(ctl),
                                                                   ctypes.c_void_p),
                                ctypes.c_uint64(1), ctypes.c_uint64(0))
        if err != 0:
            self.native = False
            self.native_info = f"uc_hook_add failed ({err}); using instruction slices"
            self.counting = "instruction-count slices (the block hook could not be added)"

    def _add_tlb_hook(self, addr: int) -> None:
        """The paging-off TLB fill (blockhook.c): stores to pages without code take
        unicorn's fast path. Used while CR0.PG = 0 only (`_choose_tlb`)."""
        uclib = unicorn.unicorn_py3.unicorn.uclib
        tlb = native.Tlb()
        self._code_pages = (ctypes.c_uint8 * native.CODE_PAGES_BYTES)()
        tlb.code_pages = ctypes.addressof(self._code_pages)
        tlb.reg_read = ctypes.cast(uclib.uc_reg_read, ctypes.c_void_p).value
        tlb.ctl = ctypes.cast(uclib.uc_ctl, ctypes.c_void_p).value
        tlb.flush_ctl = (unicorn.UC_CTL_IO_WRITE << 30) | unicorn.UC_CTL_TLB_FLUSH
        handle = ctypes.c_size_t()
        err = uclib.uc_hook_add(self.uc._uch, ctypes.byref(handle), unicorn.UC_HOOK_TLB_FILL,
                                ctypes.c_void_p(addr), ctypes.cast(ctypes.pointer(tlb),
                                                                   ctypes.c_void_p),
                                ctypes.c_uint64(1), ctypes.c_uint64(0))
        if err == 0:
            self.tlb = tlb
            self.counters["tlb mode switches"] = 0

    def _choose_tlb(self) -> None:
        """unicorn's own TLB with paging on, pyhv's fill hook with paging off."""
        if self.tlb is None:
            return
        virtual = not self.uc.reg_read(x86.UC_X86_REG_CR0) & CR0_PG
        if virtual == self._tlb_virtual:
            return
        uc = self.uc
        uc.ctl_set_tlb_mode(unicorn.UC_TLB_VIRTUAL if virtual else unicorn.UC_TLB_CPU)
        uc.ctl(unicorn.UC_CTL_TLB_FLUSH, unicorn.UC_CTL_IO_WRITE)
        if virtual:          # code translated under the other TLB is not in the bitmap
            uc.ctl_flush_tb()
        self._tlb_virtual = virtual
        self.counters["tlb mode switches"] += 1

    def _add_hooks(self) -> None:
        uc, U, X = self.uc, unicorn, x86
        self._hooks.append(uc.hook_add(U.UC_HOOK_INTR, self._on_intr))
        self._hooks.append(uc.hook_add(U.UC_HOOK_INSN_INVALID, self._on_invalid))
        self._hooks.append(uc.hook_add(U.UC_HOOK_INSN, self._on_in, None, 1, 0,
                                       X.UC_X86_INS_IN))
        self._hooks.append(uc.hook_add(U.UC_HOOK_INSN, self._on_out, None, 1, 0,
                                       X.UC_X86_INS_OUT))
        self._hooks.append(uc.hook_add(U.UC_HOOK_INSN, self._on_syscall, None, 1, 0,
                                       X.UC_X86_INS_SYSCALL))
        self._hooks.append(uc.hook_add(U.UC_HOOK_INSN, self._on_sysenter, None, 1, 0,
                                       X.UC_X86_INS_SYSENTER))
        self._hooks.append(uc.hook_add(U.UC_HOOK_INSN, self._on_cpuid, None, 1, 0,
                                       X.UC_X86_INS_CPUID))

    # ------------------------------------------------------------------ wiring

    def attach_io(self, pio: PioHandler | None, mmio: MmioHandler | None) -> None:
        """Synchronous port-I/O and MMIO handlers: f(addr, size, value|None) -> int."""
        self._pio = pio
        self._mmio = mmio

    def invalidate_code(self) -> None:
        """Another vCPU may have written code this one has translated (each unicorn
        instance has its own translation cache and sees only its own stores)."""
        if self.uc is not None:
            self.uc.ctl_flush_tb()
            self.counters["code flushes"] = self.counters.get("code flushes", 0) + 1

    def set_apic_present(self, present: bool) -> None:
        """CPUID.1:EDX.APIC follows the machine; x2APIC and TSC-deadline (ECX) also need
        the APIC's MSRs routed (`attach_msr`: unicorn 2.1.4 executes RDMSR/WRMSR itself,
        so only pyhv's interposed helpers reach them)."""
        self._apic_present = present
        self._update_cpuid()

    def _update_cpuid(self) -> None:
        edx, ecx = self.model.features_edx, self.model.features_ecx
        edx = edx | APIC if self._apic_present else edx & ~APIC
        msrs = self._apic_present and self._msr_cb is not None
        ecx = ecx | X2APIC | TSC_DEADLINE if msrs else ecx & ~(X2APIC | TSC_DEADLINE)
        self.model = dataclasses.replace(self.model, features_edx=edx, features_ecx=ecx,
                                         kvm_leaves=msrs)

    def set_cpu_count(self, n: int) -> None:
        """n cores of one package in CPUID."""
        self.model = dataclasses.replace(self.model, cores=max(1, n))

    def set_others_runnable(self, others: bool) -> None:
        """With another vCPU waiting, PAUSE ends the slice (cpuhelpers.c); alone, a
        spin-wait just runs (yielding to nobody would cost a slice switch per PAUSE)."""
        if self.cpu is not None:
            self.cpu.yield_on_pause = 1 if others else 0

    def attach_msr(self, handler: MsrHandler) -> bool:
        """The APIC's MSRs go to `handler` (in the interposed RDMSR/WRMSR helpers), with
        the clock synchronised first (a TSC-deadline write sets a timer from now)."""
        cpu = self.cpu
        if cpu is None:
            return False

        def on_msr(msr: int, value: int | None) -> int | None:
            if value is None:
                self.counters["msr reads"] = self.counters.get("msr reads", 0) + 1
            else:
                self.counters["msr writes"] = self.counters.get("msr writes", 0) + 1
            self._sync_clock()
            got = handler(msr, value)
            self._after_io()
            return got

        self._msr_cb = cpuhooks.make_callback(on_msr)
        cpu.msr_cb = ctypes.cast(self._msr_cb, ctypes.c_void_p).value
        cpu.route_apic = 1
        self._update_cpuid()
        return True

    def guest_tsc(self) -> tuple[Callable[[], int], int] | None:
        cpu = self.cpu
        if cpu is None:
            return None
        def now() -> int:
            # after set_state and before the next run, the TSC is the state's (guest
            # time does not move in between): a restored TSC-deadline converts with it
            pending = self._pending_tsc
            return pending if pending is not None else cpu.tsc(self.ctl.blocks)
        return now, cpuhooks.TSC_HZ

    def attach_clock(self, clock: VirtualClock, timers: TimerQueue) -> None:
        """Advance `clock` with guest progress; return Interrupted at timers' deadlines."""
        self._clock = clock
        self._timers = timers
        self._clock_blocks = self.ctl.blocks

    def kick(self) -> None:
        self.ctl.kick = 1

    # ------------------------------------------------------------------ state

    def get_state(self) -> CpuState:
        """The vCPU's state; IA32_TSC in `msrs` is the guest's TSC (with the native
        helpers: the virtual clock's TSC, not unicorn's own register, which follows the
        host's TSC)."""
        st = C.get_state(self.uc, self.blob)
        st.pending_interrupt = self._pending_vector
        st.halted = self._halted
        st.nmi_blocked = self._nmi_blocked and not (self.cpu is not None and
                                                    self.cpu.iret_seen)
        cpu = self.cpu
        if cpu is not None:
            st.msrs[msr.TSC] = (self._pending_tsc if self._pending_tsc is not None
                                else cpu.tsc(self.ctl.blocks))
        return st

    def set_state(self, state: CpuState) -> None:
        """With the native helpers, IA32_TSC is not written to unicorn: the guest TSC
        is set to it when the vCPU next runs (`_stamp_tsc`), on the clock as restored
        by then (vmstate.apply restores the clock after the vCPUs), so it continues
        from the saved value."""
        if self.cpu is not None and msr.TSC in state.msrs:
            self._pending_tsc = state.msrs[msr.TSC]
            state = copy.copy(state)
            state.msrs = {k: v for k, v in state.msrs.items() if k != msr.TSC}
        C.set_state(self.uc, self.blob, state)
        self._pending_vector = state.pending_interrupt
        self._halted = state.halted
        self._nmi_blocked = state.nmi_blocked
        if self.cpu is not None:
            self.cpu.iret_seen = 0
            self.cpu.nmi_window = 0
        self._final = None
        self._exits.clear()

    # ------------------------------------------------------------------ run

    def run(self) -> Exit:
        if self.uc is None:
            return InternalError("emu: the vCPU is closed")
        t0 = time.perf_counter()
        try:
            return self._run()
        finally:
            self.t_run += time.perf_counter() - t0

    def _raise_host_error(self) -> None:
        e = self._host_error
        if e is not None:
            self._host_error = None
            self._final = InternalError("emu: stopped after a host-side error")
            raise e

    def _run(self) -> Exit:
        ctl = self.ctl
        while True:
            self._raise_host_error()
            if self._final is not None:
                return self._final
            if self._exits:
                return self._exits.popleft()
            if ctl.kick:
                ctl.kick = 0
                return Interrupted()
            self._inject()
            if self._final is not None or self._exits:
                continue
            if self._halted:
                return Halt(interrupts_enabled=bool(self._rflags() & IF_FLAG))
            ctl.reason = native.STOP_NONE
            ctl.arm(self._budget())
            self._stamp_tsc()
            err = self._emu_start()
            ctl.run_first = 0
            self._sync_clock()
            self._raise_host_error()
            if err is not None:
                if self._final is None:
                    self._final = self._internal_error(err)
                continue
            reason = ctl.reason
            ctl.reason = native.STOP_NONE
            if reason == native.STOP_BUDGET:
                if self._exits:
                    continue
                return Interrupted()
            if reason == native.STOP_YIELD:
                self.counters["pause yields"] = self.counters.get("pause yields", 0) + 1
                if self._exits:
                    continue
                return Interrupted()
            if reason in (native.STOP_KICK, native.STOP_IRQ_WINDOW, native.STOP_PYTHON):
                continue
            # emu_start ended by itself: HLT (unicorn ends emu_start after executing it)
            if self._fallback_hlt_check():
                self._halted = True
                self.counters["halts"] += 1

    def _emu_start(self, count: int = 0) -> str | None:
        begin = self.blob_rip()
        self.counters["emu_start calls"] += 1
        t0 = time.perf_counter()
        try:
            if count:
                self.uc.emu_start(begin, UNTIL, 0, count)
            elif self.native:
                while True:
                    self._choose_tlb()
                    try:
                        self.uc.emu_start(begin, UNTIL)
                    except unicorn.UcError:
                        tlb = self.tlb
                        if tlb is None or not tlb.paging:
                            raise
                        # the guest turned paging on under the paging-off TLB hook: the
                        # accessing instruction was rolled back; go on with unicorn's TLB
                        tlb.paging = 0
                        begin = self.blob_rip()
                        continue
                    break
            else:
                left = self.ctl.end - self.ctl.blocks
                count = max(1, min(FALLBACK_SLICE, left * FALLBACK_INSNS_PER_BLOCK))
                before = self.blob_rip()
                self.uc.emu_start(begin, UNTIL, 0, count)
                self._fallback_account(count, before)
        except unicorn.UcError as e:
            return str(e)
        finally:
            self.t_emu += time.perf_counter() - t0
        return None

    def blob_rip(self) -> int:
        return int(self.uc.reg_read(x86.UC_X86_REG_RIP))

    def _rflags(self) -> int:
        return int(self.uc.reg_read(x86.UC_X86_REG_EFLAGS))

    # -- fallback (no native hook): instruction-count slices
    def _fallback_account(self, count: int, before: int) -> None:
        self._fallback_halted = False
        ctl = self.ctl
        if ctl.reason != native.STOP_NONE:
            ctl.blocks += 1
            return
        if self._ends_with_hlt():
            self._fallback_halted = True
            ctl.blocks += 1
            return
        ctl.blocks += max(1, count // FALLBACK_INSNS_PER_BLOCK)
        if ctl.kick:
            ctl.reason = native.STOP_KICK
        elif ctl.blocks >= ctl.end:
            ctl.reason = native.STOP_BUDGET
        else:
            ctl.reason = native.STOP_PYTHON   # slice over: loop (interrupt window check)

    def _fallback_hlt_check(self) -> bool:
        return True if self.native else self._fallback_halted

    def _ends_with_hlt(self) -> bool:
        try:
            v = self.view.load()
            mmu = Mmu(self.mem, v.cr0, v.cr3, v.cr4, v.efer)
            return mmu.read(v.seg("cs")[1] + v.rip - 1, 1) == b"\xf4"
        except (PageFault, BadPhysical):
            return False

    # -- time
    def _budget(self) -> int:
        if self._clock is None or self._timers is None:
            return NO_DEADLINE_BUDGET
        deadline = self._timers.next_deadline()
        if deadline is None:
            return NO_DEADLINE_BUDGET
        left = deadline - self._clock.now_ns()
        return max(1, -(-left // self.ns_per_block))

    def _sync_clock(self, io: bool = False) -> None:
        """Advance the clock by the blocks run since the last sync (+ one I/O access)."""
        blocks = self.ctl.blocks
        if self._clock is not None:
            ns = (blocks - self._clock_blocks) * self.ns_per_block
            self._clock.advance(ns + (self.ns_per_io if io else 0))
        self._clock_blocks = blocks
        self._stamp_tsc()

    def _stamp_tsc(self) -> None:
        """The guest TSC restarts from the clock's now (other vCPUs and idle skips move
        the shared clock between this vCPU's slices)."""
        cpu = self.cpu
        if cpu is not None:
            cpu.tsc_ns = self._clock.now_ns() if self._clock is not None else \
                self.ctl.blocks * self.ns_per_block
            cpu.tsc_blocks = self.ctl.blocks
            if self._pending_tsc is not None:          # set_state's IA32_TSC
                cpu.tsc_offset = self._pending_tsc - cpu.tsc_ns
                self._pending_tsc = None

    # -- interrupts
    def set_interrupt_source(self, source: InterruptSource | None) -> None:
        """With the interposed IRET helper, NMIs are taken whatever IF and blocked until
        the handler's IRET (`_inject_nmi`); a source that separates them (the local APIC:
        `nmi_separate`, `take_nmi`) is told so. Otherwise they wait for IF as interrupts."""
        self.interrupt_source = source
        self._take_nmi = None
        if self.cpu is not None and source is not None and hasattr(source, "take_nmi"):
            setattr(source, "nmi_separate", True)  # noqa: B010 - a LocalApic
            self._take_nmi = getattr(source, "take_nmi")  # noqa: B009

    def _inject_nmi(self) -> bool:
        """Deliver a pending NMI, whatever IF, unless NMIs are blocked (an NMI handler
        has not yet executed IRET, SDM 6.7.1); the instruction after MOV SS/STI runs
        first. True when one was delivered (or its delivery arranged): no other
        interrupt is injected now."""
        cpu = self.cpu
        assert cpu is not None and self._take_nmi is not None
        if self._nmi_blocked:
            if not cpu.iret_seen:
                if getattr(self.interrupt_source, "nmi_pending", False):
                    cpu.nmi_window = 1          # stop at the IRET, deliver it then
                return False
            self._nmi_blocked = False
        cpu.nmi_window = 0
        if not getattr(self.interrupt_source, "nmi_pending", False):
            return False
        v = self.view.load()
        if v.shadow and not self._halted:
            # MOV SS / STI shadow: the shadowed instruction first; the block it starts
            # runs, and the kick stops the vCPU at the next block start, then back here
            self.ctl.run_first = 1
            self.ctl.kick = 1
            return True
        if not self._take_nmi():
            return False
        self._nmi_blocked = True
        cpu.iret_seen = 0
        self._halted = False
        self.counters["nmis"] = self.counters.get("nmis", 0) + 1
        self._deliver(Event(2, Kind.EXTERNAL, None, v.rip))
        return True

    def _inject(self) -> None:
        src = self.interrupt_source
        ctl = self.ctl
        if self._take_nmi is not None and self._inject_nmi():
            return
        if self._pending_vector is None and (src is None or not src.pending()):
            ctl.irq_window = 0
            return
        v = self.view.load()
        if not v.rflags & IF_FLAG:
            ctl.irq_window = 1
            return
        if v.shadow and not self._halted and self.native:
            # STI / MOV SS shadow: the shadowed instruction runs first. The native code
            # lets the slice's first block run and stops at the next block start where
            # IF=1 (a few instructions later at most: interrupt latency is not
            # architectural). No instruction-count run: unicorn would install its count
            # hook, then drop every translated block when the hook is removed.
            ctl.irq_window = 1
            ctl.run_first = 1
            return
        if v.shadow and not self._halted:
            # fallback (instruction-count slices): exactly one more instruction first
            ctl.irq_window = 0
            ctl.reason = native.STOP_NONE
            ctl.arm(NO_DEADLINE_BUDGET)
            err = self._emu_start(count=1)
            ctl.reason = native.STOP_NONE
            self._sync_clock()
            if err is not None:
                if self._final is None:
                    self._final = self._internal_error(err)
                return
            if self._final is not None or self._exits:
                return
            v = self.view.load()
            if not v.rflags & IF_FLAG:
                ctl.irq_window = 1
                return
        vector = self._pending_vector
        if vector is None:
            assert src is not None
            vector = src.acknowledge()
            if vector is None:
                return
        self._pending_vector = None
        ctl.irq_window = 0
        self._halted = False
        self.counters["interrupts"] += 1
        self._deliver(Event(vector, Kind.EXTERNAL, None, v.rip))

    def _deliver(self, ev: Event) -> None:
        """Deliver ev on the loaded view; a triple fault ends the run."""
        try:
            chain = deliver(self.view, self.mem, ev)
        except TripleFault as t:
            self._stop_with(Shutdown(reason=f"triple fault ({t})", rip=self.view.rip))
            return
        if "#DF" in chain:
            self.counters["double faults"] += 1
        self.vectors[ev.vector] = self.vectors.get(ev.vector, 0) + 1

    def _stop_with(self, ex: Exit) -> None:
        self._final = ex
        self.ctl.reason = native.STOP_PYTHON
        self.ctl.force_slow()
        self.uc.emu_stop()

    def _queue(self, ex: Exit) -> None:
        self._exits.append(ex)
        self.ctl.reason = native.STOP_PYTHON
        self.ctl.force_slow()
        self.uc.emu_stop()

    # ------------------------------------------------------------------ hooks

    def _guard(self, what: str, e: Exception) -> None:
        """A hook raised: pyhv's failure. Stop now; `run()` re-raises it."""
        if self._host_error is None:
            e.add_note(f"(raised inside the emu engine's {what} hook at rip "
                       f"{self.blob_rip():#x})")
            self._host_error = e
        self.ctl.reason = native.STOP_PYTHON
        self.uc.emu_stop()

    def _on_intr(self, _uc: Any, intno: int, _ud: Any) -> None:
        try:
            v = self.view.load()
            b = self.blob
            if b.i32(L.EXCEPTION_IS_INT):
                ev = Event(intno, Kind.SOFTWARE, None, b.u64(L.EXCEPTION_NEXT_EIP))
                self.counters["software interrupts"] += 1
            else:
                code = b.i32(L.ERROR_CODE) & 0xFFFFFFFF if intno in ERROR_CODE_VECTORS else None
                ev = Event(intno, Kind.EXCEPTION, code, v.rip)
                self.counters["exceptions"] += 1
            self._deliver(ev)
        except Exception as e:  # noqa: BLE001
            self._guard("exception delivery", e)

    def _on_invalid(self, _uc: Any, _ud: Any) -> bool:
        try:
            v = self.view.load()
            self.counters["exceptions"] += 1
            self._deliver(Event(6, Kind.EXCEPTION, None, v.rip))
            return self._final is None
        except Exception as e:  # noqa: BLE001
            self._guard("#UD delivery", e)
            return False

    def _on_syscall(self, _uc: Any, _ud: Any) -> None:
        self._fast_system_call(syscall)

    def _on_sysenter(self, _uc: Any, _ud: Any) -> None:
        self._fast_system_call(sysenter)

    def _fast_system_call(self, fn: Callable[[C.CpuView], None]) -> None:
        try:
            v = self.view.load()
            rip = v.rip
            try:
                fn(v)
                v.commit()
                self.counters["syscalls"] += 1
            except Undefined as u:
                self.counters["exceptions"] += 1
                self._deliver(Event(u.vector, Kind.EXCEPTION,
                                    0 if u.vector == 13 else None, rip))
                if self._final is None:       # unicorn adds the length after the hook
                    self.view.load()
                    self.view.rip -= 2
                    self.view.commit()
        except Exception as e:  # noqa: BLE001
            self._guard("SYSCALL/SYSENTER", e)

    def _on_cpuid(self, uc: Any, _ud: Any) -> int:
        X = x86
        eax = uc.reg_read(X.UC_X86_REG_EAX) & 0xFFFFFFFF
        ecx = uc.reg_read(X.UC_X86_REG_ECX) & 0xFFFFFFFF
        a, b, c, d = self.model.leaf(eax, ecx, apic_id=self.index)
        uc.reg_write(X.UC_X86_REG_RAX, a)
        uc.reg_write(X.UC_X86_REG_RBX, b)
        uc.reg_write(X.UC_X86_REG_RCX, c)
        uc.reg_write(X.UC_X86_REG_RDX, d)
        self.counters["cpuid"] += 1
        return 1

    def _after_io(self) -> None:
        """A device may have raised an interrupt or an NMI, or armed an earlier timer."""
        src = self.interrupt_source
        ctl = self.ctl
        if src is not None and src.pending():
            ctl.irq_window = 1
            ctl.force_slow()
        if self._take_nmi is not None and getattr(src, "nmi_pending", False):
            cpu = self.cpu
            assert cpu is not None
            if self._nmi_blocked and not cpu.iret_seen:
                cpu.nmi_window = 1              # taken after the handler's IRET
            elif ctl.reason == native.STOP_NONE:
                ctl.reason = native.STOP_PYTHON  # stop at the next block: deliver it
                ctl.force_slow()
        if self._timers is not None:
            end = ctl.blocks + self._budget()
            if end < ctl.end:
                ctl.end = end
                ctl.limit = min(ctl.limit, end)

    def _on_in(self, _uc: Any, port: int, size: int, _ud: Any) -> int:
        self.counters["port reads"] += 1
        if self._pio is None:
            self.counters["unrouted reads"] += 1
            return (1 << (8 * size)) - 1
        self._sync_clock(io=True)
        try:
            value = self._pio(port, size, None)
        except Exception as e:  # noqa: BLE001
            self._guard(f"port read {port:#x}", e)
            return 0
        self._after_io()
        return value & ((1 << (8 * size)) - 1)

    def _on_out(self, _uc: Any, port: int, size: int, value: int, _ud: Any) -> None:
        self.counters["port writes"] += 1
        value &= (1 << (8 * size)) - 1
        if self._pio is None:
            self._queue(IoOut(port, size, value.to_bytes(size, "little")))
            return
        self._sync_clock(io=True)
        try:
            self._pio(port, size, value)
        except Exception as e:  # noqa: BLE001
            self._guard(f"port write {port:#x}", e)
            return
        self._after_io()

    def _mmio_read(self, addr: int, size: int) -> int:
        self.counters["mmio reads"] += 1
        if self._mmio is None:
            self.counters["unrouted reads"] += 1
            return (1 << (8 * size)) - 1
        self._sync_clock(io=True)
        try:
            value = self._mmio(addr, size, None)
        except Exception as e:  # noqa: BLE001
            self._guard(f"mmio read {addr:#x}", e)
            return 0
        self._after_io()
        return value & ((1 << (8 * size)) - 1)

    def _mmio_write(self, addr: int, size: int, value: int) -> None:
        self.counters["mmio writes"] += 1
        value &= (1 << (8 * size)) - 1
        if self._mmio is None:
            self._queue(MmioWrite(addr, value.to_bytes(size, "little")))
            return
        self._sync_clock(io=True)
        try:
            self._mmio(addr, size, value)
        except Exception as e:  # noqa: BLE001
            self._guard(f"mmio write {addr:#x}", e)
            return
        self._after_io()

    # ------------------------------------------------------------------ reports

    def _internal_error(self, why: str) -> Exit:
        rip = self.blob_rip()
        insn = b""
        try:
            v = self.view.load()
            mmu = Mmu(self.mem, v.cr0, v.cr3, v.cr4, v.efer)
            la = v.seg("cs")[1] + v.rip
            for n in (15, 8, 1):
                try:
                    insn = mmu.read(la, n)
                    break
                except (PageFault, BadPhysical):
                    continue
        except Exception:  # noqa: BLE001 - the report must not fail
            pass
        if "FETCH_UNMAPPED" in why or "fetch" in why.lower():
            why = f"instruction fetch outside RAM ({why})"
        return InternalError(f"emu: {why}", rip=rip, insn=insn)

    def stats(self) -> dict[str, int | float]:
        out: dict[str, int | float] = dict(self.counters)
        out["blocks executed" if self.native else "blocks executed (estimated)"] = \
            self.ctl.blocks
        out["native block hook"] = 1 if self.native else 0
        out["blocks counted in unicorn's TB-start helper"] = 1 if self.tb_counter else 0
        out["per-access exit checks"] = 0 if self.exit_checks.endswith(" off") else 1
        if self.cpu is not None:
            out["RDTSC (virtual TSC)"] = self.cpu.rdtsc
            out["MSR accesses through pyhv"] = self.cpu.msrs
        out["time in emu_start (s)"] = round(self.t_emu, 6)
        out["time outside emu_start (s)"] = round(max(0.0, self.t_run - self.t_emu), 6)
        for vec, n in sorted(self.vectors.items()):
            out[f"vector {vec:#x}"] = n
        return out

    def close(self) -> None:
        """Drop the unicorn instance (its memory mappings point into GuestMemory)."""
        self._final = InternalError("emu: the vCPU is closed")
        if self._unregister is not None:
            self._unregister()
        if self.cpu is not None:
            self._cpu_unregister()
        self.uc = None
