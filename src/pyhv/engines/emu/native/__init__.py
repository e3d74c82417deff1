"""The emu engine's native code: build it once with the host's gcc, load it, cache it.

Design: `blockhook.c` (block counting and stops at block starts, and the paging-off TLB
fill; no headers, no link dependency) is compiled into a shared object and cached under
`$XDG_CACHE_HOME/pyhv/` (default `~/.cache/pyhv/`) by the hash of its source, so an edit
rebuilds it and concurrent builders never see a half-written file (write + rename).
`cpuhelpers.c` (RDTSC, RDMSR, WRMSR and IRET reaching pyhv: native/cpuhooks.py) is
compiled into the same object. `load()` returns the block hook's address, or None with
the reason when there is no compiler or the build fails; the engine then falls back to
instruction-count slices (correct, about 2.5x slower; docs/host.md).

Load order matters: `pyhv.engines.emu._uc` calls `load()` *before* it imports unicorn, and
the object is loaded with RTLD_GLOBAL, so libunicorn's references to its TB-start helper
bind to blockhook.c's function of the same name (ELF symbol interposition; see the C
file). `bind_original()`, called right after the import, gives that function the address
of libunicorn's own helper, which it forwards to. `tb_counter()` then checks on a scratch
instance that blocks are counted and stopped exactly as the block hook counts and stops
them; the engine counts blocks there when it can (one call less per block), and through
UC_HOOK_BLOCK otherwise (unicorn imported first, another unicorn build, another CPU).

`exit_checks_off(uc)` turns off unicorn's per-access exit check (see its docstring): it
is only used together with the native code, which makes every stop at a block start; the
TB-start counter needs it (with the checks on, the helper also runs after each access).

The control block `Ctl` mirrors `struct pyhv_emu_ctl` field for field: the engine writes
`end`, `limit` and the interrupt-window flag before each `emu_start` (`arm()`), `kick()`
writes `kick` from any thread (a single aligned int32 store), and the C code reports
`reason`. Environment switches (diagnostics): PYHV_EMU_NATIVE=0 (no native code),
PYHV_EMU_TB_HELPER=0 (count with the block hook), PYHV_EMU_VTLB=0, PYHV_EMU_EXIT_CHECKS=1.
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
SOURCES = (SOURCE, Path(__file__).with_name("cpuhelpers.c"))

STOP_NONE = 0
STOP_BUDGET = 1
STOP_KICK = 2
STOP_IRQ_WINDOW = 3
STOP_PYTHON = 4          # a Python hook asked for the stop (exit queued, shutdown...)
STOP_YIELD = 5           # PAUSE with several vCPUs (cpuhelpers.c): the slice ends


class Ctl(ctypes.Structure):
    """`struct pyhv_emu_ctl` (blockhook.c)."""

    _fields_ = [
        ("limit", ctypes.c_int64),
        ("blocks", ctypes.c_int64),
        ("end", ctypes.c_int64),
        ("kick", ctypes.c_int32),
        ("irq_window", ctypes.c_int32),
        ("reason", ctypes.c_int32),
        ("run_first", ctypes.c_int32),
        ("emu_stop", ctypes.c_void_p),
        ("reg_read", ctypes.c_void_p),
    ]

    def arm(self, budget: int) -> None:
        """Before emu_start (or from a hook inside it): the slice ends after `budget` more
        blocks; every block goes through the slow path while the interrupt window is
        watched, the first block must run, or a stop is on its way."""
        self.end = self.blocks + budget
        slow = self.irq_window or self.run_first or self.reason
        self.limit = self.blocks if slow else self.end

    def force_slow(self) -> None:
        """The next block start goes through the slow path (call on the vCPU's thread)."""
        self.limit = self.blocks


TB_VCPUS = 64


class TbVcpu(ctypes.Structure):
    _fields_ = [("uc", ctypes.c_void_p), ("ctl", ctypes.c_void_p)]


class TbState(ctypes.Structure):
    """`struct pyhv_tb_state` (blockhook.c): the interposed TB-start helper's state."""

    _fields_ = [
        ("original", ctypes.c_void_p),
        ("cpu_offset", ctypes.c_int64),
        ("exit_offset", ctypes.c_int64),
        ("vcpus", TbVcpu * (TB_VCPUS + 1)),
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
_lib: ctypes.CDLL | None = None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyhv"


def _build(out: Path) -> str | None:
    """Compile SOURCES into `out`; None on success, else the reason."""
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        return "no C compiler (gcc) found"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name, suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp,
                               *(str(src) for src in SOURCES)],
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
    global _cache, _lib
    if _cache is not None:
        return _cache
    if os.environ.get("PYHV_EMU_NATIVE", "1") == "0":
        _cache = (None, "native hook disabled by PYHV_EMU_NATIVE=0")
        return _cache
    digest = hashlib.sha256(b"".join(src.read_bytes() for src in SOURCES)).hexdigest()[:16]
    path = cache_dir() / f"emu-blockhook-{digest}.so"
    try:
        if not path.exists():
            why = _build(path)
            if why is not None:
                _cache = (None, why)
                return _cache
        # RTLD_GLOBAL: libunicorn, loaded after this, binds its TB-start helper here
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        addr = ctypes.cast(lib.pyhv_emu_block, ctypes.c_void_p).value
        _tlb_fill.append(ctypes.cast(lib.pyhv_emu_tlb_fill, ctypes.c_void_p).value or 0)
        _lib_keepalive.append(lib)
        _lib = lib
        _cache = (addr, f"native block hook {path}")
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        _cache = (None, f"native block hook unavailable: {e}")
    return _cache


_lib_keepalive: list[ctypes.CDLL] = []
_preloaded = False


def preload() -> None:
    """`load()` before libunicorn is loaded (pyhv.engines.emu._uc calls it)."""
    global _preloaded
    _preloaded = load()[0] is not None
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
    from pyhv.engines.emu._uc import scratch_uc, x86
    got = []
    for flag in (0, 1):
        uc = scratch_uc()
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


def exit_checks_off_state() -> int | None:
    """The no_exit_request offset in use, once decided (None: the checks stay on)."""
    if _exit_flag is None:
        return None
    return _exit_flag[0]


def exit_checks_off(uc: Any) -> str:
    """Turn off unicorn's exit-request check after every guest load and store.

    unicorn 2.1.4 translates every guest memory access followed by a call to
    helper_check_exit_request (~2.5 ns a load or store), so that a stop requested from a
    memory hook takes effect at once. When it does, the CPU state is restored to the
    *start* of the accessing instruction, although the access has been done: an
    instruction that stored and is stopped this way runs again on resume (a
    read-modify-write such as `incl %gs:__preempt_count` increments twice). pyhv stops
    only at block starts (blockhook.c), so it needs none of these checks; the
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


# -- the TB-start helper ------------------------------------------------------------------

_HELPER = "helper_check_exit_request_x86_64"
_tb: tuple[TbState | None, str] | None = None


def _state() -> TbState | None:
    if _lib is None or not hasattr(_lib, "pyhv_tb_state"):
        return None
    fn = _lib.pyhv_tb_state
    fn.restype = ctypes.c_void_p
    addr = fn()
    return TbState.from_address(addr) if addr else None


def _check_offsets(code: bytes) -> tuple[int, int] | None:
    """(uc->cpu offset, exit request word offset) from the start of unicorn 2.1.4's
    helper_check_exit_request: `mov r8, [rdi + d32]; mov eax, [r8 + d32]; test eax, eax;
    jns` (4c 8b 87 d32, 41 8b 80 d32, 85 c0, 79). None if the code differs."""
    if code[0:3] != b"\x4c\x8b\x87" or code[7:10] != b"\x41\x8b\x80" or \
            code[14:17] != b"\x85\xc0\x79":
        return None
    return int.from_bytes(code[3:7], "little"), int.from_bytes(code[10:14], "little")


_offsets_ok = False


def bind_original(unicorn: object) -> None:
    """Right after `import unicorn`: give the interposed helper the address of
    libunicorn's own (it forwards exit requests, and the calls of unregistered instances,
    there), and check that the offsets of its inline copy of the original's check are
    those in the original's code."""
    global _offsets_ok
    state = _state()
    if state is None or unicorn is None:
        return
    uclib = unicorn.unicorn_py3.unicorn.uclib  # type: ignore[attr-defined]
    try:
        orig = ctypes.cast(getattr(uclib, _HELPER), ctypes.c_void_p).value
    except AttributeError:
        return
    ours = ctypes.cast(getattr(_lib, _HELPER), ctypes.c_void_p).value
    if not orig or orig == ours:
        return
    state.original = orig
    _offsets_ok = _check_offsets(ctypes.string_at(orig, 17)) == (state.cpu_offset,
                                                                  state.exit_offset)


