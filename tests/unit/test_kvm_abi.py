"""The KVM binding's ABI (pyhv.kvm.structs, pyhv.kvm.ioctl) without /dev/kvm.

Two checks: the values written down here (from include/uapi/linux/kvm.h and
arch/x86/include/uapi/asm/kvm.h), and, where gcc and the kernel headers are installed, a
small C program compiled at test time that prints the same sizes, offsets and ioctl
numbers, so a drifted struct can never go unnoticed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pyhv.kvm import ioctl as io
from pyhv.kvm import structs as s

# (python struct, C struct name, size in bytes) - from the kernel's uapi headers.
SIZES = [
    (s.KvmRegs, "kvm_regs", 144), (s.KvmSegment, "kvm_segment", 24),
    (s.KvmDtable, "kvm_dtable", 16), (s.KvmSregs, "kvm_sregs", 312),
    (s.KvmFpu, "kvm_fpu", 416), (s.KvmMsrEntry, "kvm_msr_entry", 16),
    (s.KvmCpuidEntry2, "kvm_cpuid_entry2", 40),
    (s.KvmUserspaceMemoryRegion, "kvm_userspace_memory_region", 32),
    (s.KvmDirtyLog, "kvm_dirty_log", 16), (s.KvmIrqLevel, "kvm_irq_level", 8),
    (s.KvmInterrupt, "kvm_interrupt", 4), (s.KvmPitConfig, "kvm_pit_config", 64),
    (s.KvmMpState, "kvm_mp_state", 4), (s.KvmVcpuEvents, "kvm_vcpu_events", 64),
    (s.KvmTranslation, "kvm_translation", 24), (s.KvmGuestDebug, "kvm_guest_debug", 72),
]

# (C expression for offsetof, python offset, expected value)
OFFSETS = [
    ("kvm_run", "exit_reason", s.KvmRun.exit_reason.offset, 8),
    ("kvm_run", "ready_for_interrupt_injection",
     s.KvmRun.ready_for_interrupt_injection.offset, 12),
    ("kvm_run", "if_flag", s.KvmRun.if_flag.offset, 13),
    ("kvm_run", "cr8", s.KvmRun.cr8.offset, 16),
    ("kvm_run", "apic_base", s.KvmRun.apic_base.offset, 24),
    ("kvm_run", "io", s.KvmRun.u.offset, 32),
    ("kvm_run", "io.port", s.KvmRun.u.offset + s.KvmRunIo.port.offset, 34),
    ("kvm_run", "io.count", s.KvmRun.u.offset + s.KvmRunIo.count.offset, 36),
    ("kvm_run", "io.data_offset", s.KvmRun.u.offset + s.KvmRunIo.data_offset.offset, 40),
    ("kvm_run", "mmio.data", s.KvmRun.u.offset + s.KvmRunMmio.data.offset, 40),
    ("kvm_run", "mmio.len", s.KvmRun.u.offset + s.KvmRunMmio.len.offset, 48),
    ("kvm_run", "mmio.is_write", s.KvmRun.u.offset + s.KvmRunMmio.is_write.offset, 52),
    ("kvm_run", "internal.ndata", s.KvmRun.u.offset + s.KvmRunInternal.ndata.offset, 36),
    ("kvm_run", "internal.data", s.KvmRun.u.offset + s.KvmRunInternal.data.offset, 40),
    ("kvm_run", "emulation_failure.flags",
     s.KvmRun.u.offset + s.KvmRunEmulationFailure.flags.offset, 40),
    ("kvm_run", "emulation_failure.insn_size",
     s.KvmRun.u.offset + s.KvmRunEmulationFailure.insn_size.offset, 48),
    ("kvm_run", "emulation_failure.insn_bytes",
     s.KvmRun.u.offset + s.KvmRunEmulationFailure.insn_bytes.offset, 49),
    ("kvm_run", "fail_entry.cpu", s.KvmRun.u.offset + s.KvmRunFailEntry.cpu.offset, 40),
    ("kvm_run", "system_event.type",
     s.KvmRun.u.offset + s.KvmRunSystemEvent.type.offset, 32),
    ("kvm_run", "ex.error_code", s.KvmRun.u.offset + s.KvmRunException.error_code.offset, 36),
    ("kvm_sregs", "gdt", s.KvmSregs.gdt.offset, 192),
    ("kvm_sregs", "idt", s.KvmSregs.idt.offset, 208),
    ("kvm_sregs", "cr0", s.KvmSregs.cr0.offset, 224),
    ("kvm_sregs", "efer", s.KvmSregs.efer.offset, 264),
    ("kvm_sregs", "apic_base", s.KvmSregs.apic_base.offset, 272),
    ("kvm_sregs", "interrupt_bitmap", s.KvmSregs.interrupt_bitmap.offset, 280),
    ("kvm_segment", "selector", s.KvmSegment.selector.offset, 12),
    ("kvm_segment", "unusable", s.KvmSegment.unusable.offset, 22),
    ("kvm_regs", "rip", s.KvmRegs.rip.offset, 128),
    ("kvm_fpu", "xmm", s.KvmFpu.xmm.offset, 152),
    ("kvm_fpu", "mxcsr", s.KvmFpu.mxcsr.offset, 416 - 8),
    ("kvm_vcpu_events", "sipi_vector", s.KvmVcpuEvents.sipi_vector.offset, 16),
    ("kvm_vcpu_events", "flags", s.KvmVcpuEvents.flags.offset, 20),
    ("kvm_vcpu_events", "exception_payload", s.KvmVcpuEvents.exception_payload.offset, 56),
    ("kvm_userspace_memory_region", "guest_phys_addr",
     s.KvmUserspaceMemoryRegion.guest_phys_addr.offset, 8),
    ("kvm_userspace_memory_region", "userspace_addr",
     s.KvmUserspaceMemoryRegion.userspace_addr.offset, 24),
    ("kvm_dirty_log", "dirty_bitmap", s.KvmDirtyLog.dirty_bitmap.offset, 8),
    ("kvm_cpuid_entry2", "edx", s.KvmCpuidEntry2.edx.offset, 24),
]

# (name, value in pyhv, value from the kernel headers)
IOCTLS = [
    ("KVM_GET_API_VERSION", io.KVM_GET_API_VERSION, 0xAE00),
    ("KVM_CREATE_VM", io.KVM_CREATE_VM, 0xAE01),
    ("KVM_GET_MSR_INDEX_LIST", io.KVM_GET_MSR_INDEX_LIST, 0xC004AE02),
    ("KVM_CHECK_EXTENSION", io.KVM_CHECK_EXTENSION, 0xAE03),
    ("KVM_GET_VCPU_MMAP_SIZE", io.KVM_GET_VCPU_MMAP_SIZE, 0xAE04),
    ("KVM_GET_SUPPORTED_CPUID", io.KVM_GET_SUPPORTED_CPUID, 0xC008AE05),
    ("KVM_CREATE_VCPU", io.KVM_CREATE_VCPU, 0xAE41),
    ("KVM_GET_DIRTY_LOG", io.KVM_GET_DIRTY_LOG, 0x4010AE42),
    ("KVM_SET_USER_MEMORY_REGION", io.KVM_SET_USER_MEMORY_REGION, 0x4020AE46),
    ("KVM_SET_TSS_ADDR", io.KVM_SET_TSS_ADDR, 0xAE47),
    ("KVM_SET_IDENTITY_MAP_ADDR", io.KVM_SET_IDENTITY_MAP_ADDR, 0x4008AE48),
    ("KVM_CREATE_IRQCHIP", io.KVM_CREATE_IRQCHIP, 0xAE60),
    ("KVM_IRQ_LINE", io.KVM_IRQ_LINE, 0x4008AE61),
    ("KVM_CREATE_PIT2", io.KVM_CREATE_PIT2, 0x4040AE77),
    ("KVM_RUN", io.KVM_RUN, 0xAE80),
    ("KVM_GET_REGS", io.KVM_GET_REGS, 0x8090AE81),
    ("KVM_SET_REGS", io.KVM_SET_REGS, 0x4090AE82),
    ("KVM_GET_SREGS", io.KVM_GET_SREGS, 0x8138AE83),
    ("KVM_SET_SREGS", io.KVM_SET_SREGS, 0x4138AE84),
    ("KVM_TRANSLATE", io.KVM_TRANSLATE, 0xC018AE85),
    ("KVM_INTERRUPT", io.KVM_INTERRUPT, 0x4004AE86),
    ("KVM_GET_MSRS", io.KVM_GET_MSRS, 0xC008AE88),
    ("KVM_SET_MSRS", io.KVM_SET_MSRS, 0x4008AE89),
    ("KVM_GET_FPU", io.KVM_GET_FPU, 0x81A0AE8C),
    ("KVM_SET_FPU", io.KVM_SET_FPU, 0x41A0AE8D),
    ("KVM_SET_CPUID2", io.KVM_SET_CPUID2, 0x4008AE90),
    ("KVM_GET_CPUID2", io.KVM_GET_CPUID2, 0xC008AE91),
    ("KVM_GET_MP_STATE", io.KVM_GET_MP_STATE, 0x8004AE98),
    ("KVM_SET_MP_STATE", io.KVM_SET_MP_STATE, 0x4004AE99),
    ("KVM_SET_GUEST_DEBUG", io.KVM_SET_GUEST_DEBUG, 0x4048AE9B),
    ("KVM_GET_VCPU_EVENTS", io.KVM_GET_VCPU_EVENTS, 0x8040AE9F),
    ("KVM_SET_VCPU_EVENTS", io.KVM_SET_VCPU_EVENTS, 0x4040AEA0),
]


@pytest.mark.parametrize("cls,cname,size", SIZES, ids=[c for _, c, _ in SIZES])
def test_struct_sizes(cls: type[ctypes.Structure], cname: str, size: int) -> None:
    assert ctypes.sizeof(cls) == size


@pytest.mark.parametrize("struct,field,got,want", OFFSETS,
                         ids=[f"{a}.{b}" for a, b, _, _ in OFFSETS])
def test_field_offsets(struct: str, field: str, got: int, want: int) -> None:
    assert got == want


def test_variable_length_buffers() -> None:
    # struct kvm_msrs / kvm_cpuid2 are an 8-byte head and the entries; kvm_msr_list 4.
    assert ctypes.sizeof(s.msrs_buffer(0)) == 8
    assert ctypes.sizeof(s.msrs_buffer(3)) == 8 + 3 * 16
    assert s.msrs_buffer(3).entries.offset == 8
    assert ctypes.sizeof(s.cpuid_buffer(0)) == 8
    assert ctypes.sizeof(s.cpuid_buffer(5)) == 8 + 5 * 40
    assert s.cpuid_buffer(5).entries.offset == 8
    assert ctypes.sizeof(s.u32_list_buffer(0)) == 4
    assert s.u32_list_buffer(7).indices.offset == 4
    assert ctypes.sizeof(s.u32_list_buffer(7)) == 4 + 7 * 4


def test_kvm_run_union_is_large_enough() -> None:
    assert ctypes.sizeof(s.KvmRunUnion) == 256
    assert ctypes.sizeof(s.KvmRun) == 32 + 256


@pytest.mark.parametrize("name,got,want", IOCTLS, ids=[n for n, _, _ in IOCTLS])
def test_ioctl_numbers(name: str, got: int, want: int) -> None:
    assert got == want, f"{name} = {got:#x}, kernel has {want:#x}"


def test_ioc_encoding() -> None:
    # _IOC(dir, 0xAE, nr, size): dir in bits 30-31, size 16-29, type 8-15, nr 0-7.
    assert io._io(0x80) == 0xAE80
    assert io._ior(0x81, 0x90) == (2 << 30) | (0x90 << 16) | 0xAE81
    assert io._iow(0x46, s.KvmUserspaceMemoryRegion) == (1 << 30) | (32 << 16) | 0xAE46
    assert io._iowr(0x05, 8) == (3 << 30) | (8 << 16) | 0xAE05
    for _, value, _ in IOCTLS:
        assert 0 <= value < 1 << 32


# ---------------------------------------------------------------------- against the headers

_HEADER = Path("/usr/include/linux/kvm.h")


def _c_program() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>",
             "int main(void) {"]
    for _, cname, _ in SIZES:
        lines.append(f'  printf("size {cname} %zu\\n", sizeof(struct {cname}));')
    for struct, field, _, _ in OFFSETS:
        lines.append(f'  printf("off {struct}.{field} %zu\\n", '
                     f'offsetof(struct {struct}, {field}));')
    for name, _, _ in IOCTLS:
        lines.append(f'  printf("ioctl {name} %lu\\n", (unsigned long)({name}));')
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.mark.skipif(shutil.which("gcc") is None or not _HEADER.exists(),
                    reason="needs gcc and the kernel's uapi headers (linux-libc-dev)")
def test_everything_matches_the_installed_kernel_headers(tmp_path: Path) -> None:
    src = tmp_path / "abi.c"
    src.write_text(_c_program())
    exe = tmp_path / "abi"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    facts = {}
    for line in out.splitlines():
        kind, name, value = line.split()
        facts[(kind, name)] = int(value)
    mismatches = []
    for cls, cname, _ in SIZES:
        if ctypes.sizeof(cls) != facts[("size", cname)]:
            mismatches.append(f"sizeof {cname}: {ctypes.sizeof(cls)} vs {facts[('size', cname)]}")
    for struct, field, got, _ in OFFSETS:
        if got != facts[("off", f"{struct}.{field}")]:
            mismatches.append(f"{struct}.{field}: {got} vs {facts[('off', f'{struct}.{field}')]}")
    for name, got, _ in IOCTLS:
        if got != facts[("ioctl", name)]:
            mismatches.append(f"{name}: {got:#x} vs {facts[('ioctl', name)]:#x}")
    assert mismatches == []


# ---------------------------------------------------------------------- the ioctl call


def test_ioctl_errors_raise_oserror_with_errno_and_request() -> None:
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        with pytest.raises(OSError) as ei:
            io.ioctl(fd, io.KVM_GET_API_VERSION)
        assert ei.value.errno == errno.ENOTTY
        assert "0xae00" in str(ei.value)
    finally:
        os.close(fd)


def _fake_ioctl(result: int, err: int = 0) -> tuple[object, list[tuple[int, int, int | None]]]:
    """A C-callable stand-in for libc ioctl with the binding's prototype; records args."""
    seen: list[tuple[int, int, int | None]] = []
    proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)

    def impl(fd: int, req: int, arg: int | None) -> int:
        seen.append((fd, req, arg))
        if err:
            ctypes.set_errno(err)
        return result

    return proto(impl), seen


