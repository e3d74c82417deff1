"""The /dev/kvm system handle: API version, capabilities, host-wide queries, VM creation.

Design: `Kvm` wraps the open /dev/kvm file descriptor. It issues only system ioctls and
creates `Vm`s; it knows nothing of guests or devices. Opening fails with `HostError`
naming the reason (missing node, permission, wrong API version).
"""

from __future__ import annotations

import os

from pyhv.errors import HostError
from pyhv.kvm import ioctl as io
from pyhv.kvm import structs as s
from pyhv.kvm.ioctl import ioctl

KVM_API_VERSION = 12

# Capability numbers (include/uapi/linux/kvm.h) that pyhv reports or relies on.
CAPS: dict[str, int] = {
    "KVM_CAP_IRQCHIP": 0,
    "KVM_CAP_HLT": 1,
    "KVM_CAP_USER_MEMORY": 3,
    "KVM_CAP_SET_TSS_ADDR": 4,
    "KVM_CAP_EXT_CPUID": 7,
    "KVM_CAP_NR_VCPUS": 9,
    "KVM_CAP_NR_MEMSLOTS": 10,
    "KVM_CAP_PIT": 11,
    "KVM_CAP_MP_STATE": 14,
    "KVM_CAP_SYNC_MMU": 16,
    "KVM_CAP_IRQ_ROUTING": 25,
    "KVM_CAP_SET_GUEST_DEBUG": 23,
    "KVM_CAP_PIT2": 33,
    "KVM_CAP_SET_IDENTITY_MAP_ADDR": 37,
    "KVM_CAP_VCPU_EVENTS": 41,
    "KVM_CAP_ADJUST_CLOCK": 39,
    "KVM_CAP_XSAVE": 55,
    "KVM_CAP_XCRS": 56,
    "KVM_CAP_TSC_CONTROL": 60,
    "KVM_CAP_MAX_VCPUS": 66,
    "KVM_CAP_IMMEDIATE_EXIT": 136,
    "KVM_CAP_X86_DISABLE_EXITS": 143,
}


class Kvm:
    """An open /dev/kvm."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise HostError(f"{path} does not exist: the kvm module is not loaded "
                            "or this host offers no hardware-assisted virtualization") from None
        except PermissionError:
            raise HostError(f"{path}: permission denied (add yourself to the 'kvm' group "
                            "or run as root)") from None
        except OSError as e:
            raise HostError(f"{path}: {e.strerror}") from None
        self.path = path
        try:
            self.api_version = ioctl(self.fd, io.KVM_GET_API_VERSION)
            if self.api_version != KVM_API_VERSION:
                raise HostError(f"{path}: KVM API version {self.api_version}, "
                                f"pyhv needs {KVM_API_VERSION}")
            self.vcpu_mmap_size = ioctl(self.fd, io.KVM_GET_VCPU_MMAP_SIZE)
        except OSError as e:  # e.g. a path that is not a KVM device (ENOTTY)
            os.close(self.fd)
            self.fd = -1
            raise HostError(f"{path} is not a usable KVM device: {e.strerror}") from None
        except HostError:
            os.close(self.fd)
            self.fd = -1
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_extension(self, cap: int | str) -> int:
        """KVM_CHECK_EXTENSION: 0 when absent, else a capability-specific value."""
        num = CAPS[cap] if isinstance(cap, str) else cap
        try:
            return ioctl(self.fd, io.KVM_CHECK_EXTENSION, num)
        except OSError:
            return 0

    def capabilities(self) -> dict[str, int]:
        return {name: self.check_extension(num) for name, num in CAPS.items()}

    def supported_cpuid(self) -> list[s.KvmCpuidEntry2]:
        """KVM_GET_SUPPORTED_CPUID: the leaves this host lets a guest see."""
        n = 64
        while n <= 4096:
            buf = s.cpuid_buffer(n)()
            buf.nent = n
            try:
                ioctl(self.fd, io.KVM_GET_SUPPORTED_CPUID, buf)
            except OSError as e:
                if e.errno == 7:  # E2BIG: more entries than we made room for
                    n *= 2
                    continue
                raise
            return [buf.entries[i] for i in range(buf.nent)]
        raise HostError("KVM_GET_SUPPORTED_CPUID returned too many entries")

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: MSRs KVM saves/restores for a guest."""
        probe = s.u32_list_buffer(0)()
        try:
            ioctl(self.fd, io.KVM_GET_MSR_INDEX_LIST, probe)
        except OSError as e:
            if e.errno != 7:
                raise
        buf = s.u32_list_buffer(probe.nmsrs)()
        buf.nmsrs = probe.nmsrs
        ioctl(self.fd, io.KVM_GET_MSR_INDEX_LIST, buf)
        return [buf.indices[i] for i in range(buf.nmsrs)]

    def create_vm(self) -> int:
        """KVM_CREATE_VM: a new VM file descriptor (wrapped by `Vm`)."""
        return ioctl(self.fd, io.KVM_CREATE_VM, 0)
