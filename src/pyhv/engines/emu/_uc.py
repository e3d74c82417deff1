"""unicorn, imported once: `unicorn` and `x86` (its x86 constants), or the import error.

Importing this module never fails: without unicorn, `IMPORT_ERROR` holds the reason and
`unicorn`/`x86` are None, so the CLI and the KVM engine keep working.
"""

from __future__ import annotations

from typing import Any

unicorn: Any
x86: Any
IMPORT_ERROR: str | None

try:
    import unicorn as _unicorn
    from unicorn import x86_const as _x86

    unicorn, x86, IMPORT_ERROR = _unicorn, _x86, None
except Exception as e:  # noqa: BLE001 - any import failure disables the engine
    unicorn, x86 = None, None
    IMPORT_ERROR = f"{type(e).__name__}: {e}"
