"""A minimal machine for driving the emu engine directly from tests.

Guests are assembled at test time (gcc/as + ld, flat binaries) and loaded into a fresh
GuestMemory. The harness supplies the few "devices" the guests use, through the engine's
synchronous I/O callables:

    0xE9  write: one byte of guest output (collected in `out`)
    0xF4  write: end the run with that exit code (the harness kicks the vCPU)
    0x40  write: start a periodic "timer" raising IRQ 0 every `value` us of virtual time
    0x20  write: end of interrupt for the fake PIC

and a one-line fake PIC (IRQ 0 -> vector 0x20): pending until acknowledged, then in
service until EOI. Every run has a bounded budget of virtual time (a watchdog timer) and
of exits, so no guest can hang a test.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from pyhv.arch.x86 import gdt, layout, paging
from pyhv.arch.x86.cpustate import (
    CR0_ET,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR4_OSFXSR,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    CpuState,
    DescriptorTable,
    Segment,
)
from pyhv.clock import TimerQueue, VirtualClock
from pyhv.engines.emu import EmuEngine
from pyhv.exits import Exit, Halt, InternalError, Interrupted, IoOut, Shutdown
from pyhv.memory import GuestMemory

GUESTS = Path(__file__).resolve().parent.parent / "guests" / "emu"
LOAD = 0x10000
MIB = 1 << 20


def have_toolchain() -> bool:
    return all(shutil.which(t) for t in ("gcc", "ld"))


def build(name: str, tmp: Path, *, base: int = LOAD) -> bytes:
    """Assemble tests/guests/emu/<name>.S into a flat binary linked at base."""
    src = GUESTS / f"{name}.S"
    obj = tmp / f"{name}.o"
    out = tmp / f"{name}.bin"
    subprocess.run(["gcc", "-c", "-o", str(obj), str(src)], check=True,
                   capture_output=True, text=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext", hex(base), "-e", "start",
                    "--oformat", "binary", "-o", str(out), str(obj)], check=True,
                   capture_output=True, text=True)
    return out.read_bytes()


class FakePic:
    """One interrupt line (IRQ 0, vector 0x20), edge-triggered, with EOI."""

    def __init__(self) -> None:
        self.requested = False
        self.in_service = False
        self.acks = 0

    def raise_irq(self) -> None:
        self.requested = True

    def pending(self) -> bool:
        return self.requested and not self.in_service

    def acknowledge(self) -> int | None:
        if not self.pending():
            return None
        self.requested = False
        self.in_service = True
        self.acks += 1
        return 0x20

    def eoi(self) -> None:
        self.in_service = False


@dataclass
class Result:
    out: str
    exit_code: int | None
    last: Exit | None
    exits: list[str] = field(default_factory=list)
    stats: dict[str, int | float] = field(default_factory=dict)
    virtual_ns: int = 0


GDT_ENTRIES = [
    Segment(),                                                  # 0x00 null
    Segment.flat(0x08, code=True, bits=64),                     # 0x08 kernel code 64
    Segment.flat(0x10, code=False, bits=64),                    # 0x10 kernel data
    Segment.flat(0x18, code=True, bits=32),                     # 0x18 code 32
]


def flat_gdt() -> bytes:
    out = b"\0" * 8
    for seg in GDT_ENTRIES[1:]:
        out += struct.pack("<Q", gdt.encode(seg))
    return out


class Machine:
    def __init__(self, image: bytes, *, mode: str, mem: int = 16 * MIB, load: int = LOAD,
                 regs: dict[str, int] | None = None, engine_kw: dict[str, int] | None = None
                 ) -> None:
        self.memory = GuestMemory.with_layout([(0, mem)])
        self.memory.write(load, image)
        self.engine = EmuEngine(self.memory, **(engine_kw or {}))
        self.vcpu = self.engine.create_vcpu(0)
        self.clock = VirtualClock()
        self.timers = TimerQueue(self.clock)
        self.pic = FakePic()
        self.vcpu.set_interrupt_source(self.pic)
        self.vcpu.attach_io(self.pio, self.mmio)           # type: ignore[attr-defined]
        self.vcpu.attach_clock(self.clock, self.timers)   # type: ignore[attr-defined]
        self.out = bytearray()
        self.exit_code: int | None = None
        self.period_ns = 0
        self.mmio_log: list[tuple[int, int, int | None]] = []
        self.vcpu.set_state(self.initial_state(mode, load, regs or {}))

    # -- state
    def initial_state(self, mode: str, load: int, regs: dict[str, int]) -> CpuState:
        st = CpuState()
        if mode == "real":
            st.cs = Segment.real_mode(load >> 4, code=True)
            for s in ("ds", "es", "fs", "gs", "ss"):
                setattr(st, s, Segment.real_mode(0))
            st.rip = 0
            st.rsp = 0x7000
            st.cr0 = CR0_ET
        else:
            self.memory.write(layout.BOOT_GDT, flat_gdt())
            st.gdt = DescriptorTable(layout.BOOT_GDT, 8 * len(GDT_ENTRIES) - 1)
            st.idt = DescriptorTable(0, 0)
            st.rip = load
            st.rsp = layout.BOOT_STACK_TOP
            st.tr = Segment.system(0, 0, 0x67, 0xB)
            if mode == "prot32":
                st.cr0 = CR0_PE | CR0_ET | CR0_NE
                st.cs = Segment.flat(0x18, code=True, bits=32)
                data = Segment.flat(0x10, code=False, bits=32)
            else:
                cr3, tables = paging.identity_tables(user=True)
                self.memory.write(layout.PAGE_TABLES, tables)
                st.cr3 = cr3
                st.cr4 = CR4_PAE | CR4_OSFXSR
                st.efer = EFER_LME | EFER_LMA
                st.cr0 = CR0_PE | CR0_PG | CR0_ET | CR0_NE
                st.cs = Segment.flat(0x08, code=True, bits=64)
                data = Segment.flat(0x10, code=False, bits=64)
            for s in ("ds", "es", "fs", "gs", "ss"):
                setattr(st, s, data)
        for k, v in regs.items():
            setattr(st, k, v)
        return st

    # -- devices
    def pio(self, port: int, size: int, value: int | None) -> int:
        if value is None:
            return (1 << (8 * size)) - 1
        if port == 0xE9:
            self.out.append(value & 0xFF)
        elif port == 0xF4:
            self.exit_code = value
            self.vcpu.kick()
        elif port == 0x40:
            self.period_ns = value * 1000
            self.timers.schedule(self.clock.now_ns() + self.period_ns, self._tick)
        elif port == 0x20:
            self.pic.eoi()
        return 0

    def mmio(self, addr: int, size: int, value: int | None) -> int:
        self.mmio_log.append((addr, size, value))
        return 0x5A5A5A5A5A5A5A5A & ((1 << (8 * size)) - 1) if value is None else 0

    def _tick(self) -> None:
        self.pic.raise_irq()
        if self.period_ns:
            self.timers.schedule(self.clock.now_ns() + self.period_ns, self._tick)

    # -- run loop
    def run(self, *, virtual_ms: int = 500, max_exits: int = 100_000) -> Result:
        watchdog = [False]

        def bark() -> None:
            watchdog[0] = True

        self.timers.schedule(self.clock.now_ns() + virtual_ms * 1_000_000, bark)
        names: list[str] = []
        last: Exit | None = None
        for _ in range(max_exits):
            ex = self.vcpu.run()
            last = ex
            names.append(type(ex).__name__)
            self.timers.fire_due()
            if self.exit_code is not None or watchdog[0]:
                break
            if isinstance(ex, (Shutdown, InternalError)):
                break
            if isinstance(ex, Halt):
                if not ex.interrupts_enabled:
                    break
                deadline = self.timers.next_deadline()
                if deadline is None:
                    break
                self.clock.skip_to(deadline)
                self.timers.fire_due()
                if watchdog[0]:
                    break
            elif isinstance(ex, (Interrupted, IoOut)):
                if isinstance(ex, IoOut):
                    self.pio(ex.port, ex.size, int.from_bytes(ex.data, "little"))
                continue
        return Result(self.out.decode("latin-1"), self.exit_code, last, names,
                      self.vcpu.stats(), self.clock.now_ns())
