"""The emu engine's native block hook: build it once with the host's gcc, load it, cache it.

Design: `blockhook.c` (about 30 lines, no headers, no link dependency) is compiled into a
shared object the first time an emu vCPU is created and cached under
`$XDG_CACHE_HOME/pyhv/` (default `~/.cache/pyhv/`) by the hash of its source, so an edit
rebuilds it and concurrent builders never see a half-written file (write + rename).
`load()` returns the hook's address, or None with the reason when there is no compiler
or the build fails; the engine then falls back to instruction-count slices (correct,
about 2.5x slower; HOST.md).

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
        _lib_keepalive.append(lib)
        _cache = (addr, f"native block hook {path}")
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        _cache = (None, f"native block hook unavailable: {e}")
    return _cache


_lib_keepalive: list[ctypes.CDLL] = []
