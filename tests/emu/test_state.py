"""CpuState in and out of the emu engine: exact round trips in every mode, and a guest
moved mid-run (state + RAM) to a fresh vCPU finishing exactly as an uninterrupted one."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from emuguests import Booted

from pyhv.arch.x86.cpustate import (
    CR0_ET,
    CR0_PE,
    CR0_PG,
    CR4_OSFXSR,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    EFER_SCE,
    CpuState,
    DescriptorTable,
    Segment,
)
from pyhv.engines.emu import EmuEngine
from pyhv.exits import Halt, Interrupted, Shutdown
from pyhv.memory import GuestMemory

Guest = Callable[[str], Path]
Emu = Callable[..., Booted]


def fresh_vcpu(mem: int = 4 << 20):  # type: ignore[no-untyped-def]
    memory = GuestMemory.with_layout([(0, mem)])
    return memory, EmuEngine(memory).create_vcpu(0)


def long_state(cpl: int) -> CpuState:
    st = CpuState()
    st.cr0, st.cr4, st.cr3 = CR0_PE | CR0_PG | CR0_ET, CR4_PAE | CR4_OSFXSR, 0x9000
    st.efer = EFER_LME | EFER_LMA | EFER_SCE | EFER_NXE
    st.cs = Segment.flat(0x2B if cpl else 0x08, code=True, bits=64, dpl=cpl)
    data = Segment.flat(0x23 if cpl else 0x10, code=False, bits=64, dpl=cpl)
    st.ss = st.ds = st.es = data
    st.fs = Segment.flat(0, code=False, bits=64)
    st.fs.base = 0x7F00_1234_5000
    st.gs = Segment.flat(0, code=False, bits=64)
    st.gs.base = 0xFFFF_8880_0000_1000
    st.tr = Segment.system(0x30, 0xFFFF_FE00_0000_3000, 0x67, 0xB)
    st.ldt = Segment(selector=0, base=0, limit=0, type=2, s=0, present=0, unusable=1)
    st.gdt = DescriptorTable(0xFFFF_FE00_0000_1000, 0x7F)
    st.idt = DescriptorTable(0xFFFF_FE00_0000_0000, 0xFFF)
    st.rip, st.rsp, st.rax, st.r15 = 0x40_1000, 0x7FFF_FFFF_E000, 0x1234, 0xDEAD_BEEF
    st.rflags = 0x246 | (1 << 9) | (1 << 11)     # ZF PF IF OF + fixed bit
    st.cr2 = 0x5555_0000
    st.msrs = {0xC0000081: 0x0023_0010_0000_0000, 0xC0000082: 0xFFFF_FFFF_8100_0000,
               0xC0000084: 0x47700, 0xC0000102: 0xFFFF_8880_0000_2000, 0x174: 0x10,
               0x277: 0x0007_0406_0007_0406}
    return st


def assert_round_trip(st: CpuState) -> CpuState:
    _mem, v = fresh_vcpu()
    v.set_state(st)
    got = v.get_state()
    for name in ("rip", "rsp", "rax", "r15", "rflags", "cs", "ds", "es", "fs", "gs", "ss",
                 "tr", "ldt", "gdt", "idt", "cr0", "cr2", "cr3", "cr4", "efer"):
        assert getattr(got, name) == getattr(st, name), name
    for k, val in st.msrs.items():
        assert got.msrs[k] == val, hex(k)
    assert got.cpl == st.cpl and got.mode == st.mode
    # and the second trip is the identity on everything
    v.set_state(got)
    again = v.get_state()
    assert again.to_dict() == got.to_dict()
    return got


def test_round_trip_long_mode_cpl0_and_cpl3() -> None:
    assert assert_round_trip(long_state(0)).cpl == 0
    got = assert_round_trip(long_state(3))
    assert got.cpl == 3 and got.mode == "long"


def test_round_trip_compat_protected_and_real() -> None:
    compat = long_state(3)
    compat.cs = Segment.flat(0x1B, code=True, bits=32, dpl=3)
    compat.rip = 0x0804_8000
    assert assert_round_trip(compat).mode == "compat"
    prot = CpuState(cr0=CR0_PE | CR0_ET, rip=0x10_0000, rflags=0x2)
    prot.cs = Segment.flat(0x08, code=True, bits=32)
    prot.ds = prot.es = prot.ss = Segment.flat(0x10, code=False, bits=32)
    prot.gdt = DescriptorTable(0x500, 0x1F)
    assert assert_round_trip(prot).mode == "protected"
    real = CpuState()      # reset state: CS=F000 base FFFF0000, RIP FFF0
    assert assert_round_trip(real).mode == "real"


def test_fxsave_round_trip() -> None:
    st = long_state(0)
    img = bytearray(512)
    img[0:2] = (0x37F).to_bytes(2, "little")
    img[24:28] = (0x1F80).to_bytes(4, "little")
    img[160:176] = bytes(range(16))                   # XMM0
    img[160 + 15 * 16:176 + 15 * 16] = b"\xAB" * 16   # XMM15
    st.fxsave = bytes(img)
    _mem, v = fresh_vcpu()
    v.set_state(st)
    got = v.get_state().fxsave
    assert got is not None
    assert got[160:176] == bytes(range(16)) and got[400:416] == b"\xAB" * 16
    assert got[0:2] == img[0:2] and got[24:28] == img[24:28]


def test_cpl3_state_really_runs_at_cpl3() -> None:
    """HLT at CPL 3 is #GP; with no IDT that escalates to a triple fault (not a Halt)."""
    mem, v = fresh_vcpu()
    from pyhv.arch.x86 import paging
    cr3, tables = paging.identity_tables(span=1 << 30, user=True)
    mem.write(0x9000, tables)
    st = long_state(3)
    st.cr3, st.rip, st.rsp = cr3, 0x20_0000, 0x30_0000
    st.gdt = DescriptorTable(0, 0)
    st.idt = DescriptorTable(0, 0)
    st.tr = Segment.system(0, 0, 0x67, 0xB)
    mem.write(0x20_0000, b"\xf4")                      # hlt
    v.set_state(st)
    ex = v.run()
    assert isinstance(ex, Shutdown) and ex.reason.startswith("triple fault (#GP")


