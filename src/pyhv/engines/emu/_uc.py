"""unicorn, imported once: `unicorn` and `x86` (its x86 constants), or the import error.

Importing this module never fails: without unicorn, `IMPORT_ERROR` holds the reason and
`unicorn`/`x86` are None, so the CLI and the KVM engine keep working.

pyhv's native code is loaded first (built with gcc on first use, cached): libunicorn then
binds its per-block TB-start helper to pyhv's block counter (native/__init__.py). Code
that needs unicorn imports it from here, so that this order holds; where unicorn was
imported before, the engine counts blocks with the slower block hook instead.
"""

from __future__ import annotations

import sys
from typing import Any

from pyhv.engines.emu import native as _native

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
except Exception as e:  # noqa: BLE001 - any import failure disables the engine
    unicorn, x86 = None, None
    IMPORT_ERROR = f"{type(e).__name__}: {e}"
