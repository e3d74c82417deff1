"""Standalone unicorn 2.1.4 probe: what puts a guest store on the slow path?

    python bench/native/uc_store_probe.py [--iters 4] [--only NAME]

No pyhv code runs here: a bare unicorn instance executes one tight 64-bit loop over a
1 MiB array at 2 MiB (code at 1 MiB, like bench/guests/sieve.S), in one of three flavours:

    store   mov byte [rdi+rax], 1 ; add rax, 1 ; cmp rax, rcx ; jb     (the sieve's inner loop)
    load    mov dl, [rdi+rax]     ; add rax, 1 ; cmp rax, rcx ; jb
    reg     add rdx, rax          ; add rax, 1 ; cmp rax, rcx ; jb

under one configuration at a time (memory mapping, hooks, paging, TLB mode, unicorn's
per-access exit check). It prints ns per loop iteration (one translated block each),
median of 3. Absolute numbers are host noise; compare lines of one run.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import unicorn
from unicorn import x86_const as X

CODE, DATA, RAM = 0x100000, 0x200000, 64 << 20
PT = 0x10000                      # page tables (paging configurations)
ARRAY = 1 << 20
NO_EXIT_REQUEST = 0x7F2           # offsetof(struct uc_struct, no_exit_request), 2.1.4 x86_64

BODIES = {
    "store": "mov byte ptr [rdi+rax], 1",
    "load": "mov dl, byte ptr [rdi+rax]",
    "reg": "add rdx, rax",
}


def assemble(body: str) -> bytes:
    src = f""".intel_syntax noprefix
    .code64
outer: xor eax, eax
inner: {body}
    add rax, 1
    cmp rax, rcx
    jb inner
    dec rbx
    jnz outer
    hlt
