"""The emu engine's native block hook: build it once with the host's gcc, load it, cache it.

Design: `blockhook.c` (the block hook and the paging-off TLB fill; no headers, no link
dependency) is compiled into a
shared object the first time an emu vCPU is created and cached under
`$XDG_CACHE_HOME/pyhv/` (default `~/.cache/pyhv/`) by the hash of its source, so an edit
rebuilds it and concurrent builders never see a half-written file (write + rename).
`load()` returns the hook's address, or None with the reason when there is no compiler
or the build fails; the engine then falls back to instruction-count slices (correct,
about 2.5x slower; docs/host.md).

`exit_checks_off(uc)` turns off unicorn's per-access exit check (see its docstring): it
is only used together with the native hook, which makes every stop at a block start.

The control block `Ctl` mirrors `struct pyhv_emu_ctl` field for field: the engine writes
the slice budget and the interrupt-window flag before each `emu_start`, `kick()` writes
`kick` from any thread (a single aligned int32 store), and the hook reports `reason`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("blockhook.c")

STOP_NONE = 0
STOP_BUDGET = 1
STOP_KICK = 2
STOP_IRQ_WINDOW = 3
STOP_PYTHON = 4          # a Python hook asked for the stop (exit queued, shutdown...)


class Ctl(ctypes.Structure):
    """`struct pyhv_emu_ctl` (blockhook.c)."""

    _fields_ = [
        ("budget", ctypes.c_int64),
        ("blocks", ctypes.c_uint64),
        ("kick", ctypes.c_int32),
        ("irq_window", ctypes.c_int32),
        ("reason", ctypes.c_int32),
        ("run_first", ctypes.c_int32),
        ("emu_stop", ctypes.c_void_p),
        ("reg_read", ctypes.c_void_p),
    ]


class Tlb(ctypes.Structure):
    """`struct pyhv_emu_tlb` (blockhook.c): the paging-off TLB-fill hook's state."""

    _fields_ = [
        ("code_pages", ctypes.c_void_p),
        ("fills", ctypes.c_uint64),
        ("code_pages_seen", ctypes.c_uint64),
        ("paging", ctypes.c_int32),
        ("flush_ctl", ctypes.c_int32),
        ("reg_read", ctypes.c_void_p),
        ("ctl", ctypes.c_void_p),
    ]


CODE_PAGES_BYTES = 1 << 17          # 1 bit per 4 KiB page below 4 GiB

_cache: tuple[int | None, str] | None = None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyhv"


def _build(out: Path) -> str | None:
    """Compile SOURCE into `out`; None on success, else the reason."""
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        return "no C compiler (gcc) found"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name, suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(SOURCE)],
                              capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            return f"{cc} failed: {proc.stderr.strip()[:200]}"
        os.replace(tmp, out)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load() -> tuple[int | None, str]:
    """(address of pyhv_emu_block or None, a one-line description of what was used)."""
    global _cache
    if _cache is not None:
        return _cache
    if os.environ.get("PYHV_EMU_NATIVE", "1") == "0":
        _cache = (None, "native hook disabled by PYHV_EMU_NATIVE=0")
        return _cache
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    path = cache_dir() / f"emu-blockhook-{digest}.so"
    try:
        if not path.exists():
            why = _build(path)
            if why is not None:
                _cache = (None, why)
                return _cache
        lib = ctypes.CDLL(str(path))
        addr = ctypes.cast(lib.pyhv_emu_block, ctypes.c_void_p).value
        _tlb_fill.append(ctypes.cast(lib.pyhv_emu_tlb_fill, ctypes.c_void_p).value or 0)
        _lib_keepalive.append(lib)
        _cache = (addr, f"native block hook {path}")
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        _cache = (None, f"native block hook unavailable: {e}")
    return _cache


_lib_keepalive: list[ctypes.CDLL] = []
_tlb_fill: list[int] = []


