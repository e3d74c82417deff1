"""A KVM vCPU: KVM_RUN and typed exits, registers, special registers, MSRs, CPUID, events.

Design: `Vcpu` owns the vCPU file descriptor and its shared `kvm_run` page. `run()` calls
KVM_RUN and turns the exit into a typed `pyhv.exits` value; callers never read the raw
page. Port-in and MMIO-read exits carry a memoryview into the `kvm_run` page: whatever the
caller writes there before the next `run()` is what the guest's IN/MOV reads.

Kicking: `kick()` (any thread) sets `immediate_exit` and sends SIGUSR1 to the thread
inside KVM_RUN, so KVM_RUN returns EINTR at once or the next KVM_RUN does; `run()` then
returns `Interrupted`. KVM finishes a pending I/O completion before it honours
immediate_exit, so no guest I/O is lost by a kick.

SIGUSR1's disposition is checked when the signal is delivered, not when it is sent: a
kick sent to a vCPU thread that the host does not schedule before the process exits is
delivered late. Python's finalization puts every signal it handles back to SIG_DFL, whose
action for SIGUSR1 is to kill the process; so an atexit hook (run before that) sets the
kick signal to SIG_IGN, which also discards a kick still pending. A loaded host killed
`pyhv run --engine kvm --cpus 4` with SIGUSR1 that way at the end of a finished run.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import mmap
import os
import signal
import threading
from dataclasses import dataclass

from pyhv.exits import (
    Exit,
    Halt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
)
from pyhv.kvm import ioctl as io
from pyhv.kvm import structs as s
from pyhv.kvm.ioctl import ioctl

# Exit reasons (include/uapi/linux/kvm.h)
EXIT_NAMES = {
    0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT", 6: "MMIO",
    7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 11: "SET_TPR",
    12: "TPR_ACCESS", 17: "INTERNAL_ERROR", 24: "SYSTEM_EVENT", 29: "X86_RDMSR",
    30: "X86_WRMSR",
}
KVM_EXIT_IO, KVM_EXIT_HLT, KVM_EXIT_MMIO = 2, 5, 6
KVM_EXIT_IRQ_WINDOW_OPEN, KVM_EXIT_SHUTDOWN, KVM_EXIT_FAIL_ENTRY = 7, 8, 9
KVM_EXIT_INTR, KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_SYSTEM_EVENT = 10, 17, 24
KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1
KVM_EXIT_X86_RDMSR, KVM_EXIT_X86_WRMSR = 29, 30
KVM_INTERNAL_ERROR_EMULATION = 1
INTERNAL_SUBERRORS = {1: "emulation failure", 2: "simultaneous exceptions",
                      3: "delivery event", 4: "unexpected exit reason"}
SYSTEM_EVENTS = {1: "shutdown", 2: "reset", 3: "crash"}
KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_HALTED = 0, 3

KICK_SIGNAL = signal.SIGUSR1


@dataclass(slots=True)
class MsrAccess(Exit):
    """KVM_EXIT_X86_RDMSR/WRMSR of a filtered MSR (`Vm.route_msrs`): `value` is None for
    a read. The KVM engine answers it with `Vcpu.complete_msr` and runs on; no run loop
    sees it."""
    index: int
    value: int | None


@dataclass(slots=True)
class IrqWindowOpen(Exit):
    """KVM_EXIT_IRQ_WINDOW_OPEN: the guest can now take the external interrupt the
    caller asked a window for (`request_interrupt_window`). KVM's own business: the KVM
    engine injects the interrupt and runs on, so no run loop ever sees this exit (it is
    not one of the shared exits in `pyhv.exits`)."""
_kick_installed = False


def install_kick_handler() -> None:
    """Give SIGUSR1 a no-op handler (must run on the main thread, once)."""
    global _kick_installed
    if not _kick_installed and threading.current_thread() is threading.main_thread():
        signal.signal(KICK_SIGNAL, lambda _sig, _frame: None)
        atexit.register(_ignore_kicks_at_exit)
        _kick_installed = True


def _ignore_kicks_at_exit() -> None:
    """At interpreter exit (before Python resets its handlers to SIG_DFL): a late or
    pending kick is ignored instead of killing the process."""
    signal.signal(KICK_SIGNAL, signal.SIG_IGN)


class Vcpu:
    """One KVM vCPU."""

    def __init__(self, fd: int, index: int, mmap_size: int) -> None:
        self.fd = fd
        self.index = index
        self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        self._page = memoryview(self._map)
        self.kvm_run = s.KvmRun.from_buffer(self._map)
        self._thread_id: int | None = None
        self.exit_counts: dict[str, int] = {}
        install_kick_handler()

    def close(self) -> None:
        if self.fd >= 0:
            del self.kvm_run
            self._page.release()
            # A caller may still hold an IoIn/MmioRead exit's data view into the page:
            # then the mapping is unmapped when the last such view goes away.
            with contextlib.suppress(BufferError):
                self._map.close()
            os.close(self.fd)
            self.fd = -1

    # ------------------------------------------------------------------ running

    def run(self) -> Exit:
        """KVM_RUN once and decode the exit."""
        kr = self.kvm_run
        self._thread_id = threading.get_ident()
        r = ioctl(self.fd, io.KVM_RUN)
        if r == -errno.EINTR:
            kr.immediate_exit = 0
            self._count("INTR")
            return Interrupted()
        reason = kr.exit_reason
        if reason == KVM_EXIT_IO:
            iox = kr.u.io
            size, count, off = iox.size, iox.count, iox.data_offset
            data = self._page[off:off + size * count]
            if iox.direction == KVM_EXIT_IO_OUT:
                self._count("IO_OUT")
                return IoOut(iox.port, size, bytes(data), count)
            self._count("IO_IN")
            return IoIn(iox.port, size, data, count)
        if reason == KVM_EXIT_MMIO:
            m = kr.u.mmio
            length = min(m.len, 8)
            if m.is_write:
                self._count("MMIO_WRITE")
                return MmioWrite(m.phys_addr, bytes(m.data)[:length])
            self._count("MMIO_READ")
            off = s.KvmRun.u.offset + s.KvmRunMmio.data.offset
            return MmioRead(m.phys_addr, self._page[off:off + length])
        self._count(EXIT_NAMES.get(reason, str(reason)))
        if reason in (KVM_EXIT_X86_RDMSR, KVM_EXIT_X86_WRMSR):
            m = kr.u.msr
            return MsrAccess(m.index, int(m.data) if reason == KVM_EXIT_X86_WRMSR else None)
        if reason == KVM_EXIT_HLT:
            return Halt(interrupts_enabled=bool(kr.if_flag))
        if reason == KVM_EXIT_IRQ_WINDOW_OPEN:
            return IrqWindowOpen()
        if reason == KVM_EXIT_INTR:
            return Interrupted()
        if reason == KVM_EXIT_SHUTDOWN:
            return Shutdown("triple fault (KVM_EXIT_SHUTDOWN)", self.get_regs().rip)
        if reason == KVM_EXIT_SYSTEM_EVENT:
            kind = SYSTEM_EVENTS.get(kr.u.system_event.type, str(kr.u.system_event.type))
            return Shutdown(f"system event: {kind}", self.get_regs().rip)
        if reason == KVM_EXIT_INTERNAL_ERROR:
            return self._internal_error()
        if reason == KVM_EXIT_FAIL_ENTRY:
            hw = kr.u.fail_entry.hardware_entry_failure_reason
            return InternalError(f"KVM could not enter the guest (hardware reason {hw:#x})",
                                 self.get_regs().rip, detail={"hardware_reason": hw})
        return InternalError(f"unexpected KVM exit {EXIT_NAMES.get(reason, reason)}",
                             self.get_regs().rip, detail={"exit_reason": reason})

    def _internal_error(self) -> InternalError:
        kr = self.kvm_run
        sub = kr.u.internal.suberror
        insn = b""
        if sub == KVM_INTERNAL_ERROR_EMULATION:
            ef = kr.u.emulation_failure
            if kr.u.internal.ndata >= 2 and ef.flags & 1:
                insn = bytes(ef.insn_bytes)[:min(ef.insn_size, 15)]
        detail = {"suberror": sub}
        detail.update({f"data{i}": kr.u.internal.data[i]
                       for i in range(min(kr.u.internal.ndata, 16))})
        return InternalError(f"KVM internal error: {INTERNAL_SUBERRORS.get(sub, sub)}",
                             self.get_regs().rip, insn, detail)

    def _count(self, name: str) -> None:
        self.exit_counts[name] = self.exit_counts.get(name, 0) + 1

    def kick(self) -> None:
        """Make the current or next KVM_RUN return soon (callable from any thread; a
        no-op once the vCPU is closed, since input or a signal may arrive as it closes)."""
        kr = getattr(self, "kvm_run", None)   # close() deletes it; this reference keeps
        if kr is None:                        # the page mapped while we write to it
            return
        kr.immediate_exit = 1
        tid = self._thread_id
        if tid is not None and tid != threading.get_ident():
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pthread_kill(tid, KICK_SIGNAL)

    def complete_msr(self, value: int, fault: bool) -> None:
        """Answer the MSR exit: the value read (RDMSR), or #GP(0) when `fault`."""
        m = self.kvm_run.u.msr
        m.error = 1 if fault else 0
        m.data = value & 0xFFFFFFFFFFFFFFFF

    def request_interrupt_window(self, on: bool) -> None:
        self.kvm_run.request_interrupt_window = 1 if on else 0

    @property
    def ready_for_interrupt(self) -> bool:
        """KVM can inject an external interrupt now (IF=1, no shadow, none pending)."""
        return bool(self.kvm_run.ready_for_interrupt_injection and self.kvm_run.if_flag)

    def nmi(self) -> None:
        """KVM_NMI: queue an NMI; KVM delivers it whatever IF and blocks NMIs until the
        handler's IRET itself."""
        ioctl(self.fd, io.KVM_NMI)

    def interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT: queue an external interrupt (userspace irqchip only)."""
        ioctl(self.fd, io.KVM_INTERRUPT, s.KvmInterrupt(irq=vector))

    # ------------------------------------------------------------------ state

    def get_regs(self) -> s.KvmRegs:
        regs = s.KvmRegs()
        ioctl(self.fd, io.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: s.KvmRegs) -> None:
        ioctl(self.fd, io.KVM_SET_REGS, regs)

    def get_sregs(self) -> s.KvmSregs:
        sregs = s.KvmSregs()
        ioctl(self.fd, io.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: s.KvmSregs) -> None:
        ioctl(self.fd, io.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> s.KvmFpu:
        fpu = s.KvmFpu()
        ioctl(self.fd, io.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: s.KvmFpu) -> None:
        ioctl(self.fd, io.KVM_SET_FPU, fpu)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS for indices; MSRs KVM refuses are left out of the result."""
        buf = s.msrs_buffer(len(indices))()
        buf.nmsrs = len(indices)
        for i, idx in enumerate(indices):
            buf.entries[i].index = idx
        n = ioctl(self.fd, io.KVM_GET_MSRS, buf)
        out = {buf.entries[i].index: buf.entries[i].data for i in range(n)}
        if n < len(indices):  # stopped at a refused MSR: read the rest one by one
            for idx in indices[n + 1:]:
                out.update(self.get_msrs([idx]))
        return out

    def set_msrs(self, values: dict[int, int]) -> int:
        """KVM_SET_MSRS; returns how many were accepted (stops at the first refused)."""
        buf = s.msrs_buffer(len(values))()
        buf.nmsrs = len(values)
        for i, (idx, val) in enumerate(values.items()):
            buf.entries[i].index = idx
            buf.entries[i].data = val
        return ioctl(self.fd, io.KVM_SET_MSRS, buf)

    def set_cpuid(self, entries: list[s.KvmCpuidEntry2]) -> None:
        buf = s.cpuid_buffer(len(entries))()
        buf.nent = len(entries)
        for i, e in enumerate(entries):
            buf.entries[i] = e
        ioctl(self.fd, io.KVM_SET_CPUID2, buf)

    def get_events(self) -> s.KvmVcpuEvents:
        ev = s.KvmVcpuEvents()
        ioctl(self.fd, io.KVM_GET_VCPU_EVENTS, ev)
        return ev

    def set_events(self, ev: s.KvmVcpuEvents) -> None:
        ioctl(self.fd, io.KVM_SET_VCPU_EVENTS, ev)

    def get_mp_state(self) -> int:
        st = s.KvmMpState()
        ioctl(self.fd, io.KVM_GET_MP_STATE, st)
        return int(st.mp_state)

    def translate(self, gva: int) -> int | None:
        """KVM_TRANSLATE: guest-virtual -> guest-physical, None if unmapped."""
        t = s.KvmTranslation(linear_address=gva)
        try:
            ioctl(self.fd, io.KVM_TRANSLATE, t)
        except OSError:
            return None
        return int(t.physical_address) if t.valid else None
