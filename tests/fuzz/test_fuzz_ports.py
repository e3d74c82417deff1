"""Structured port I/O against every PC device: generated guest programs.

A program is a list of operations, each encoded by hand (fuzzkit.Asm) for the mode it
runs in:

    out   mov dx, port; mov al/ax/eax, value; out dx, al/ax/eax
    in    mov dx, port; in al/ax/eax, dx
    outs  mov dx, port; mov esi, code; mov ecx, n; rep outsb/w/d   (bytes of the program)
    ins   mov dx, port; mov edi, buffer; mov ecx, n; rep insb/w/d
    sti   (real mode only, with an IVT of `iret` stubs) sti; a few nops; cli
    hlt   (real mode only) sti; hlt; cli  -- waits for whatever interrupt is armed

Ports are those of the 8259 pair, 8254 and port B, i8042, RTC, 16550, ELCR, fw_cfg,
ACPI-ish 0x440 and debug-exit 0xf4, with values biased to the commands the devices know.
The program ends in cli; hlt. Whatever the devices do (resets, debug-exit, interrupts),
the run must end cleanly (fuzzkit.check).
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from fuzzkit import CLI_HLT, LOAD, PORTS, Asm, engines, fuzz_settings, image, run_guest
from hypothesis import given
from hypothesis import strategies as st

TIMEOUT = 1.0
BUFFER = {16: 0x1000, 32: 0x20000, 64: 0x20000}
BITS = {"real": 16, "pm32": 32, "long64": 64}

# Bytes the devices treat specially: i8042 commands, PIC ICWs/OCWs, PIT control words,
# RTC register indexes, UART register values, fw_cfg selectors.
INTERESTING = [0x00, 0x01, 0x02, 0x0A, 0x0B, 0x0C, 0x0D, 0x0F, 0x10, 0x11, 0x19, 0x1A, 0x20,
               0x34, 0x36, 0x3F, 0x60, 0x80, 0x8A, 0x8B, 0x8C, 0xA7, 0xA8, 0xA9, 0xAA, 0xAB,
               0xAD, 0xAE, 0xB0, 0xC0, 0xC2, 0xC7, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xE0, 0xE8,
               0xF0, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xFE, 0xFF, 0x0019, 0x8000, 0xFFFF,
               0x80000000, 0xFFFFFFFF]

port_st = st.sampled_from(PORTS) | st.integers(0, 0xFFFF)
size_st = st.sampled_from([1, 1, 1, 2, 4])
value_st = st.sampled_from(INTERESTING) | st.integers(0, 0xFF) | st.integers(0, 0xFFFFFFFF)

op_st = st.one_of(
    st.tuples(st.just("out"), port_st, size_st, value_st),
    st.tuples(st.just("out"), port_st, size_st, value_st),
    st.tuples(st.just("in"), port_st, size_st, st.just(0)),
    st.tuples(st.just("outs"), port_st, size_st, st.integers(0, 0x200)),
    st.tuples(st.just("ins"), port_st, size_st, st.integers(0, 0x200)),
    st.tuples(st.just("sti"), st.just(0), st.just(1), st.just(0)),
    st.tuples(st.just("hlt"), st.just(0), st.just(1), st.just(0)),
)
Op = tuple[str, int, int, int]


def program(mode: str, ops: list[Op]) -> bytes:
    bits = BITS[mode]
    a = Asm(bits)
    if mode == "real":
        # every IVT entry -> an iret stub (0:stub), so interrupts the devices raise return
        a.raw(b"\x31\xc0\x8e\xc0\x31\xff\xb9\x00\x01\x66\xb8")
        stub_fix = len(a.code)
        a.raw(b"\x00\x00\x00\x00\xf3\x66\xab")
    for kind, port, size, value in ops:
        if kind in ("sti", "hlt"):
            if mode == "real":
                a.raw(b"\xfb\x90\x90\x90\xfa" if kind == "sti" else b"\xfb\xf4\xfa")
            continue
        a.mov_dx(port)
        if kind == "out":
            a.mov_acc(size, value).out_dx(size)
        elif kind == "in":
            a.in_dx(size)
        elif kind == "outs":
            a.mov_reg32(6, LOAD).mov_reg32(1, value).rep_outs(size)
        else:
            a.mov_reg32(7, BUFFER[bits]).mov_reg32(1, value).rep_ins(size)
    a.raw(CLI_HLT)
    if mode == "real":
        stub = LOAD + len(a.code)
        a.raw(b"\xcf")                                              # iret
        struct.pack_into("<I", a.code, stub_fix, stub)
    return image(mode, a.bytes())


ops_st = st.lists(op_st, min_size=1, max_size=40)


@pytest.mark.parametrize("mode", ["real", "pm32", "long64"])
@pytest.mark.parametrize("engine", engines())
def test_port_programs(engine: str, mode: str, fuzz_dir: Path) -> None:
    @fuzz_settings(6)  # type: ignore[misc]
    @given(ops=ops_st)
    def inner(ops: list[Op]) -> None:
        run_guest(fuzz_dir, program(mode, ops), engine, timeout=TIMEOUT)
    inner()


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("mode", ["real", "pm32", "long64"])
@pytest.mark.parametrize("engine", engines())
def test_port_programs_slow(engine: str, mode: str, fuzz_dir: Path) -> None:
    @fuzz_settings(120)  # type: ignore[misc]
    @given(ops=st.lists(op_st, min_size=1, max_size=200))
    def inner(ops: list[Op]) -> None:
        run_guest(fuzz_dir, program(mode, ops), engine, timeout=TIMEOUT)
    inner()
