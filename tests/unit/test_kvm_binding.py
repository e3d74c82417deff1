"""The KVM binding against the real /dev/kvm: handles, memory slots, registers, typed exits.

Skipped, with the reason, where /dev/kvm is missing or unusable. On KVM-PVM (docs/host.md)
64-bit CPL 3 code runs natively and CPL 0 / 32-bit / real-mode code is emulated; every
guest here is a handful of instructions, so both are fast.

Guest code is hand-assembled (the bytes are commented) so no toolchain is needed. The
entry states come from pyhv.arch.x86.boot and the loaders, so these tests also show that
those states are ones KVM accepts and runs.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyhv.arch.x86 import boot, gdt, layout
from pyhv.arch.x86.cpustate import GPRS, RFLAGS_FIXED, RFLAGS_IOPL, SEGMENTS, CpuState, Segment
from pyhv.errors import HostError
from pyhv.exits import Halt, IoIn, IoOut, MmioRead, MmioWrite
from pyhv.kvm import Kvm, Vcpu, Vm
from pyhv.kvm import structs as ks
from pyhv.loader import BootRequest, load
from pyhv.memory import GuestMemory

MIB = 1 << 20


def _kvm_unavailable() -> str | None:
    try:
        Kvm().close()
    except HostError as e:
        return str(e)
    return None


_why = _kvm_unavailable()
pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif(_why is not None, reason=f"needs a usable /dev/kvm: {_why}")]


# ---------------------------------------------------------------------- helpers


def set_state(v: Vcpu, st: CpuState) -> None:
    """CpuState -> KVM_SET_SREGS + KVM_SET_REGS (the fields these guests need)."""
    regs = ks.KvmRegs()
    for name in (*GPRS, "rip", "rflags"):
        setattr(regs, name, getattr(st, name))
    sr = v.get_sregs()
    for name in SEGMENTS:
        seg, k = getattr(st, name), getattr(sr, name)
        for f in ("selector", "base", "limit", "type", "s", "dpl", "present", "avl", "l",
                  "db", "g", "unusable"):
            setattr(k, f, getattr(seg, f))
    sr.gdt.base, sr.gdt.limit = st.gdt.base, st.gdt.limit
    sr.idt.base, sr.idt.limit = st.idt.base, st.idt.limit
    sr.cr0, sr.cr3, sr.cr4, sr.efer = st.cr0, st.cr3, st.cr4, st.efer
    v.set_sregs(sr)
    v.set_regs(regs)


class Guest:
    """One VM with `size` bytes of RAM at gpa 0 and one vCPU."""

    def __init__(self, size: int = 4 * MIB, *, log_dirty: bool = False) -> None:
        self.kvm = Kvm()
        self.mem = GuestMemory.with_layout([(0, size)])
        self.vm = Vm(self.kvm)
        r = self.mem.regions[0]
        self.vm.set_memory(0, r.gpa, r.size, r.host_addr, log_dirty=log_dirty)
        self.vm.set_tss_addr(0xFFFBD000)          # above 2**31: needs the unsigned ioctl path
        self.vm.set_identity_map_addr(0xFFFBC000)  # only allowed before the first vCPU
        self.vcpu = self.vm.create_vcpu(0)
        self.vcpu.set_cpuid(self.kvm.supported_cpuid())

    def close(self) -> None:
        self.vm.close()
        self.kvm.close()
        self.mem.close()


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


# ---------------------------------------------------------------------- system / VM


def test_system_handle_reports_api_and_capabilities() -> None:
    with Kvm() as kvm:
        assert kvm.api_version == 12
        assert kvm.vcpu_mmap_size >= ks.KvmRun.u.offset + 256
        assert kvm.check_extension("KVM_CAP_USER_MEMORY") > 0
        assert kvm.check_extension(0x7FFF_FFFF) == 0          # unknown: 0, not an error
        caps = kvm.capabilities()
        assert caps["KVM_CAP_USER_MEMORY"] > 0 and caps["KVM_CAP_NR_MEMSLOTS"] > 0
        leaves = {e.function for e in kvm.supported_cpuid()}
        assert {0, 1, 0x8000_0000, 0x8000_0001} <= leaves
        assert 0xC000_0080 in kvm.msr_index_list() or kvm.msr_index_list()   # EFER, usually
    assert kvm.fd == -1


def test_missing_device_is_a_host_error() -> None:
    with pytest.raises(HostError, match="does not exist"):
        Kvm("/nonexistent/kvm")


def test_a_device_that_is_not_kvm_is_a_host_error_and_leaks_no_fd() -> None:
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(HostError, match="/dev/null"):
        Kvm("/dev/null")
    assert len(os.listdir("/proc/self/fd")) == before


def test_registers_round_trip(guest: Guest) -> None:
    v = guest.vcpu
    regs = v.get_regs()
    regs.rax, regs.r15, regs.rip, regs.rflags = 0x1122334455667788, 1 << 63, 0x1000, 0x2
    v.set_regs(regs)
    back = v.get_regs()
    assert (back.rax, back.r15, back.rip, back.rflags) == (0x1122334455667788, 1 << 63,
                                                            0x1000, 0x2)
    sr = v.get_sregs()
    assert sr.cs.present == 1 and sr.efer == 0          # reset state: real mode
    fpu = v.get_fpu()
    assert fpu.fcw == 0x37F                              # FNINIT's control word
    fpu.xmm[0], fpu.xmm[255], fpu.fpr[0] = 0xA5, 0x5A, 0x11
    v.set_fpu(fpu)
    back_fpu = v.get_fpu()
    assert (back_fpu.xmm[0], back_fpu.xmm[255], back_fpu.fpr[0]) == (0xA5, 0x5A, 0x11)
    msrs = v.get_msrs([0x174, 0xC0000082])              # SYSENTER_CS, LSTAR
    assert set(msrs) == {0x174, 0xC0000082}
    assert v.set_msrs({0xC0000082: 0xFFFF_FFFF_8000_0000}) == 1
    assert v.get_msrs([0xC0000082]) == {0xC0000082: 0xFFFF_FFFF_8000_0000}
    assert v.get_mp_state() in (0, 3)


def test_memory_slot_bookkeeping(guest: Guest) -> None:
    vm = guest.vm
    assert set(vm.slots) == {0}
    with pytest.raises(ValueError, match="does not log dirty pages"):
        vm.get_dirty_log(0)
    extra = GuestMemory.with_layout([(16 * MIB, 1 * MIB)])
    try:
        r = extra.regions[0]
        vm.set_memory(1, r.gpa, r.size, r.host_addr)
        assert vm.slots[1] == (16 * MIB, MIB, r.host_addr, 0)
        vm.set_memory(1, r.gpa, 0, r.host_addr)          # size 0 deletes the slot
        assert set(vm.slots) == {0}
    finally:
        extra.close()


def test_bad_ioctl_argument_raises_oserror(guest: Guest) -> None:
    # Overlapping an existing slot is refused by KVM with EEXIST.
    r = guest.mem.regions[0]
    with pytest.raises(OSError) as ei:
        guest.vm.set_memory(5, 0, r.size, r.host_addr)
    assert ei.value.errno in (errno.EEXIST, errno.EINVAL)


# ---------------------------------------------------------------------- running guests


def test_cpl0_long_mode_out_then_hlt(guest: Guest) -> None:
    code = bytes([0xB0, 0x42,          # mov al, 0x42
                  0xE6, 0xF4,          # out 0xf4, al
                  0xF4])               # hlt
    guest.mem.write(0x100000, code)
    set_state(guest.vcpu, boot.long_mode(guest.mem, 0x100000))
    ex = guest.vcpu.run()
    assert ex == IoOut(port=0xF4, size=1, data=b"\x42", count=1)
    assert isinstance(guest.vcpu.run(), Halt)
    assert guest.vcpu.get_regs().rip == 0x100005
    assert guest.vcpu.exit_counts == {"IO_OUT": 1, "HLT": 1}


USER_CODE, GP_HANDLER, KERNEL_STACK = 0x100000, 0x101000, 0x7E000


def _user_state(mem: GuestMemory, entry: int) -> CpuState:
    """64-bit CPL 3, user-accessible identity paging, and a #GP gate to a CPL 0 handler.

    IN/OUT at CPL 3 fault with #GP on KVM-PVM even with IOPL 3 (docs/host.md: the monitor
    catches them through IDT stubs it owns), so the user code reports through MMIO and
    its one OUT is answered by the CPL 0 stub at GP_HANDLER.
    """
    st = boot.long_mode(mem, entry, user_pages=True)
    ucode = Segment.flat(0x33, code=True, bits=64, dpl=3)
    udata = Segment.flat(0x3B, code=False, bits=32, dpl=3)
    kcode32, kcode64, kdata = (Segment.flat(0x08, code=True, bits=32),
                               Segment.flat(0x10, code=True, bits=64),
                               Segment.flat(0x18, code=False, bits=32))
    table = gdt.table([None, kcode32, kcode64, kdata, st.tr, None, ucode, udata])
    mem.write(layout.BOOT_GDT, table)
    st.gdt.limit = len(table) - 1
    # TSS.RSP0: the stack the CPU switches to on the CPL 3 -> 0 fault.
    mem.write_u64(layout.BOOT_TSS + 4, KERNEL_STACK)
    # IDT entry 13 (#GP): 64-bit interrupt gate (type 0xE, P=1, DPL 0) to 0x10:GP_HANDLER.
    gate = (GP_HANDLER & 0xFFFF) | (0x10 << 16) | (0x8E << 40) | (
        ((GP_HANDLER >> 16) & 0xFFFF) << 48)
    mem.write(layout.BOOT_IDT + 13 * 16, struct.pack("<QQ", gate, GP_HANDLER >> 32))
    st.idt.base, st.idt.limit = layout.BOOT_IDT, 14 * 16 - 1
    st.cs = ucode
    st.ss = st.ds = st.es = st.fs = st.gs = udata
    st.rflags = RFLAGS_FIXED | RFLAGS_IOPL
    st.rsp = 0x7F000
    return st


def test_cpl3_long_mode_mmio_exits_then_out_through_a_guest_idt_stub() -> None:
    g = Guest(log_dirty=True)
    try:
        user = bytes.fromhex(
            "bb000000d0"          # mov ebx, 0xd0000000  (no RAM there: MMIO)
            "c70344332211"        # mov dword [rbx], 0x11223344
            "8b4310"              # mov eax, [rbx + 0x10]
            "894308"              # mov [rbx + 8], eax
            "c604250000200001"    # mov byte [0x200000], 1
            "66baf803"            # mov dx, 0x3f8
            "ee"                  # out dx, al           <- #GP at CPL 3 (offset 0x1d)
            "ebfe")               # jmp $
        stub = bytes.fromhex(
            "488b442408"          # mov rax, [rsp + 8]   (the faulting RIP)
            "e7f5"                # out 0xf5, eax
            "f4")                 # hlt
        g.mem.write(USER_CODE, user)
        g.mem.write(GP_HANDLER, stub)
        set_state(g.vcpu, _user_state(g.mem, USER_CODE))
        v = g.vcpu
        g.vm.get_dirty_log(0)                    # start from a clean log
        assert v.run() == MmioWrite(0xD000_0000, b"\x44\x33\x22\x11")
        assert v.get_sregs().cs.dpl == 3
        ex = v.run()
        assert isinstance(ex, MmioRead) and ex.addr == 0xD000_0010 and len(ex.data) == 4
        ex.data[:] = b"\x01\x02\x03\x04"    # what the guest's load reads
        assert v.run() == MmioWrite(0xD000_0008, b"\x01\x02\x03\x04")
        assert v.run() == IoOut(0xF5, 4, struct.pack("<I", USER_CODE + 0x1D))
        assert isinstance(v.run(), Halt)
        assert g.mem.read_u8(0x200000) == 1      # the guest's store reached our mapping
        assert 0x200 in g.vm.get_dirty_log(0)    # and KVM logged its page
        assert v.exit_counts == {"MMIO_WRITE": 2, "MMIO_READ": 1, "IO_OUT": 1, "HLT": 1}
    finally:
        g.close()


def test_port_in_exit_data_is_what_the_guest_reads(guest: Guest) -> None:
    code = bytes.fromhex("66ba6000"  # mov dx, 0x60
                         "ed"        # in eax, dx
                         "e761"      # out 0x61, eax
                         "f4")       # hlt
    guest.mem.write(0x100000, code)
    set_state(guest.vcpu, boot.long_mode(guest.mem, 0x100000))
    ex = guest.vcpu.run()
    assert isinstance(ex, IoIn) and (ex.port, ex.size, ex.count) == (0x60, 4, 1)
    ex.data[:] = b"\x5a\xa5\x0f\xf0"
    assert guest.vcpu.run() == IoOut(0x61, 4, b"\x5a\xa5\x0f\xf0")
    assert isinstance(guest.vcpu.run(), Halt)


def test_closing_while_an_exit_view_is_held() -> None:
    # A run that ends on an IoIn (a strict-io error, a timeout) leaves the caller holding a
    # view into the kvm_run page; closing the VM must still work.
    g = Guest()
    g.mem.write(0x100000, bytes.fromhex("e460f4"))     # in al, 0x60; hlt
    set_state(g.vcpu, boot.long_mode(g.mem, 0x100000))
    held = g.vcpu.run()
    assert isinstance(held, IoIn)
    g.close()
    assert g.vcpu.fd == -1 and g.vm.fd == -1


# ---------------------------------------------------------------------- loaders on KVM


def _run_outs(g: Guest, st: CpuState, n: int) -> list[bytes]:
    set_state(g.vcpu, st)
    outs = []
    for _ in range(n):
        ex = g.vcpu.run()
        assert isinstance(ex, IoOut), ex
        outs.append(ex.data)
    assert isinstance(g.vcpu.run(), Halt)
    return outs


def test_flat_image_runs_in_real_mode(guest: Guest, tmp_path: Path) -> None:
    img = tmp_path / "boot.bin"
    img.write_bytes(bytes([0xB0, 0x55, 0xE6, 0xF4, 0xF4]))   # mov al,0x55; out 0xf4,al; hlt
    loaded = load(guest.mem, BootRequest(img, format="flat"))
    assert loaded.format == "flat"
    assert _run_outs(guest, loaded.entry, 1) == [b"\x55"]


def test_multiboot_entry_state_runs(guest: Guest, tmp_path: Path) -> None:
    # a.out-kludge multiboot image at 1 MiB: header, then code that reports EAX and EBX.
    base = 0x100000
    flags = 1 << 16 | 1 << 1
    code = bytes.fromhex("e780"      # out 0x80, eax
                         "89d8"      # mov eax, ebx
                         "e780"      # out 0x80, eax
                         "8b4304"    # mov eax, [ebx + 4]   (mem_lower)
                         "e780"      # out 0x80, eax
                         "f4")       # hlt
    header = struct.pack("<8I", 0x1BADB002, flags, -(0x1BADB002 + flags) & 0xFFFFFFFF,
                         base, base, 0, 0, base + 32)
    img = tmp_path / "mb.bin"
    img.write_bytes(header + code)
    loaded = load(guest.mem, BootRequest(img))
    assert loaded.format == "multiboot"
    outs = _run_outs(guest, loaded.entry, 3)
    assert outs == [struct.pack("<I", 0x2BADB002), struct.pack("<I", layout.BOOTINFO),
                    struct.pack("<I", 639)]


def test_elf64_entry_state_runs_in_long_mode(guest: Guest, tmp_path: Path) -> None:
    code = bytes.fromhex("8b4708"    # mov eax, [rdi + 8]   (mem_upper, KiB)
                         "e780"      # out 0x80, eax
                         "f4")       # hlt
    entry = 0x200000
    ehdr = struct.pack("<4sBBBB8xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 2, 62, 1, entry,
                       64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, entry, entry, len(code), len(code), 0x1000)
    img = tmp_path / "k64.elf"
    img.write_bytes(ehdr + phdr + bytes(0x1000 - 120) + code)
    loaded = load(guest.mem, BootRequest(img))
    assert loaded.format == "elf64"
    assert _run_outs(guest, loaded.entry, 1) == [struct.pack("<I", (4 * MIB - MIB) // 1024)]