def register(handle: int, ctl: Ctl | None) -> bool:
    """Count the blocks of the unicorn instance `handle` (its uc_engine pointer) into
    `ctl` from now on (None: no longer). False if the table is full."""
    if _lib is None:
        return False
    fn = _lib.pyhv_tb_register
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return int(fn(handle, ctypes.addressof(ctl) if ctl is not None else None)) == 0


def _make_ctl(uclib: object) -> Ctl:
    ctl = Ctl()
    ctl.emu_stop = ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value  # type: ignore[attr-defined]
    ctl.reg_read = ctypes.cast(uclib.uc_reg_read, ctypes.c_void_p).value  # type: ignore[attr-defined]
    return ctl


def _scratch_run(via_helper: bool, budget: int) -> tuple[int, int, int, int]:
    """(blocks, reason, RIP, RCX) after a 5-round loop on a scratch instance counted by
    the TB-start helper or by the block hook, with `budget` blocks in the slice."""
    from pyhv.engines.emu._uc import scratch_uc, unicorn, x86
    uclib = unicorn.unicorn_py3.unicorn.uclib
    uc = scratch_uc()
    uc.mem_map(0, 0x10000)
    # mov ecx, 5; 1: dec ecx; jnz 1b; hlt
    uc.mem_write(0x1000, bytes.fromhex("b905000000ffc975fcf4"))
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])
    exit_checks_off(uc)
    ctl = _make_ctl(uclib)
    hooked = False
    try:
        if via_helper:
            hooked = register(uc._uch.value, ctl)
        else:
            handle = ctypes.c_size_t()
            hooked = uclib.uc_hook_add(
                uc._uch, ctypes.byref(handle), unicorn.UC_HOOK_BLOCK,
                ctypes.c_void_p(_cache[0] if _cache else 0), ctypes.c_void_p(ctypes.addressof(ctl)),
                ctypes.c_uint64(1), ctypes.c_uint64(0)) == 0
        if not hooked:
            return (-1, -1, -1, -1)
        ctl.arm(budget)
        uc.emu_start(0x1000, 0)
        return (ctl.blocks, ctl.reason, uc.reg_read(x86.UC_X86_REG_RIP),
                uc.reg_read(x86.UC_X86_REG_RCX))
    finally:
        if via_helper and hooked:
            register(uc._uch.value, None)


