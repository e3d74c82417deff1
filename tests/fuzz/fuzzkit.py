"""The fuzz harness: guest images from hypothesis data, one in-process run, the checks.

Guests are flat images loaded at 0x7c00 and entered in real mode (pyhv.loader.flat).
`image(mode, body)` puts a hand-encoded prologue in front of `body` that switches to
32-bit protected mode or to long mode (flat GDT, identity-mapped first 2 MiB) so that the
body runs in the mode it was encoded for. No toolchain is needed: the few instructions
used are encoded here.

`run_guest(code, engine)` builds a Machine, runs it under a Runner with a short timeout
and checks what pyhv promises about a hostile guest (`check`):

- run() returns a RunResult, whose status is 0 (halt/poweroff), 4 (crash), 124
  (timeout) or odd (the guest's debug-exit), within its timeout plus a margin;
- no thread the run started is left running;
- the devices' queues stay within their bounds (UART FIFO and pending input, i8042
  output buffer, the timer queue, the buses' per-address miss counters).
"""

from __future__ import annotations

import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pyhv.devices import bus as bus_mod
from pyhv.devices import i8042 as i8042_mod
from pyhv.devices import serial16550 as serial_mod
from pyhv.engines import engine_class
from pyhv.machine import Machine, MachineConfig
from pyhv.runner import Runner, RunResult

LOAD = 0x7C00
MEM_SIZE = 4 << 20
OK_STATUSES = {0, 4, 124}
RUN_MARGIN_S = 3.0        # host slack on top of the timeout (slow CI, KVM-PVM emulation)
TIMER_QUEUE_MAX = 4096    # entries (live + lazily cancelled) in the timer heap
MISS_ADDRS_MAX = bus_mod.MISS_ADDRS_MAX   # distinct unhandled addresses a bus remembers

# The ports the PC devices answer on (and a few neighbours nobody claims).
PORTS = (*range(0x20, 0x22), *range(0x40, 0x44), *range(0x60, 0x65), *range(0x70, 0x72),
         *range(0xA0, 0xA2), *range(0x3F8, 0x400), 0x4D0, 0x4D1, 0x510, 0x511, 0x61,
         0x440, 0xF4)

CLI_HLT = b"\xfa\xf4"


def engines() -> list[object]:
    """pytest params for emu and kvm, each skipped with its reason where it cannot run."""
    out: list[object] = []
    for name in ("emu", "kvm"):
        why = engine_class(name).probe()
        out.append(pytest.param(name, marks=pytest.mark.skipif(
            why is not None, reason=f"engine {name} unavailable: {why}")))
    return out


# ---------------------------------------------------------------------- encoding


class Asm:
    """A tiny x86 encoder for the instructions the fuzzers need, in 16/32/64-bit code."""

    def __init__(self, bits: int) -> None:
        assert bits in (16, 32, 64)
        self.bits = bits
        self.code = bytearray()

    def _osz(self, size: int) -> bytes:
        """Operand-size prefix for a 2- or 4-byte operand in this mode."""
        if size == 2:
            return b"" if self.bits == 16 else b"\x66"
        if size == 4:
            return b"\x66" if self.bits == 16 else b""
        return b""

    def raw(self, b: bytes) -> Asm:
        self.code += b
        return self

    def mov_dx(self, port: int) -> Asm:
        return self.raw(self._osz(2) + b"\xba" + struct.pack("<H", port & 0xFFFF))

    def mov_acc(self, size: int, value: int) -> Asm:
        if size == 1:
            return self.raw(b"\xb0" + bytes([value & 0xFF]))
        fmt = "<H" if size == 2 else "<I"
        return self.raw(self._osz(size) + b"\xb8" + struct.pack(fmt, value & ((1 << 8 * size) - 1)))

    def out_dx(self, size: int) -> Asm:
        return self.raw(b"\xee" if size == 1 else self._osz(size) + b"\xef")

    def in_dx(self, size: int) -> Asm:
        return self.raw(b"\xec" if size == 1 else self._osz(size) + b"\xed")

    def mov_reg32(self, reg: int, value: int) -> Asm:
        """mov r32, imm32 (eax=0, ecx=1, edx=2, ebx=3, esp=4, ebp=5, esi=6, edi=7)."""
        return self.raw(self._osz(4) + bytes([0xB8 + reg]) + struct.pack("<I", value))

    def rep_outs(self, size: int) -> Asm:
        op = b"\x6e" if size == 1 else self._osz(size) + b"\x6f"
        return self.raw(b"\xf3" + op)

    def rep_ins(self, size: int) -> Asm:
        op = b"\x6c" if size == 1 else self._osz(size) + b"\x6d"
        return self.raw(b"\xf3" + op)

    def bytes(self) -> bytes:
        return bytes(self.code)


