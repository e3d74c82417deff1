"""Parsing of human sizes such as `128M`, `1G`, `512k`, `4096` (bytes).

Suffixes are binary (K = 1024), case-insensitive, optionally followed by `B` or `iB`,
as qemu-img and QEMU's `-m` accept them. A plain number is bytes unless the caller
passes `default_unit` (QEMU's `-m 128` means MiB).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from pyhv.errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50,
          "e": 1 << 60}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpeb]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str, *, default_unit: str = "") -> int:
    """Return the size in bytes; raise ConfigError on malformed input."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"malformed size {text!r} (expected e.g. 4096, 512K, 128M, 2G)")
    number, unit = m.group(1), m.group(2).lower()
    if unit == "" and default_unit:
        unit = default_unit.lower()
    value = Fraction(number) * _UNITS[unit]   # exact: a float would round 1.0000000000000001K
    if value.denominator != 1:
        raise ConfigError(f"size {text!r} is not a whole number of bytes")
    return int(value)


_SUFFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")


def format_size(n: int) -> str:
    """Render bytes exactly as qemu-img does: `64 MiB`, `1.5 GiB`, `0.977 MiB`, `512 B`.

    qemu-img picks the unit from log2(n * 1024 / 1000), so a value whose integer part
    would reach 1000 moves up a unit (1000 KiB prints `0.977 MiB`, 1 << 60 prints
    `1 EiB`), and prints three significant digits with C's `%0.3g` (Python's `.3g` is
    the same); one narrow band (999.5 to 1000 of a unit) therefore prints as
    `1e+03 KiB`, as qemu-img's does.
    """
    if n <= 0:
        return f"{n} B"
    _, exp = math.frexp(n / (1000 / 1024))
    i = min(max((exp - 1) // 10, 0), len(_SUFFIXES) - 1)
    return f"{n / (1 << (10 * i)):0.3g} {_SUFFIXES[i]}B"

