"""ctypes mirrors of the KVM ABI structures used by pyhv (x86-64).

Source: include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h. Sizes are checked
at import (`_SIZES`): a mismatch would silently corrupt every ioctl, so it is fatal.
"""

from __future__ import annotations

import ctypes

u8, u16, u32, u64, i32 = (ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64,
                          ctypes.c_int32)


class KvmRegs(ctypes.Structure):
    _fields_ = [(n, u64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class KvmSegment(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8), ("g", u8),
                ("avl", u8), ("unusable", u8), ("padding", u8)]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class KvmSregs(ctypes.Structure):
    _fields_ = [("cs", KvmSegment), ("ds", KvmSegment), ("es", KvmSegment),
                ("fs", KvmSegment), ("gs", KvmSegment), ("ss", KvmSegment),
                ("tr", KvmSegment), ("ldt", KvmSegment), ("gdt", KvmDtable),
                ("idt", KvmDtable), ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64),
                ("cr8", u64), ("efer", u64), ("apic_base", u64),
                ("interrupt_bitmap", u64 * 4)]


class KvmFpu(ctypes.Structure):
    _fields_ = [("fpr", u8 * 128), ("fcw", u16), ("fsw", u16), ("ftwx", u8), ("pad1", u8),
                ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64),
                ("xmm", u8 * 256), ("mxcsr", u32), ("pad2", u32)]


class KvmMsrEntry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32),
                ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class KvmDirtyLog(ctypes.Structure):
    _fields_ = [("slot", u32), ("padding", u32), ("dirty_bitmap", u64)]


class KvmIrqLevel(ctypes.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class KvmInterrupt(ctypes.Structure):
    _fields_ = [("irq", u32)]


class KvmPitConfig(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class KvmMpState(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class KvmVcpuEvents(ctypes.Structure):
    _fields_ = [("exc_injected", u8), ("exc_nr", u8), ("exc_has_error_code", u8),
                ("exc_pending", u8), ("exc_error_code", u32),
                ("int_injected", u8), ("int_nr", u8), ("int_soft", u8), ("int_shadow", u8),
                ("nmi_injected", u8), ("nmi_pending", u8), ("nmi_masked", u8),
                ("nmi_pad", u8), ("sipi_vector", u32), ("flags", u32),
                ("smi_smm", u8), ("smi_pending", u8), ("smi_inside_nmi", u8),
                ("smi_latched_init", u8), ("reserved", u8 * 27),
                ("exception_has_payload", u8), ("exception_payload", u64)]


class KvmTranslation(ctypes.Structure):
    _fields_ = [("linear_address", u64), ("physical_address", u64), ("valid", u8),
                ("writeable", u8), ("usermode", u8), ("pad", u8 * 5)]


class KvmGuestDebug(ctypes.Structure):
    _fields_ = [("control", u32), ("pad", u32), ("debugreg", u64 * 8)]


# The fixed head of struct kvm_run and the union members pyhv reads (offset 32).
class KvmRunIo(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class KvmRunMmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class KvmRunInternal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class KvmRunEmulationFailure(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("flags", u64), ("insn_size", u8),
                ("insn_bytes", u8 * 15)]


class KvmRunFailEntry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class KvmRunSystemEvent(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class KvmRunException(ctypes.Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class KvmRunMsr(ctypes.Structure):
    """KVM_EXIT_X86_RDMSR / WRMSR (KVM_CAP_X86_USER_SPACE_MSR)."""
    _fields_ = [("error", u8), ("pad", u8 * 7), ("reason", u32), ("index", u32),
                ("data", u64)]


class KvmEnableCap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class KvmMsrFilterRange(ctypes.Structure):
    _fields_ = [("flags", u32), ("nmsrs", u32), ("base", u32), ("bitmap", ctypes.c_void_p)]


class KvmMsrFilter(ctypes.Structure):
    _fields_ = [("flags", u32), ("ranges", KvmMsrFilterRange * 16)]


class KvmRunUnion(ctypes.Union):
    _fields_ = [("io", KvmRunIo), ("mmio", KvmRunMmio), ("internal", KvmRunInternal),
                ("msr", KvmRunMsr),
                ("emulation_failure", KvmRunEmulationFailure),
                ("fail_entry", KvmRunFailEntry), ("system_event", KvmRunSystemEvent),
                ("ex", KvmRunException), ("hw_exit_reason", u64), ("padding", ctypes.c_char * 256)]


class KvmRun(ctypes.Structure):
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8),
                ("padding1", u8 * 6), ("exit_reason", u32),
                ("ready_for_interrupt_injection", u8), ("if_flag", u8), ("flags", u16),
                ("cr8", u64), ("apic_base", u64), ("u", KvmRunUnion)]


_SIZES = {KvmRegs: 144, KvmSegment: 24, KvmDtable: 16, KvmSregs: 312, KvmFpu: 416,
          KvmMsrEntry: 16, KvmCpuidEntry2: 40, KvmUserspaceMemoryRegion: 32, KvmDirtyLog: 16,
          KvmIrqLevel: 8, KvmPitConfig: 64, KvmVcpuEvents: 64, KvmTranslation: 24,
          KvmGuestDebug: 72, KvmEnableCap: 104, KvmMsrFilterRange: 24, KvmMsrFilter: 392}
for _t, _n in _SIZES.items():
    if ctypes.sizeof(_t) != _n:  # pragma: no cover - ABI guard
        raise ImportError(f"{_t.__name__} is {ctypes.sizeof(_t)} bytes, KVM expects {_n}")
if KvmRun.u.offset != 32:  # pragma: no cover - ABI guard
    raise ImportError("kvm_run union is not at offset 32")


def msrs_buffer(n: int) -> type[ctypes.Structure]:
    """struct kvm_msrs with room for n entries."""
    class KvmMsrs(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", KvmMsrEntry * n)]
    return KvmMsrs


def cpuid_buffer(n: int) -> type[ctypes.Structure]:
    """struct kvm_cpuid2 with room for n entries."""
    class KvmCpuid2(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", KvmCpuidEntry2 * n)]
    return KvmCpuid2


def u32_list_buffer(n: int) -> type[ctypes.Structure]:
    """struct kvm_msr_list with room for n indices."""
    class KvmMsrList(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("indices", u32 * n)]
    return KvmMsrList