@pytest.mark.parametrize("arg", [0xFFFBD000, 0x8000_0000, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_F000,
                                 (1 << 64) - 1])
def test_unsigned_64_bit_arguments_reach_c_intact(monkeypatch: pytest.MonkeyPatch,
                                                  arg: int) -> None:
    # fcntl.ioctl takes a C int and overflows at 0xfffbd000 (docs/host.md); the binding must not.
    fake, seen = _fake_ioctl(0)
    monkeypatch.setattr(io, "_ioctl", fake)
    assert io.ioctl(7, io.KVM_SET_TSS_ADDR, arg) == 0
    assert seen == [(7, io.KVM_SET_TSS_ADDR, arg)]


def test_requests_with_bit_31_set_reach_c_intact(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, seen = _fake_ioctl(5)
    monkeypatch.setattr(io, "_ioctl", fake)
    regs = s.KvmRegs()
    assert io.ioctl(3, io.KVM_GET_REGS, regs) == 5
    assert seen == [(3, 0x8090AE81, ctypes.addressof(regs))]   # structs go by pointer
    assert io.ioctl(3, io.KVM_RUN) == 5
    assert seen[-1][2] in (None, 0)                             # no argument: NULL


def test_eintr_is_returned_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, _ = _fake_ioctl(-1, errno.EINTR)
    monkeypatch.setattr(io, "_ioctl", fake)
    assert io.ioctl(3, io.KVM_RUN) == -errno.EINTR
    fake, _ = _fake_ioctl(-1, errno.EFAULT)
    monkeypatch.setattr(io, "_ioctl", fake)
    with pytest.raises(OSError) as ei:
        io.ioctl(3, io.KVM_RUN)
    assert ei.value.errno == errno.EFAULT


def test_the_real_prototype_is_unsigned() -> None:
    assert io._ioctl.argtypes[1] is ctypes.c_ulong
    assert ctypes.sizeof(ctypes.c_ulong) == 8