def _gdt_entry(base: int, limit: int, access: int, flags: int) -> bytes:
    return struct.pack("<HHBBBB", limit & 0xFFFF, base & 0xFFFF, (base >> 16) & 0xFF, access,
                       ((limit >> 16) & 0xF) | (flags << 4), (base >> 24) & 0xFF)


FLAT_GDT = (bytes(8)
            + _gdt_entry(0, 0xFFFFF, 0x9A, 0xC)     # 0x08 code32
            + _gdt_entry(0, 0xFFFFF, 0x92, 0xC)     # 0x10 data
            + _gdt_entry(0, 0xFFFFF, 0x9A, 0xA))    # 0x18 code64

PML4, PDPT, PD = 0x8000, 0x9000, 0xA000       # identity map of the first 2 MiB
TABLES_END = 0xB000
STACK = 0x7000


def image(mode: str, body: bytes) -> bytes:
    """A flat image (loaded at 0x7c00) that enters `mode` ("real", "pm32", "long64") and
    runs `body`, encoded for that mode, at the end of the image."""
    if mode == "real":
        return body
    # layout: jmp over the GDT | GDT | GDTR | real-mode prologue | pm32 prologue | [pad,
    # page tables, long-mode prologue] | body
    img = bytearray(b"\xeb\x00")               # jmp short, patched below
    gdt_at = LOAD + len(img)
    img += FLAT_GDT
    gdtr_at = LOAD + len(img)
    img += struct.pack("<HI", len(FLAT_GDT) - 1, gdt_at)
    img[1] = len(img) - 2
    a16 = Asm(16).raw(b"\xfa")                                     # cli
    a16.raw(b"\x0f\x01\x16" + struct.pack("<H", gdtr_at))         # lgdt [gdtr]
    a16.raw(b"\x0f\x20\xc0" + b"\x0c\x01" + b"\x0f\x22\xc0")      # cr0 |= PE
    far_at = len(img) + len(a16.code)
    a16.raw(b"\xea\x00\x00\x08\x00")                              # jmp 0x08:pm32
    img += a16.code
    pm32 = LOAD + len(img)
    struct.pack_into("<H", img, far_at + 1, pm32)
    a32 = Asm(32)
    a32.raw(b"\x66\xb8\x10\x00\x8e\xd8\x8e\xc0\x8e\xd0\x8e\xe0\x8e\xe8")  # ds=es=ss=fs=gs
    a32.mov_reg32(4, STACK)                                        # esp
    if mode == "pm32":
        return bytes(img + a32.code) + body
    assert mode == "long64"
    # jump over the padding and the page tables
    a32.raw(b"\xe9\x00\x00\x00\x00")
    img += a32.code
    jmp_end = len(img)
    img += bytes(PML4 - LOAD - len(img))
    tables = bytearray(TABLES_END - PML4)
    struct.pack_into("<Q", tables, 0, PDPT | 3)
    struct.pack_into("<Q", tables, PDPT - PML4, PD | 3)
    struct.pack_into("<Q", tables, PD - PML4, 0x83)                # 2 MiB page at 0, RW, PS
    img += tables
    struct.pack_into("<i", img, jmp_end - 4, len(img) - jmp_end)
    a = Asm(32)
    a.raw(b"\x0f\x20\xe0\x83\xc8\x20\x0f\x22\xe0")                 # cr4 |= PAE
    a.mov_reg32(0, PML4).raw(b"\x0f\x22\xd8")                      # cr3 = PML4
    a.mov_reg32(1, 0xC0000080).raw(b"\x0f\x32\x0d\x00\x01\x00\x00\x0f\x30")  # EFER.LME
    a.raw(b"\x0f\x20\xc0\x0d\x00\x00\x00\x80\x0f\x22\xc0")         # cr0 |= PG
    far = len(img) + len(a.code)
    a.raw(b"\xea\x00\x00\x00\x00\x18\x00")                         # jmp 0x18:lm64
    img += a.code
    struct.pack_into("<I", img, far + 1, LOAD + len(img))
    return bytes(img) + body


