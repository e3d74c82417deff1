"""A KVM virtual machine: memory slots, in-kernel devices, interrupt lines, dirty logs.

Design: `Vm` owns the VM file descriptor and the memory slots registered with it. Guest
memory is passed in as (gpa, size, host_addr) triples, so this module needs nothing of
pyhv's memory package. vCPUs are created here and wrapped by `Vcpu`.
"""

from __future__ import annotations

import ctypes
import os

from pyhv.kvm import ioctl as io
from pyhv.kvm import structs as s
from pyhv.kvm.ioctl import ioctl
from pyhv.kvm.system import Kvm
from pyhv.kvm.vcpu import Vcpu

KVM_CAP_X86_USER_SPACE_MSR = 188
MSR_EXIT_REASON_INVAL, MSR_EXIT_REASON_UNKNOWN, MSR_EXIT_REASON_FILTER = 1, 1 << 1, 1 << 2

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0


class Vm:
    """One KVM VM."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.fd = kvm.create_vm()
        self.slots: dict[int, tuple[int, int, int, int]] = {}  # slot -> (gpa, size, hva, flags)
        self.vcpus: list[Vcpu] = []

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # ------------------------------------------------------------------ memory

    def set_memory(self, slot: int, gpa: int, size: int, host_addr: int,
                   *, log_dirty: bool = False) -> None:
        """KVM_SET_USER_MEMORY_REGION: map host_addr..+size at gpa (size 0 deletes)."""
        flags = KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0
        region = s.KvmUserspaceMemoryRegion(slot=slot, flags=flags, guest_phys_addr=gpa,
                                            memory_size=size, userspace_addr=host_addr)
        ioctl(self.fd, io.KVM_SET_USER_MEMORY_REGION, region)
        if size:
            self.slots[slot] = (gpa, size, host_addr, flags)
        else:
            self.slots.pop(slot, None)

    def set_dirty_logging(self, enable: bool) -> None:
        """Turn KVM_MEM_LOG_DIRTY_PAGES on or off for every slot."""
        for slot, (gpa, size, hva, _) in list(self.slots.items()):
            self.set_memory(slot, gpa, size, hva, log_dirty=enable)

    def get_dirty_log(self, slot: int) -> list[int]:
        """KVM_GET_DIRTY_LOG: page indexes (relative to the slot) written since last call."""
        gpa, size, _, flags = self.slots[slot]
        if not flags & KVM_MEM_LOG_DIRTY_PAGES:
            raise ValueError(f"slot {slot} does not log dirty pages")
        npages = size >> 12
        words = (npages + 63) // 64
        bitmap = (ctypes.c_uint64 * words)()
        log = s.KvmDirtyLog(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        ioctl(self.fd, io.KVM_GET_DIRTY_LOG, log)
        pages: list[int] = []
        for w in range(words):
            bits = bitmap[w]
            while bits:
                low = bits & -bits
                pages.append(w * 64 + low.bit_length() - 1)
                bits ^= low
        return pages

    # ------------------------------------------------------------------ platform

    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR (needed on Intel before running real-mode code)."""
        ioctl(self.fd, io.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        ioctl(self.fd, io.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def route_msrs(self, ranges: list[tuple[int, int]]) -> bool:
        """RDMSR/WRMSR of the MSRs in `ranges` ((base, count) each) exit to user space
        (KVM_CAP_X86_USER_SPACE_MSR, reasons FILTER and UNKNOWN, and a filter denying
        exactly those); every MSR KVM knows stays KVM's. False if this KVM cannot
        (nothing changed then)."""
        cap = s.KvmEnableCap(cap=KVM_CAP_X86_USER_SPACE_MSR)
        # KVM never filters the x2APIC range 0x800-0x8ff (its API documentation); without
        # an in-kernel APIC an access there fails in KVM, so the "invalid" and "unknown"
        # exits bring those here, with every other access KVM would refuse (the engine
        # answers #GP for those, as KVM would)
        cap.args[0] = MSR_EXIT_REASON_INVAL | MSR_EXIT_REASON_UNKNOWN | \
            MSR_EXIT_REASON_FILTER
        flt = s.KvmMsrFilter(flags=0)                       # default: allow
        keep = []
        for i, (base, count) in enumerate(ranges):
            bitmap = (ctypes.c_uint8 * ((count + 7) // 8))()   # all 0: denied -> exit
            keep.append(bitmap)
            flt.ranges[i].flags = 3                           # reads and writes
            flt.ranges[i].nmsrs = count
            flt.ranges[i].base = base
            flt.ranges[i].bitmap = ctypes.addressof(bitmap)
        try:
            ioctl(self.fd, io.KVM_ENABLE_CAP, cap)
            ioctl(self.fd, io.KVM_X86_SET_MSR_FILTER, flt)   # KVM copies the bitmaps
        except OSError:
            return False
        return True

    def create_vcpu(self, index: int) -> Vcpu:
        fd = ioctl(self.fd, io.KVM_CREATE_VCPU, index)
        vcpu = Vcpu(fd, index, self.kvm.vcpu_mmap_size)
        self.vcpus.append(vcpu)
        return vcpu
