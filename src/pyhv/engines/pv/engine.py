"""The paravirtual engine: a kernel that asks instead of trapping, on the trap monitor.

Design: `pv` is the trap engine (engines/trap: the kernel deprivileged to CPL 3, shadow
GDT/IDT/page tables, the emulator for whatever privileged instruction is left) plus
pyhv's hypercall ABI (abi.py, docs/pv.md). A hypercall is a store to HCALL_GPA, which
has nothing behind it: an MMIO exit that `run()` intercepts before the machine sees
it. Arguments and results travel in the kernel's shared page (guest RAM), so a
hypercall needs no register ioctl; where pyhv must move the kernel (an event delivered
at a hypercall), it first lets KVM complete the store, as the trap engine does for a
guest MMIO access.

    CONSOLE_WRITE    one IoOut exit of the whole string to COM1 (the machine's UART)
    MMU_UPDATE       a batch of page-table entries written and validated in one exit;
                     the shadow page tables follow (as for an emulated store)
    SET_DESCRIPTORS  the virtual GDTR/IDTR (the shadow GDT rebuilt)
    SET_TIMER        pyhv programs the 8254's counter 0 for the kernel (IoOut exits
                     to the machine's PIT: engines never touch devices)
    SET_CALLBACK     where events go
    EVENT_POLL/HALT  a pending event now / "sti; hlt" in one step

The virtual IF lives in the shared page (VIF), which the kernel changes without exits;
the trap machinery's `VirtualCpu.if_` mirrors it (`_sync_vif`: whichever side changed
it last wins: the kernel's store, or an emulated IRETQ/CLI/STI). Events from the 8259
go to the callback, not through the IDT, once a shared page and a callback are
registered; a kernel that registers neither runs exactly as under `trap`.
"""

from __future__ import annotations

import struct
import time
from collections import Counter

from pyhv.arch.x86.cpustate import DescriptorTable
from pyhv.engines.pv import abi
from pyhv.engines.trap import guestmem
from pyhv.engines.trap.engine import TrapEngine, TrapVcpu
from pyhv.engines.trap.guestmem import GuestFault, canonical
from pyhv.engines.trap.paging import ADDR, P
from pyhv.exits import Exit, Halt, InternalError, IoOut, MmioWrite, Shutdown
from pyhv.memory import GuestMemory

COM1 = 0x3F8


