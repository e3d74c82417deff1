"""ioctl numbers and the one function that issues them.

Design: every ioctl goes through `ioctl()`, a ctypes call into libc's ioctl(2). ctypes
(unlike `fcntl.ioctl`) passes unsigned 64-bit arguments intact (docs/host.md: the TSS address
0xfffbd000 overflows fcntl.ioctl's C int) and releases the GIL for the duration of the
call, so several vCPU threads run guest code at once. EINTR is returned to the caller
(KVM_RUN is interrupted on purpose to kick a vCPU); other errors raise OSError.

Numbers follow _IOC(dir, type, nr, size) from include/uapi/asm-generic/ioctl.h with
KVMIO = 0xAE (include/uapi/linux/kvm.h).
"""

from __future__ import annotations

import ctypes
import errno
import os

from pyhv.kvm import structs as s

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, t: type[ctypes._CData] | int) -> int:
    return _ioc(_IOC_READ, nr, t if isinstance(t, int) else ctypes.sizeof(t))


def _iow(nr: int, t: type[ctypes._CData] | int) -> int:
    return _ioc(_IOC_WRITE, nr, t if isinstance(t, int) else ctypes.sizeof(t))


def _iowr(nr: int, t: type[ctypes._CData] | int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, t if isinstance(t, int) else ctypes.sizeof(t))


# System ioctls
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, 4)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)
# VM ioctls
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, s.KvmDirtyLog)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, s.KvmUserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, s.KvmIrqLevel)
KVM_CREATE_PIT2 = _iow(0x77, s.KvmPitConfig)
# vCPU ioctls
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, s.KvmRegs)
KVM_SET_REGS = _iow(0x82, s.KvmRegs)
KVM_GET_SREGS = _ior(0x83, s.KvmSregs)
KVM_SET_SREGS = _iow(0x84, s.KvmSregs)
KVM_TRANSLATE = _iowr(0x85, s.KvmTranslation)
KVM_INTERRUPT = _iow(0x86, s.KvmInterrupt)
KVM_NMI = _io(0x9A)
KVM_ENABLE_CAP = _iow(0xA3, s.KvmEnableCap)
KVM_X86_SET_MSR_FILTER = _iow(0xC6, s.KvmMsrFilter)
KVM_GET_MSRS = _iowr(0x88, 8)
KVM_SET_MSRS = _iow(0x89, 8)
KVM_GET_FPU = _ior(0x8C, s.KvmFpu)
KVM_SET_FPU = _iow(0x8D, s.KvmFpu)
KVM_SET_CPUID2 = _iow(0x90, 8)
KVM_GET_CPUID2 = _iowr(0x91, 8)
KVM_GET_MP_STATE = _ior(0x98, s.KvmMpState)
KVM_SET_MP_STATE = _iow(0x99, s.KvmMpState)
KVM_SET_GUEST_DEBUG = _iow(0x9B, s.KvmGuestDebug)
KVM_GET_VCPU_EVENTS = _ior(0x9F, s.KvmVcpuEvents)
KVM_SET_VCPU_EVENTS = _iow(0xA0, s.KvmVcpuEvents)

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int


def ioctl(fd: int, request: int, arg: int | ctypes._CData | None = None) -> int:
    """ioctl(fd, request, arg): arg is an unsigned integer or a ctypes object (by pointer).

    Returns the (non-negative) result; raises OSError with errno on failure, except EINTR,
    which returns -EINTR.
    """
    if arg is None:
        ptr: int | None = 0
    elif isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.addressof(arg)
    r = _ioctl(fd, request, ptr)
    if r < 0:
        err = ctypes.get_errno()
        if err == errno.EINTR:
            return -errno.EINTR
        raise OSError(err, f"{os.strerror(err)} (ioctl {request:#x})")
    return int(r)
