"""Unit tests of the trap engine's parts, without /dev/kvm: fake registers, real memory.

The emulator, the reflection and the shadow tables work on `GuestMemory` and a `Held`
register view; a fake vCPU stands in for KVM_GET_REGS/KVM_SET_REGS.
"""

from __future__ import annotations

import struct
from typing import Any, cast

import iced_x86 as ix
import pytest

from pyhv.arch.x86 import gdt
from pyhv.arch.x86.cpustate import CpuState, DescriptorTable, Segment
from pyhv.engines.trap import descriptors, monitor
from pyhv.engines.trap.context import Held
from pyhv.engines.trap.emulate import Emulator
from pyhv.engines.trap.reflect import Event, Kind, TripleFault, deliver
from pyhv.engines.trap.virtual import VirtualCpu
from pyhv.exits import Halt, IoIn, IoOut
from pyhv.kvm import structs as ks
from pyhv.memory import GuestMemory

GDT, IDT, STACK, CODE = 0x1000, 0x2000, 0x8000, 0x10000


class FakeVcpu:
    def __init__(self) -> None:
        self.regs = ks.KvmRegs()
        self.sets = 0

    def get_regs(self) -> ks.KvmRegs:
        r = ks.KvmRegs()
        ctypes_copy(r, self.regs)
        return r

    def set_regs(self, r: ks.KvmRegs) -> None:
        ctypes_copy(self.regs, r)
        self.sets += 1


def ctypes_copy(dst: ks.KvmRegs, src: ks.KvmRegs) -> None:
    for field in ks.KvmRegs._fields_:
        setattr(dst, field[0], getattr(src, field[0]))


@pytest.fixture
def mem() -> Any:
    m = GuestMemory.with_layout([(0, 2 << 20)])
    m.write(GDT, gdt.table([None, Segment.flat(0x08, code=True, bits=64),
                            Segment.flat(0x10, code=False, bits=64)]))
    yield m
    m.close()


def vcpu_state() -> VirtualCpu:
    st = CpuState()
    st.cs = Segment.flat(0x08, code=True, bits=64)
    st.ss = Segment.flat(0x10, code=False, bits=64)
    st.gdt = DescriptorTable(GDT, 0x17)
    st.idt = DescriptorTable(IDT, 0xFFF)
    st.cr0, st.cr4, st.efer = 0x80000031, 0x620, 0x500
    return VirtualCpu.from_state(st)


def held(fake: FakeVcpu, rip: int = CODE, rsp: int = STACK) -> Held:
    return Held(cast(Any, fake), parked=True, rip=rip, rsp=rsp, rflags=0x10202)


def test_cli_sti_hlt_are_virtual(mem: GuestMemory) -> None:
    v = vcpu_state()
    v.if_ = True
    e, fake = Emulator(mem, v, umip=False), FakeVcpu()
    h = held(fake)
    assert e.emulate(h, 13, 0, b"\xfa").kind == "cli" and not v.if_ and h.rip == CODE + 1
    assert e.emulate(h, 13, 0, b"\xfb").kind == "sti" and v.if_ and v.sti_shadow
    out = e.emulate(h, 13, 0, b"\xf4")
    assert isinstance(out.exit, Halt) and out.exit.interrupts_enabled and h.rip == CODE + 3
    assert fake.sets == 0 and h.rflags == 0x10202        # the real IF is never touched


def test_out_and_in_become_port_exits(mem: GuestMemory) -> None:
    v, fake = vcpu_state(), FakeVcpu()
    fake.regs.rax, fake.regs.rdx = 0x1234_5641, 0x3F8
    e = Emulator(mem, v, umip=False)
    h = held(fake)
    out = e.emulate(h, 13, 0, b"\xee")                   # out dx, al
    assert isinstance(out.exit, IoOut) and (out.exit.port, out.exit.data) == (0x3F8, b"\x41")
    out = e.emulate(h, 13, 0, b"\x66\xe5\x61")           # in ax, 0x61
    assert isinstance(out.exit, IoIn) and (out.exit.port, out.exit.size) == (0x61, 2)
    assert out.in_size == 2 and h.rip == CODE + 4


def test_lgdt_mov_cr3_and_rdmsr(mem: GuestMemory) -> None:
    v, fake = vcpu_state(), FakeVcpu()
    mem.write(0x3000, struct.pack("<HQ", 0x2F, 0x5000))
    fake.regs.rbx = 0x3000
    e = Emulator(mem, v, umip=False)
    h = held(fake)
    out = e.emulate(h, 13, 0, bytes.fromhex("0f0113"))   # lgdt [rbx]
    assert out.kind == "lgdt" and out.reload_gdt and v.gdt == DescriptorTable(0x5000, 0x2F)
    h.set_gpr(0, 0x7000)
    e.emulate(h, 13, 0, bytes.fromhex("0f22d8"))          # mov cr3, rax
    assert v.cr3 == 0x7000
    h.set_gpr(1, 0xC0000080)
    assert e.emulate(h, 13, 0, bytes.fromhex("0f32")).kind == "rdmsr"
    assert h.gpr(0) == 0x500 and h.gpr(2) == 0
    h.set_gpr(1, 0x12345)                                # no such MSR: #GP(0) for the guest
    out = e.emulate(h, 13, 0, bytes.fromhex("0f32"))
    assert out.event is not None and (out.event.vector, out.event.error_code) == (13, 0)