# The guest's own programming of the 8259 and the 8254 (tests/guests/emu/pc.inc: pic_init,
# pit_1khz), as (port, value) writes.
PC_INIT = [(0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0x21, 0xFE),
           (0x43, 0x34), (0x40, 0xA9), (0x40, 0x04)]


def test_guest_moved_mid_run_finishes_identically(emu: Emu, guest: Guest) -> None:
    ref = emu(guest("long64"), append="0").run()
    a = emu(guest("long64"), append="0")
    # run until the first HLT (timer armed, CPL 0 after the user-mode excursion): the
    # run loop stops at the first exit without routing it
    stopped = a.run(max_exits=0)
    assert stopped.result.reason == "exit-limit" and isinstance(stopped.last, Halt)
    assert a.machine.vcpu is not None and a.machine.memory is not None
    st = a.machine.vcpu.get_state()
    assert st.halted
    # a fresh machine gets a's RAM and CPU state. pyhv moves no device state (yet), so
    # b's 8259 and 8254 are programmed as the guest programmed a's, through b's port bus
    b = emu(guest("long64"), append="0")
    assert b.machine.vcpu is not None and b.machine.memory is not None
    for r_a, r_b in zip(a.machine.memory.regions, b.machine.memory.regions, strict=True):
        r_b.view[:] = r_a.view
    b.machine.vcpu.set_state(st)
    b.console[:] = a.console
    b.machine.clock.skip_to(a.machine.clock.now_ns())
    for port, value in PC_INIT:
        b.machine.pio.write(port, 1, value)
    res = b.run()
    assert res.out == ref.out
    assert res.exit_code == 0


def test_halt_reports_if_and_stays_halted() -> None:
    mem, v = fresh_vcpu()
    st = CpuState(cr0=CR0_ET)
    st.cs = Segment.real_mode(0x1000, code=True)
    st.rip = 0
    st.rflags = 0x2
    mem.write(0x10000, b"\xf4\xfb\xf4\xeb\xfe")        # hlt; sti; hlt; jmp $
    v.set_state(st)
    ex = v.run()
    assert ex == Halt(interrupts_enabled=False)
    assert v.get_state().halted and v.get_state().rip == 1
    # a halted vCPU stays halted until something wakes it
    assert v.run() == Halt(interrupts_enabled=False)
    st = v.get_state()
    st.halted = False
    v.set_state(st)
    ex = v.run()
    assert ex == Halt(interrupts_enabled=True)
    assert v.get_state().rip == 3
    assert v.run() == Halt(interrupts_enabled=True)