# ---------------------------------------------------------------------- running


@dataclass
class Outcome:
    result: RunResult
    elapsed: float
    output: int                   # bytes the guest sent to the console
    queues: dict[str, int] = field(default_factory=dict)


class CountingSink:
    """A console that only counts (a flood must not grow the test's own memory)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, data: bytes) -> None:
        self.n += len(data)


def queue_lengths(m: Machine) -> dict[str, int]:
    d = m.devices
    return {
        "serial rx": len(d.serial._rx),
        "serial pending": len(d.serial._pending),
        "i8042 queue": len(d.i8042._queue),
        "timer heap": len(m.timers._heap),
        "timer cancelled": len(m.timers._cancelled),
        "pio misses": len(m.pio.unhandled_addrs),
        "mmio misses": len(m.mmio.unhandled_addrs),
    }


QUEUE_LIMITS = {
    "serial rx": serial_mod.RX_FIFO_SIZE,
    "serial pending": serial_mod.PENDING_MAX,
    "i8042 queue": i8042_mod.OUTPUT_MAX,
    "timer heap": TIMER_QUEUE_MAX,
    "timer cancelled": TIMER_QUEUE_MAX,
    "pio misses": MISS_ADDRS_MAX,
    "mmio misses": MISS_ADDRS_MAX,
}


def run_guest(tmp: Path, code: bytes, engine: str, *, timeout: float = 1.0,
              mem_size: int = MEM_SIZE) -> Outcome:
    """Build, run and close one machine; check every property; return what happened."""
    img = tmp / f"fuzz-{threading.get_ident()}-{time.monotonic_ns()}.bin"
    img.write_bytes(code)
    before = set(threading.enumerate())
    sink = CountingSink()
    m = Machine(MachineConfig(kernel=img, format="flat", engine=engine, mem_size=mem_size),
                sink)
    try:
        t = time.monotonic()
        res = Runner(m, timeout=timeout).run()
        elapsed = time.monotonic() - t
        queues = queue_lengths(m)
    finally:
        m.close()
        img.unlink()
    out = Outcome(res, elapsed, sink.n, queues)
    log = os.environ.get("PYHV_FUZZ_LOG")
    if log:                          # outcome statistics while exploring
        with open(log, "a") as f:
            f.write(f"{engine}\t{res.status}\t{res.reason}\t{elapsed:.2f}\t"
                    f"{res.detail[:70]!r}\t{queues}\n")
    check(out, timeout, before)
    return out


def check(out: Outcome, timeout: float, threads_before: set[threading.Thread]) -> None:
    res = out.result
    assert isinstance(res, RunResult), res
    assert res.status in OK_STATUSES or res.status & 1, (res.status, res.reason, res.detail)
    assert out.elapsed <= timeout + RUN_MARGIN_S, (out.elapsed, res)
    left = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    assert not left, f"threads left running: {left}"
    over = {k: (v, QUEUE_LIMITS[k]) for k, v in out.queues.items() if v > QUEUE_LIMITS[k]}
    assert not over, f"queues over their bounds: {over}"


# ---------------------------------------------------------------------- hypothesis


def fuzz_settings(max_examples: int) -> object:
    """The example count of one fuzz test; everything else (derandomized in the default
    run, random under `-m slow` or `--hypothesis-profile=explore`, no deadline, no
    example database) comes from the profile tests/conftest.py loads."""
    from hypothesis import settings
    return settings(max_examples=max_examples)