def tb_counter() -> tuple[bool, str]:
    """(usable, a description): may vCPUs count blocks with the TB-start helper?

    Checked once on scratch instances: a whole run and a run stopped by its budget must
    give the same block count, stop reason, RIP and registers as the block hook."""
    global _tb
    if _tb is not None:
        return _tb[0] is not None, _tb[1]
    state = _state()
    why = ""
    if os.environ.get("PYHV_EMU_TB_HELPER", "1") == "0":
        why = "disabled by PYHV_EMU_TB_HELPER=0"
    elif load()[0] is None or state is None:
        why = "no native code"
    elif not state.original:
        why = "libunicorn's helper not found"
    elif not _offsets_ok:
        why = "libunicorn's helper is not the one of unicorn 2.1.4"
    elif not _preloaded:
        why = "libunicorn was loaded before pyhv's native code (unicorn imported first)"
    elif exit_checks_off_state() is None:
        why = "unicorn's per-access exit checks are on"
    else:
        try:
            for budget in (1 << 40, 3):
                got, want = _scratch_run(True, budget), _scratch_run(False, budget)
                if got != want or got[0] <= 0:
                    why = f"disagrees with the block hook on a scratch run ({got} != {want})"
                    break
        except Exception as e:  # noqa: BLE001 - any doubt: use the block hook
            why = f"scratch run failed: {type(e).__name__}: {e}"
    _tb = (None, f"block hook (TB-start helper unused: {why})") if why else \
        (state, "unicorn's TB-start helper (interposed)")
    return _tb[0] is not None, _tb[1]