def test_kick_from_another_thread_interrupts_a_busy_guest() -> None:
    mem, v = fresh_vcpu()
    st = CpuState(cr0=CR0_ET)
    st.cs = Segment.real_mode(0x1000, code=True)
    st.rip = 0
    mem.write(0x10000, b"\xeb\xfe")                    # jmp $
    v.set_state(st)
    t = threading.Timer(0.05, v.kick)
    t0 = time.monotonic()
    t.start()
    ex = v.run()
    assert isinstance(ex, Interrupted)
    assert time.monotonic() - t0 < 5
    assert v.get_state().rip == 0


def test_dirty_pages_see_guest_and_device_writes() -> None:
    memory = GuestMemory.with_layout([(0, 4 << 20)])
    engine = EmuEngine(memory)
    v = engine.create_vcpu(0)
    st = CpuState(cr0=CR0_ET)
    st.cs = Segment.real_mode(0x1000, code=True)
    st.rip = 0
    # mov byte [0x3000], 1 (DS=0) ; hlt
    memory.write(0x10000, bytes.fromhex("c606003001f4"))
    v.set_state(st)
    engine.enable_dirty_tracking()
    assert engine.dirty_pages() == set()
    assert v.run() == Halt(interrupts_enabled=False)
    memory.write(0x20_0000, b"dma")
    assert engine.dirty_pages() == {0x3, 0x200}
    assert engine.dirty_pages() == set()


def test_invalidate_drops_stale_translations() -> None:
    memory = GuestMemory.with_layout([(0, 4 << 20)])
    engine = EmuEngine(memory)
    v = engine.create_vcpu(0)
    st = CpuState(cr0=CR0_ET)
    st.cs = Segment.real_mode(0x1000, code=True)
    st.rip = 0
    memory.write(0x10000, bytes.fromhex("b001f4"))      # mov al, 1 ; hlt
    v.set_state(st)
    v.run()
    assert v.get_state().rax & 0xFF == 1
    memory.write(0x10000, bytes.fromhex("b002f4"))      # "DMA" rewrites the code
    engine.invalidate(0x10000, 3)
    st.rax = 0
    v.set_state(st)
    v.run()
    assert v.get_state().rax & 0xFF == 2


def test_cr2_survives_run_boundaries() -> None:
    """A #PF handler stopped before it reads CR2 must still find the faulting address."""
    mem, v = fresh_vcpu(8 << 20)
    from pyhv.arch.x86 import paging
    cr3, tables = paging.identity_tables(span=1 << 30)
    mem.write(0x9000, tables)
    st = long_state(0)
    st.cr3, st.rip, st.rsp, st.cr2 = cr3, 0x20_0000, 0x30_0000, 0x1234_5678
    mem.write(0x20_0000, b"\x90\xf4\xf4")             # nop; hlt; hlt
    v.set_state(st)
    assert isinstance(v.run(), Halt)
    st = v.get_state()
    assert st.cr2 == 0x1234_5678
    st.halted = False
    v.set_state(st)
    assert isinstance(v.run(), Halt)
    assert v.get_state().cr2 == 0x1234_5678


def test_sysenter_loads_cs_ss_rip_rsp_from_the_msrs() -> None:
    mem, v = fresh_vcpu(8 << 20)
    from pyhv.arch.x86 import paging
    cr3, tables = paging.identity_tables(span=1 << 30)
    mem.write(0x9000, tables)
    st = long_state(0)
    st.cr3, st.rip, st.rsp = cr3, 0x20_0000, 0x30_0000
    st.msrs.update({0x174: 0x10, 0x175: 0x31_0000, 0x176: 0x20_1000})
    mem.write(0x20_0000, b"\x0f\x34\xf4")      # sysenter; hlt
    mem.write(0x20_1000, b"\xf4")              # hlt at SYSENTER_EIP
    v.set_state(st)
    assert v.run() == Halt(interrupts_enabled=False)
    got = v.get_state()
    assert got.rip == 0x20_1001 and got.rsp == 0x31_0000
    assert (got.cs.selector, got.cs.l, got.ss.selector) == (0x10, 1, 0x18)
    assert not got.rflags & (1 << 9)
