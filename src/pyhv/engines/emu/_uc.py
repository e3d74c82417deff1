"""unicorn, imported once: `unicorn` and `x86` (its x86 constants), or the import error.

Importing this module never fails: without unicorn, `IMPORT_ERROR` holds the reason and
`unicorn`/`x86` are None, so the CLI and the KVM engine keep working.

pyhv's native code is loaded first (built with gcc on first use, cached): libunicorn then
binds its per-block TB-start helper to pyhv's block counter (native/__init__.py), and its
RDTSC/RDMSR/WRMSR/IRET helpers to pyhv's (native/cpuhooks.py). Code
that needs unicorn imports it from here, so that this order holds; where unicorn was
imported before, the engine counts blocks with the slower block hook instead.
"""

from __future__ import annotations

import sys
from typing import Any

from pyhv.engines.emu import native as _native
from pyhv.engines.emu.native import cpuhooks as _cpuhooks

unicorn: Any
x86: Any
IMPORT_ERROR: str | None

if "unicorn" not in sys.modules:
    _native.preload()

try:
    import unicorn as _unicorn
    from unicorn import x86_const as _x86

    unicorn, x86, IMPORT_ERROR = _unicorn, _x86, None
    _native.bind_original(unicorn)
    _cpuhooks.bind(unicorn)
except Exception as e:  # noqa: BLE001 - any import failure disables the engine
    unicorn, x86 = None, None
    IMPORT_ERROR = f"{type(e).__name__}: {e}"


SCRATCH_TCG_BUFFER = 1 << 20   # bytes of translated code for a scratch instance


def scratch_uc() -> Any:
    """A 64-bit unicorn instance for a start-up check, with a 1 MiB code buffer.

    Every instance reserves its own code buffer (1 GiB by default) and mmap places each
    below the mappings already there. Scratch instances stay alive until the garbage
    collector breaks their hook reference cycles, so a vCPU created after some of them
    had its translated code far from libunicorn and pyhv's native code, beyond the
    +-2 GiB of a direct call: every helper call from guest code (one per block) became
    an indirect call (measured: a CPU-bound guest ~30% slower on a vCPU created after
    three live default-size instances). Small scratch buffers keep the vCPU's code close.
    """
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.ctl_set_tcg_buffer_size(SCRATCH_TCG_BUFFER)
    return uc