"""
    with tempfile.TemporaryDirectory() as d:
        s, o, b = Path(d, "l.s"), Path(d, "l.o"), Path(d, "l.bin")
        s.write_text(src)
        subprocess.run(["as", "--64", "-o", str(o), str(s)], check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(o), str(b)], check=True)
        return b.read_bytes()


def page_tables(uc: Any, nx_data: bool) -> None:
    """Identity map the first 1 GiB with 2 MiB pages; the data page NX if asked."""
    pml4, pdpt, pd = PT, PT + 0x1000, PT + 0x2000
    uc.mem_write(pml4, (pdpt | 3).to_bytes(8, "little"))
    uc.mem_write(pdpt, (pd | 3).to_bytes(8, "little"))
    ents = bytearray()
    for i in range(512):
        e = (i << 21) | 0x83
        if nx_data and i == DATA >> 21:
            e |= 1 << 63
        ents += e.to_bytes(8, "little")
    uc.mem_write(pd, bytes(ents))
    uc.reg_write(X.UC_X86_REG_CR3, pml4)
    uc.reg_write(X.UC_X86_REG_CR4, 0x20)                          # PAE
    uc.reg_write(X.UC_X86_REG_MSR, (0xC0000080, 0x500 | (0x800 if nx_data else 0)))
    uc.reg_write(X.UC_X86_REG_CR0, 0x80000011)                    # PG | ET | PE


def native_hook() -> tuple[int, Any] | None:
    """pyhv's blockhook.c compiled standalone (same code as the engine's)."""
    root = Path(__file__).resolve().parents[2]
    src = root / "src" / "pyhv" / "engines" / "emu" / "native" / "blockhook.c"
    out = Path(tempfile.mkdtemp()) / "bh.so"
    if subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(out), str(src)]).returncode:
        return None
    lib = ctypes.CDLL(str(out))
    return ctypes.cast(lib.pyhv_emu_block, ctypes.c_void_p).value or 0, lib


class Ctl(ctypes.Structure):
    """struct pyhv_emu_ctl (blockhook.c)."""

    _fields_ = [("limit", ctypes.c_int64), ("blocks", ctypes.c_int64), ("end", ctypes.c_int64),
                ("kick", ctypes.c_int32), ("irq_window", ctypes.c_int32),
                ("reason", ctypes.c_int32), ("run_first", ctypes.c_int32),
                ("emu_stop", ctypes.c_void_p), ("reg_read", ctypes.c_void_p)]


def make(cfg: str, code: bytes, keep: list[Any]) -> Any:
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    if "ptr" in cfg or "pyhv" in cfg:
        buf = mmap.mmap(-1, RAM)
        keep.append(buf)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        uc.mem_map_ptr(0, RAM, unicorn.UC_PROT_ALL, addr)
    else:
        uc.mem_map(0, RAM)
    if "mmio" in cfg or "pyhv" in cfg:
        uc.mmio_map(RAM, (1 << 40) - RAM, lambda *a: 0, None, lambda *a: None, None)
    if "hooks" in cfg or "pyhv" in cfg:
        keep.append(uc.hook_add(unicorn.UC_HOOK_INTR, lambda *a: None))
        keep.append(uc.hook_add(unicorn.UC_HOOK_INSN_INVALID, lambda *a: False))
        for ins in (X.UC_X86_INS_IN, X.UC_X86_INS_OUT, X.UC_X86_INS_SYSCALL,
                    X.UC_X86_INS_SYSENTER, X.UC_X86_INS_CPUID):
            keep.append(uc.hook_add(unicorn.UC_HOOK_INSN, lambda *a: 0, None, 1, 0, ins))
    if "exits" in cfg or "pyhv" in cfg:
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
    if "blockhook" in cfg:
        nh = native_hook()
        assert nh is not None
        ctl = Ctl()
        ctl.limit = ctl.end = 1 << 62
        uclib = unicorn.unicorn_py3.unicorn.uclib
        ctl.emu_stop = ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value
        ctl.reg_read = ctypes.cast(uclib.uc_reg_read, ctypes.c_void_p).value
        h = ctypes.c_size_t()
        err = uclib.uc_hook_add(uc._uch, ctypes.byref(h), unicorn.UC_HOOK_BLOCK,
                                ctypes.c_void_p(nh[0]), ctypes.cast(ctypes.pointer(ctl),
                                                                    ctypes.c_void_p),
                                ctypes.c_uint64(1), ctypes.c_uint64(0))
        assert err == 0
        keep += [nh, ctl]
    if "pyblock" in cfg:
        keep.append(uc.hook_add(unicorn.UC_HOOK_BLOCK, lambda *a: None))
    if "memhook" in cfg:     # a write hook on one page far away from the loop
        keep.append(uc.hook_add(unicorn.UC_HOOK_MEM_WRITE, lambda *a: None, None,
                                0x3000000, 0x3000FFF))
    if "paging" in cfg:
        page_tables(uc, nx_data="nx" in cfg)
    if "vtlb" in cfg:
        uc.ctl_tlb_mode(unicorn.UC_TLB_VIRTUAL)
    if "noexitreq" in cfg:
        ctypes.c_uint8.from_address(uc._uch.value + NO_EXIT_REQUEST).value = 1
    uc.mem_write(CODE, code)
    return uc


def run_once(cfg: str, code: bytes, rounds: int) -> float:
    keep: list[Any] = []
    uc = make(cfg, code, keep)
    uc.reg_write(X.UC_X86_REG_RDI, DATA)
    uc.reg_write(X.UC_X86_REG_RCX, ARRAY)
    uc.reg_write(X.UC_X86_REG_RBX, rounds)
    t0 = time.perf_counter()
    uc.emu_start(CODE, CODE + len(code))
    dt = time.perf_counter() - t0
    assert uc.reg_read(X.UC_X86_REG_RBX) == 0
    return dt


CONFIGS = [
    ("base", "mem_map RAM, no paging (every page RWX), no hooks"),
    ("ptr", "mem_map_ptr RAM (as pyhv maps it)"),
    ("ptr+mmio", "+ mmio_map of everything above RAM up to 2^40"),
    ("ptr+hooks", "+ UC_HOOK_INTR, INSN_INVALID, INSN (IN/OUT/SYSCALL/SYSENTER/CPUID)"),
    ("ptr+exits", "+ ctl_exits_enabled with an empty exit list"),
    ("pyhv", "all of the above: pyhv's set-up without the block hook"),
    ("pyhv+blockhook", "pyhv + native UC_HOOK_BLOCK (blockhook.c)"),
    ("pyhv+pyblock", "pyhv + a Python UC_HOOK_BLOCK (for scale)"),
    ("base+memhook", "base + UC_HOOK_MEM_WRITE on one unrelated page"),
    ("base+paging", "4-level paging, 2 MiB pages, data page executable"),
    ("base+paging+nx", "4-level paging, data page NX (EFER.NXE)"),
    ("base+vtlb", "UC_TLB_VIRTUAL (no guest paging; perms from the access type)"),
    ("base+noexitreq", "uc->no_exit_request = 1: no exit check after each load/store"),
    ("base+paging+nx+noexitreq", "data page NX and no per-access exit check"),
    ("pyhv+blockhook+noexitreq", "pyhv + block hook + no per-access exit check"),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=4, help="rounds over the 1 MiB array")
    ap.add_argument("--only", help="run only configurations containing this text")
    args = ap.parse_args()
    codes = {k: assemble(v) for k, v in BODIES.items()}
    n = args.iters * ARRAY
    print(f"unicorn {unicorn.__version__}; ns per iteration (1 block = 1 access + 3 insns), "
          f"{args.iters} x 1 MiB, median of 3")
    print(f"{'configuration':28s} {'store':>7s} {'load':>7s} {'reg':>7s}   what")
    for cfg, what in CONFIGS:
        if args.only and args.only not in cfg:
            continue
        row: list[str] = []
        for kind in BODIES:
            ts = [run_once(cfg, codes[kind], args.iters) for _ in range(3)]
            row.append(f"{statistics.median(ts) / n * 1e9:7.1f}")
        print(f"{cfg:28s} {' '.join(row)}   {what}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