class PvVcpu(TrapVcpu):
    """A deprivileged vCPU that also answers hypercalls."""

    shared: int | None = None
    callback: int | None = None

    def _pv_init(self) -> None:
        self.shared = None
        self.callback = None
        self.queued: list[Exit] = []
        self.pv_count: Counter[str] = Counter()
        self.vif_mirror = self.v.if_
        self.t0 = time.monotonic_ns()

    def run(self) -> Exit:
        if not hasattr(self, "queued"):
            self._pv_init()
        while True:
            if self.queued:
                return self.queued.pop(0)
            ex = super().run()
            if isinstance(ex, MmioWrite) and abi.HCALL_GPA <= ex.addr < abi.HCALL_GPA + 16:
                try:
                    out = self._hypercall(ex)
                except (OSError, ValueError, struct.error) as e:
                    return InternalError(f"pv engine failure: {type(e).__name__}: {e}", None)
                if out is not None:
                    return out
                continue
            return ex

    # ------------------------------------------------------------------ shared page

    def _u64(self, off: int) -> int:
        assert self.shared is not None
        return int.from_bytes(self.mem.read(self.shared + off, 8), "little")

    def _put(self, off: int, value: int, size: int = 8) -> None:
        assert self.shared is not None
        self.mem.write(self.shared + off, (value & ((1 << (8 * size)) - 1)).to_bytes(
            size, "little"))

    def _sync_vif(self) -> None:
        """VIF (the kernel's) and v.if_ (the emulator's): the side that changed wins."""
        if self.shared is None:
            return
        if self.v.if_ != self.vif_mirror:
            self._put(abi.SH_VIF, int(self.v.if_), 1)
        else:
            self.v.if_ = bool(self.mem.read(self.shared + abi.SH_VIF, 1)[0] & 1)
        self.vif_mirror = self.v.if_

    def _set_vif(self, on: bool) -> None:
        self.v.if_ = on
        self.vif_mirror = on
        self._put(abi.SH_VIF, int(on), 1)

    # ------------------------------------------------------------------ hypercalls

    def _hypercall(self, ex: MmioWrite) -> Exit | None:
        self.mmio_pending = True                  # KVM completes the store on resume
        rip = self.held.rip if self.held else None
        if ex.addr == abi.HCALL_REGISTER:
            gpa = int.from_bytes(bytes(ex.data[:8]).ljust(8, b"\0"), "little")
            if gpa & 0xFFF or not self.mem.contains(gpa, 0x1000):
                return InternalError(f"pv: the shared page at {gpa:#x} is not a page of "
                                     "guest RAM", rip)
            self.shared = gpa
            self.vif_mirror = not self.v.if_      # the emulator's IF wins at first sync
            self._sync_vif()
            self.pv_count["hypercall register"] += 1
            return None
        nr = int.from_bytes(bytes(ex.data[:4]).ljust(4, b"\0"), "little")
        if self.shared is None:
            return InternalError(f"pv: hypercall {nr} before a shared page is registered",
                                 rip)
        self._sync_vif()
        name = abi.NAMES.get(nr, f"unknown {nr}")
        self.pv_count[f"hypercall {name}"] += 1
        args = struct.unpack("<4Q", self.mem.read(self.shared + abi.SH_ARGS, 32))
        self._put(abi.SH_TIME, time.monotonic_ns() - self.t0)
        ret, out = self._dispatch(nr, args)
        self._put(abi.SH_RET, ret)
        return out

    def _dispatch(self, nr: int, a: tuple[int, ...]) -> tuple[int, Exit | None]:
        if nr == abi.CONSOLE_WRITE:
            ptr, n = a[0], a[1]
            if n > abi.MAX_CONSOLE:
                return abi.EINVAL, None
            try:
                data = guestmem.read(self.view, ptr, n) if n else b""
            except GuestFault:
                return abi.EFAULT, None
            return n, (IoOut(COM1, 1, data, count=n) if n else None)
        if nr == abi.MMU_UPDATE:
            return self._mmu_update(a[0], a[1]), None
        if nr == abi.SET_DESCRIPTORS:
            full = 0xFFFF_FFFF_FFFF_FFFF
            for base, limit in ((a[0], a[1]), (a[2], a[3])):
                if limit != full and (not canonical(base) or limit > 0xFFFF):
                    return abi.EINVAL, None
            if a[1] != full:
                self.v.gdt = DescriptorTable(a[0], a[1])
                self._reload_shadow()
            if a[3] != full:
                self.v.idt = DescriptorTable(a[2], a[3])
            return 0, None
        if nr == abi.SET_TIMER:
            hz = a[0]
            if hz == 0:
                self.queued.append(IoOut(0x43, 1, b"\x30"))    # counter 0, one-shot
                return 0, None
            if not 19 <= hz <= abi.PIT_HZ:
                return abi.EINVAL, None
            count = min(0xFFFF, max(1, round(abi.PIT_HZ / hz)))
            self.queued += [IoOut(0x43, 1, b"\x34"), IoOut(0x40, 1, bytes([count & 0xFF])),
                            IoOut(0x40, 1, bytes([count >> 8]))]
            return 0, None
        if nr == abi.SET_CALLBACK:
            if not canonical(a[0]):
                return abi.EINVAL, None
            self.callback = a[0]
            return 0, None
        if nr == abi.EVENT_POLL:
            self._put(abi.SH_PENDING, 0, 1)
            return 0, None
        if nr == abi.HALT:
            self._set_vif(True)
            src = self.interrupt_source
            if src is not None and src.pending():
                return 0, None                   # woken at once: delivered on resume
            return 0, Halt(interrupts_enabled=True)
        return abi.ENOSYS, None

    def _mmu_update(self, ptr: int, count: int) -> int:
        if count > abi.MAX_BATCH:
            return abi.EINVAL
        try:
            raw = guestmem.read(self.view, ptr, 16 * count) if count else b""
        except GuestFault:
            return abi.EFAULT
        done = 0
        for k in range(count):
            gpa, value = struct.unpack_from("<QQ", raw, 16 * k)
            frame = value & ADDR
            if gpa & 7 or not self.mem.contains(gpa, 8) or (
                    value & P and not self.mem.contains(frame, 0x1000)):
                self.pv_count["mmu update refused"] += 1
                return abi.EINVAL if done == 0 else done
            self.mem.write(gpa, value.to_bytes(8, "little"))
            if self.shadow is not None:
                self.shadow.written(gpa, 8)
            done += 1
        self.pv_count["mmu entries updated"] += done
        if self.shadow is None and done:
            self._complete_store()
            self._paging("cr3", 0)               # follow the kernel's own tables from now
        return done

    def _complete_store(self) -> None:
        """Let KVM finish the hypercall's store before registers or CR3 change."""
        if self.mmio_pending:
            self.kv.kvm_run.immediate_exit = 1
            self.kv.run()
            self.mmio_pending = False

    # ------------------------------------------------------------------ events

    def _trap(self, vector: int, kvm_s: float, t_exit: float) -> Exit | None:
        self._sync_vif()
        return super()._trap(vector, kvm_s, t_exit)

    def _maybe_interrupt(self) -> Exit | None:
        if not hasattr(self, "queued"):
            self._pv_init()
        if self.shared is None or self.callback is None:
            return super()._maybe_interrupt()
        self._sync_vif()
        src = self.interrupt_source
        if src is None or not src.pending():
            return None
        if not self.v.if_ or self.v.sti_shadow:
            self._put(abi.SH_PENDING, 1, 1)
            return None
        self._complete_store()
        vector = src.acknowledge()
        if vector is None:
            return None
        h = self._hold()
        v = self.v
        rsp = (h.rsp & ~0xF) - 40
        frame = struct.pack("<5Q", h.rip, v.cs.selector & 0xFFFC, v.rflags(h.rflags), h.rsp,
                            v.ss.selector)
        try:
            guestmem.write(self.view, rsp, frame)
        except GuestFault as f:
            return Shutdown(f"pv: the event frame cannot be written on the kernel's stack "
                            f"at {rsp:#x} (fault {f.vector})", h.rip)
        h.rsp, h.rip = rsp & 0xFFFF_FFFF_FFFF_FFFF, self.callback
        self._set_vif(False)
        self._put(abi.SH_PENDING, 0, 1)
        self._put(abi.SH_VECTOR, vector)
        self.trap_stats.interrupts += 1
        self.pv_count["events to the callback"] += 1
        return None

    def stats(self) -> dict[str, int | float]:
        out = super().stats()
        for k, n in sorted(getattr(self, "pv_count", Counter()).items()):
            out[f"pv {k}"] = n
        return out


class PvEngine(TrapEngine):
    """The trap engine plus pyhv's hypercall ABI (docs/pv.md)."""

    name = "pv"
    options = ()

    def __init__(self, memory: GuestMemory) -> None:
        super().__init__(memory, umip=False)

    def create_vcpu(self, index: int) -> PvVcpu:
        assert self.area is not None
        v = self.vm.create_vcpu(index)
        v.set_cpuid(self._cpuid)
        pv = PvVcpu(v, index, self.memory, self.area, umip=False)
        pv._pv_init()
        pv.resync = self._resync_monitor
        self.vcpus.append(pv)
        return pv