def tlb_fill_address() -> int | None:
    """Address of pyhv_emu_tlb_fill, once `load()` has found the native hook."""
    if os.environ.get("PYHV_EMU_VTLB", "1") == "0":
        return None
    return _tlb_fill[0] if _tlb_fill and _tlb_fill[0] else None


# -- unicorn's per-access exit check ------------------------------------------------------

_exit_flag: tuple[int | None, str] | None = None


def _no_exit_request_offset() -> int | None:
    """offsetof(struct uc_struct, no_exit_request), read from unicorn's own code.

    unicorn 2.1.4's check_exit_request_x86_64() starts with
    `mov rsi, [rdi + tcg_ctx.uc]; cmp byte [rsi + OFFSET], 0; je ...` (48 8b b7 d32,
    80 be d32 00); the pinned build has OFFSET = 0x7f2. None if the code differs.
    """
    from pyhv.engines.emu._uc import unicorn
    uclib = unicorn.unicorn_py3.unicorn.uclib
    try:
        fn = ctypes.cast(uclib.check_exit_request_x86_64, ctypes.c_void_p).value
    except AttributeError:
        return None
    if not fn:
        return None
    code = ctypes.string_at(fn, 16)
    if code[0:3] != b"\x48\x8b\xb7" or code[7:9] != b"\x80\xbe" or code[13] != 0:
        return None
    return int.from_bytes(code[9:13], "little")


def _set_flag(uc: Any, offset: int, value: int) -> None:
    handle = uc._uch.value
    ctypes.c_uint8.from_address(handle + offset).value = value


def _verify(offset: int) -> bool:
    """The flag does what it should: a stop requested in an MMIO write callback takes
    effect mid-block with the check (RIP back on the store) and at the block's end
    without it (both INCs done)."""
    from pyhv.engines.emu._uc import unicorn, x86
    got = []
    for flag in (0, 1):
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        uc.mem_map(0, 0x10000)

        def write(u: Any, *_a: Any) -> None:
            u.emu_stop()

        uc.mmio_map(0x100000, 0x1000, lambda *_a: 0, None, write, None)
        uc.mem_write(0x1000, bytes.fromhex("8803ffc1ffc1f4"))   # mov [rbx],al; inc ecx x2; hlt
        uc.reg_write(x86.UC_X86_REG_RBX, 0x100000)
        if flag:
            _set_flag(uc, offset, 1)
        uc.emu_start(0x1000, 0x2000)
        got.append((uc.reg_read(x86.UC_X86_REG_RCX), uc.reg_read(x86.UC_X86_REG_RIP)))
    return got == [(0, 0x1000), (2, 0x1007)]


def exit_checks_off(uc: Any) -> str:
    """Turn off unicorn's exit-request check after every guest load and store.

    unicorn 2.1.4 translates every guest memory access followed by a call to
    helper_check_exit_request (~2.5 ns a load or store), so that a stop requested from a
    memory hook takes effect at once. When it does, the CPU state is restored to the
    *start* of the accessing instruction, although the access has been done: an
    instruction that stored and is stopped this way runs again on resume (a
    read-modify-write such as `incl %gs:__preempt_count` increments twice). pyhv stops
    only from its block hook, at a block start, so it needs none of these checks; the
    field unicorn itself uses to drop them (uc_struct.no_exit_request, set for ARM IT
    blocks) is set once. Its offset is read from unicorn's code and the effect verified
    on a scratch instance; on any doubt nothing is changed. Returns a description.
    """
    global _exit_flag
    if _exit_flag is None:
        if os.environ.get("PYHV_EMU_EXIT_CHECKS", "0") == "1":
            _exit_flag = (None, "unicorn's per-access exit checks kept (PYHV_EMU_EXIT_CHECKS=1)")
        else:
            off = _no_exit_request_offset()
            if off is None or not 0 < off < 0x10000 or not _verify(off):
                _exit_flag = (None, "unicorn's per-access exit checks kept (unrecognised build)")
            else:
                _exit_flag = (off, "unicorn's per-access exit checks off")
    off, what = _exit_flag
    if off is not None:
        _set_flag(uc, off, 1)
    return what
