"""Floods: a guest that hammers one device for its whole run must not grow pyhv's memory.

Each guest is a real-mode loop of port accesses that runs until the timeout: serial
output (the console sink only counts), i8042 commands whose replies are never read,
fw_cfg selector writes and data reads (including rep insb), RTC register writes that
re-arm its timers, PIT reprogramming, UART loopback bytes never read, accesses to
unclaimed ports, (in 32-bit mode) rep stos/lods sweeps over the MMIO hole, and APIC
storms (self-IPIs, SIPIs, a timer re-armed at count 1, I/O APIC EOIs). After the run the
devices' queues (UART FIFO, i8042 buffer, timer heap, bus miss counters) must be within
their bounds, and the Python heap may not have grown by more than FLOOD_HEAP_MAX while
the guest ran (tracemalloc, so only pyhv's own allocations count).
"""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import pytest
from fuzzkit import Asm, engines, image, run_guest

TIMEOUT = 1.0
# the default run floods these; the `slow` variant floods every entry of FLOODS
QUICK = ["serial-out", "i8042-cmd", "fwcfg-rep-insb", "rtc-rearm", "mmio-sweep",
         "apic-storm"]
FLOOD_HEAP_MAX = 8 << 20


def loop(*ops: tuple[int, int]) -> bytes:
    """Real mode: forever { out port, value ... } (mov dx/al; out dx, al)."""
    a = Asm(16)
    for port, value in ops:
        if port < 0:                       # a read of -port
            a.mov_dx(-port).in_dx(1)
        else:
            a.mov_dx(port).mov_acc(1, value).out_dx(1)
    body = a.bytes()
    back = -(len(body) + 2)
    assert back >= -128
    return body + b"\xeb" + (back & 0xFF).to_bytes(1, "little")


FLOODS = {
    # THR writes: every byte reaches the console sink
    "serial-out": loop((0x3F8, 0x41)),
    # loopback on, bytes go to the RX FIFO, never read
    "serial-loopback": loop((0x3FC, 0x10), (0x3F8, 0x55), (0x3F8, 0x56)),
    # controller self-test and keyboard reset/echo: replies pile up, never read
    "i8042-cmd": loop((0x64, 0xAA), (0x64, 0x20), (0x60, 0xFF), (0x60, 0xEE)),
    "i8042-aux": loop((0x64, 0xD4), (0x60, 0xF2), (0x64, 0xD3), (0x60, 0x5A)),
    # fw_cfg: select, read; select a file, read beyond its end
    "fwcfg": loop((0x510, 0x00), (-0x511, 0), (0x510, 0x19), (-0x511, 0), (0x511, 0x12)),
    # RTC: periodic + update interrupts on, rate changes, re-armed on every write
    "rtc-rearm": loop((0x70, 0x0B), (0x71, 0x52), (0x70, 0x0A), (0x71, 0x2F),
                      (0x70, 0x0A), (0x71, 0x26), (0x70, 0x0B), (0x71, 0x02)),
    # PIT channel 0: mode 2, count 0 (65536), reloaded forever
    "pit-reload": loop((0x43, 0x34), (0x40, 0x00), (0x40, 0x00),
                       (0x43, 0x34), (0x40, 0xFF), (0x40, 0x00)),
    # nobody's ports: the buses count the misses
    "unclaimed": loop((0x99, 1), (-0x9A, 0), (0x3000, 2)),
}


def _rep_insb_fwcfg() -> bytes:
    """rep insb 64 KiB from fw_cfg's data port, over and over."""
    a = Asm(16).mov_acc(2, 0x1000).raw(b"\x8e\xc0")      # es = 0x1000: 64 KiB at 0x10000
    start = len(a.code)
    a.mov_dx(0x510).mov_acc(1, 0x19).out_dx(1).mov_dx(0x511)
    a.mov_reg32(7, 0).mov_reg32(1, 0xFFFF).rep_ins(1)
    back = start - (len(a.code) + 2)
    return a.bytes() + b"\xeb" + (back & 0xFF).to_bytes(1, "little")


FLOODS["fwcfg-rep-insb"] = _rep_insb_fwcfg()


def _mmio_sweep() -> bytes:
    """32-bit: rep stosd then rep lodsd over the MMIO hole above RAM, forever (regression:
    the bus counted every distinct missed address in a Counter that grew without bound)."""
    a = Asm(32)
    a.mov_reg32(7, 0x1000000).mov_reg32(1, 0x100000).raw(b"\xf3\xab")        # rep stosd
    a.mov_reg32(6, 0x2000000).mov_reg32(1, 0x100000).raw(b"\xf3\xad")        # rep lodsd
    a.raw(b"\xeb" + ((-(len(a.code) + 2)) & 0xFF).to_bytes(1, "little"))
    return image("pm32", a.bytes())


FLOODS["mmio-sweep"] = _mmio_sweep()


def _apic_storm() -> bytes:
    """32-bit, IF=0: self-IPIs (and illegal vector 5), SIPI/INIT to every other CPU (there
    are none), the local APIC timer re-armed with count 1 in periodic mode, the error
    LVT, and an I/O APIC entry rewritten to level + EOI'd through its EOI register,
    forever (issue 11: IPI storms, bad vectors, entries pointing nowhere stay bounded)."""
    def mov(addr: int, value: int) -> bytes:          # mov dword [addr], imm32
        return b"\xc7\x05" + struct.pack("<II", addr, value)
    lapic, ioapic = 0xFEE00000, 0xFEC00000
    body = b"".join([
        mov(lapic + 0xF0, 0x1FF), mov(lapic + 0x370, 0xFE),
        mov(lapic + 0x300, 0x00040040), mov(lapic + 0x300, 0x00040005),
        mov(lapic + 0x300, 0x000C4608), mov(lapic + 0x300, 0x000C4500),
        mov(lapic + 0x320, 0x20041), mov(lapic + 0x380, 1), mov(lapic + 0x280, 0),
        mov(ioapic, 0x14), mov(ioapic + 0x10, 0x0000A042), mov(ioapic + 0x40, 0x42),
        mov(ioapic, 0x15), mov(ioapic + 0x10, 0xFF000000),
    ])
    return image("pm32", body + b"\xe9" + struct.pack("<i", -(len(body) + 5)))  # jmp back


FLOODS["apic-storm"] = _apic_storm()


@pytest.mark.parametrize("name", QUICK)
@pytest.mark.parametrize("engine", engines())
def test_flood(engine: str, name: str, fuzz_dir: Path) -> None:
    flood(engine, name, fuzz_dir)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(FLOODS) - set(QUICK)))
@pytest.mark.parametrize("engine", engines())
def test_flood_slow(engine: str, name: str, fuzz_dir: Path) -> None:
    flood(engine, name, fuzz_dir)


def flood(engine: str, name: str, fuzz_dir: Path) -> None:
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = run_guest(fuzz_dir, FLOODS[name], engine, timeout=TIMEOUT)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert out.result.status == 124, out.result      # the loop never ends by itself
    assert peak < FLOOD_HEAP_MAX, f"heap grew by {peak >> 10} KiB during the flood"
    if name == "serial-out":
        assert out.output > 1000                      # it did flood