def test_iretq_to_rpl0_restores_virtual_if(mem: GuestMemory) -> None:
    v, fake = vcpu_state(), FakeVcpu()
    mem.write(STACK, struct.pack("<5Q", 0x4242, 0x08, 0x202 | 0x1, 0x9000, 0x10))
    h = held(fake)
    out = Emulator(mem, v, umip=False).emulate(h, 13, 8, bytes.fromhex("48cf"))
    assert out.kind == "iretq" and out.error is None
    assert (h.rip, h.rsp) == (0x4242, 0x9000) and v.if_
    assert h.rflags & 0x1 and h.rflags & 0x200           # CF restored, real IF stays 1


def test_iretq_to_user_mode_cannot_be_emulated(mem: GuestMemory) -> None:
    v, fake = vcpu_state(), FakeVcpu()
    mem.write(STACK, struct.pack("<5Q", 0x4242, 0x1B, 0x202, 0x9000, 0x23))
    out = Emulator(mem, v, umip=False).emulate(held(fake), 13, 0x18, bytes.fromhex("48cf"))
    assert out.error is not None and "ring compression" in out.error


def write_gate(mem: GuestMemory, vector: int, target: int, selector: int = 0x08) -> None:
    lo = ((target & 0xFFFF) | (selector << 16) | (0x8E << 40)
          | (((target >> 16) & 0xFFFF) << 48))
    mem.write(IDT + 16 * vector, struct.pack("<QQ", lo, target >> 32))


def test_reflection_builds_the_cpl0_frame(mem: GuestMemory) -> None:
    v, fake = vcpu_state(), FakeVcpu()
    v.if_ = True
    write_gate(mem, 13, 0x5555)
    h = held(fake, rip=0x1234, rsp=STACK + 8)
    d = deliver(mem, v, h, Event(13, Kind.EXCEPTION, 0x10))
    assert d.chain == ["#GP"] and h.rip == 0x5555 and not v.if_
    frame = struct.unpack("<6Q", mem.read(h.rsp, 48))
    # error code, RIP, CS (RPL 0), RFLAGS (virtual IF=1), RSP, SS; stack aligned to 16
    assert frame == (0x10, 0x1234, 0x08, 0x202, STACK + 8, 0x10)
    assert h.rsp == STACK - 48


def test_bad_gates_end_in_a_triple_fault(mem: GuestMemory) -> None:
    v, fake = vcpu_state(), FakeVcpu()
    v.idt = DescriptorTable(IDT, 0)                      # the loader's empty IDT
    with pytest.raises(TripleFault, match="#UD -> #GP -> #DF -> #GP"):
        deliver(mem, v, held(fake), Event(6, Kind.EXCEPTION))


def test_shadow_gdt_raises_dpl_and_drops_system_descriptors(mem: GuestMemory) -> None:
    tss = Segment.system(0x18, 0x4000, 0x67, 0x9)
    mem.write(0x6000, gdt.table([None, Segment.flat(0x08, code=True, bits=64),
                                 Segment.flat(0x10, code=False, bits=64), tss, None]))
    image = descriptors.shadow_image(mem, DescriptorTable(0x6000, 0x27))
    entries = struct.unpack("<5Q", image)
    assert gdt.decode(0x08, entries[1]).dpl == 3 and gdt.decode(0x10, entries[2]).dpl == 3
    assert entries[3] == entries[4] == 0
    assert descriptors.shadow_image(mem, DescriptorTable(0x7FFF_FFFF_0000, 0xFF)) == b""


def test_real_selectors_follow_the_guest_gdt_or_fall_back(mem: GuestMemory) -> None:
    area = monitor.MonitorArea()
    try:
        v = vcpu_state()
        area.mirror_gdt(descriptors.shadow_image(mem, v.gdt))
        assert descriptors.real_selectors(area, v) == (0x0B, 0x13)
        area.mirror_gdt(b"")                             # a GDT of nothing
        assert descriptors.real_selectors(area, v) == (monitor.SEL_UCODE, monitor.SEL_UDATA)
    finally:
        area.close()


def test_page_tables_hide_the_monitor() -> None:
    pt = monitor.page_tables()
    pml4 = struct.unpack_from("<512Q", pt, 0)
    assert pml4[0] & 0x7 == 0x7                          # guest: present, RW, user
    assert pml4[511] & 0x7 == 0x3                        # monitor: supervisor only
    assert sum(1 for e in pml4 if e) == 2


def test_stub_is_one_store_and_iretq() -> None:
    d = ix.Decoder(64, monitor.stub_code(13), ip=0)
    first, second = d.decode(), d.decode()
    assert first.mnemonic == ix.Mnemonic.MOV and first.memory_displacement == (
        monitor.SIGNAL_GVA + 13)
    assert second.code == ix.Code.IRETQ
