"""Device state records: the protocol a device implements to be saved and restored.

Design: a stateful device offers

    state_version: int                      the layout of its record (ClassVar)
    save_state() -> dict                    a JSON-able dict: ints, bools, strings,
                                            None, lists and dicts of those (bytes as hex)
    load_state(record, version) -> None     validate every field, then take the state

`load_state` reads the record through a `Reader`, which checks each field's presence,
type and range and raises `StateError` naming the device and the field; a record with a
field the layout does not have is refused too (it came from another layout). A device
validates the whole record before it assigns anything, so a refused record leaves the
device as it was. A `version` newer than the class's `state_version` is refused
(`check_version`); an older one is read by the device's own upgrade code, if any.

What a record holds: the guest-visible state, and enough to re-arm the device's timers
on the machine's clock after the clock has been restored (timer callbacks are never
saved: `load_state` cancels the device's armed timers and arms them again). What it
does not hold: host wiring (IRQ lines, callbacks, the clock object), configuration the
machine gives the device at creation (fw_cfg's items, the CMOS memory size), statistics.
The record's name (which device of the machine it belongs to) is the machine's business
(pyhv.vmstate).

Invariants: `save_state()` never changes the device; `load_state` either raises or
leaves the device exactly in the saved state, with its IRQ output levels as recorded
(levels are restored without driving the lines: the interrupt controllers' records hold
the matching input levels).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

from pyhv.errors import StateError

U8 = 0xFF
U16 = 0xFFFF
U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF
MAX_NS = (1 << 63) - 1          # guest time stays a signed 64-bit nanosecond count

# the builtins, for annotations inside Reader (whose methods are named int, str, bool)
_Int = int
_Str = str
_Bool = bool


class Stateful(Protocol):
    """A device whose state can be saved and restored."""

    state_version: ClassVar[int]

    def save_state(self) -> dict[str, Any]: ...

    def load_state(self, record: Mapping[str, Any], version: int) -> None: ...


def check_version(what: str, version: object, current: int) -> int:
    """The record's version as an int, refusing a newer one than `current`."""
    if type(version) is not int or version < 1:
        raise StateError(f"{what}: state version {version!r} is not a version number")
    if version > current:
        raise StateError(f"{what}: version {version} is newer than this pyhv "
                         f"reads ({current})")
    return version


class Reader:
    """Reads one record's fields, each checked; `done()` refuses fields left over."""

    def __init__(self, what: _Str, record: object) -> None:
        if not isinstance(record, Mapping):
            raise StateError(f"{what}: the record is {type(record).__name__}, "
                             f"not an object")
        self.what = what
        self._rec = record
        self._seen: set[_Str] = set()

    def _get(self, key: _Str) -> Any:
        if key not in self._rec:
            raise StateError(f"{self.what}: field {key!r} is missing")
        self._seen.add(key)
        return self._rec[key]

    def fail(self, key: _Str, why: _Str) -> StateError:
        return StateError(f"{self.what}: field {key!r} {why}")

    def int(self, key: _Str, lo: _Int = 0, hi: _Int = U64) -> _Int:
        return self._int(key, self._get(key), lo, hi)

    def _int(self, key: _Str, v: object, lo: _Int, hi: _Int) -> _Int:
        if type(v) is not int:
            raise self.fail(key, f"is {type(v).__name__}, not an integer")
        if not lo <= v <= hi:
            raise self.fail(key, f"= {v} is outside {lo}..{hi}")
        return v

    def opt_int(self, key: _Str, lo: _Int = 0, hi: _Int = U64) -> _Int | None:
        v = self._get(key)
        return None if v is None else self._int(key, v, lo, hi)

    def bool(self, key: _Str) -> _Bool:
        v = self._get(key)
        if type(v) is not bool:
            raise self.fail(key, f"is {type(v).__name__}, not true/false")
        return v

    def str(self, key: _Str, max_len: _Int = 256) -> _Str:
        v = self._get(key)
        if type(v) is not str:
            raise self.fail(key, f"is {type(v).__name__}, not a string")
        if len(v) > max_len:
            raise self.fail(key, f"is longer than {max_len} characters")
        return v

    def ints(self, key: _Str, lo: _Int = 0, hi: _Int = U64, *, length: _Int | None = None,
             max_len: _Int | None = None) -> list[_Int]:
        v = self._get(key)
        if not isinstance(v, list):
            raise self.fail(key, f"is {type(v).__name__}, not a list")
        if length is not None and len(v) != length:
            raise self.fail(key, f"has {len(v)} items, not {length}")
        if max_len is not None and len(v) > max_len:
            raise self.fail(key, f"has {len(v)} items, more than {max_len}")
        return [self._int(f"{key}[{i}]", x, lo, hi) for i, x in enumerate(v)]

    def bools(self, key: _Str, *, length: _Int) -> list[_Bool]:
        v = self._get(key)
        if not isinstance(v, list) or len(v) != length or \
                any(type(x) is not bool for x in v):
            raise self.fail(key, f"is not a list of {length} true/false values")
        return list(v)

    def hex(self, key: _Str, *, length: _Int | None = None, max_len: _Int | None = None
            ) -> bytes:
        v = self._get(key)
        if type(v) is not str:
            raise self.fail(key, f"is {type(v).__name__}, not a hex string")
        try:
            b = bytes.fromhex(v)
        except ValueError:
            raise self.fail(key, "is not a hex string") from None
        if length is not None and len(b) != length:
            raise self.fail(key, f"holds {len(b)} bytes, not {length}")
        if max_len is not None and len(b) > max_len:
            raise self.fail(key, f"holds {len(b)} bytes, more than {max_len}")
        return b

    def opt_hex(self, key: _Str, *, length: _Int) -> bytes | None:
        if key in self._rec and self._rec[key] is None:
            self._seen.add(key)
            return None
        return self.hex(key, length=length)

    def opt_hex_max(self, key: _Str, *, max_len: _Int) -> bytes | None:
        if key in self._rec and self._rec[key] is None:
            self._seen.add(key)
            return None
        return self.hex(key, max_len=max_len)

    def int_map(self, key: _Str, *, key_hi: _Int, hi: _Int, max_len: _Int) -> dict[_Int, _Int]:
        """An object whose keys are decimal numbers 0..key_hi and values 0..hi."""
        sub = self.sub(key)
        keys = sub.keys()
        if len(keys) > max_len:
            raise self.fail(key, f"has {len(keys)} entries, more than {max_len}")
        out: dict[_Int, _Int] = {}
        for k in keys:
            if not (isinstance(k, str) and k.isdigit() and len(k) <= 20
                    and int(k) <= key_hi):
                raise self.fail(key, f"has a key {k!r} that is not a number 0..{key_hi}")
            out[int(k)] = sub.int(k, 0, hi)
        return out

    def keys(self) -> list[_Str]:
        """The record's field names (a record whose fields are names: a table)."""
        return [k if isinstance(k, str) else repr(k) for k in self._rec]

    def raw(self, key: _Str) -> Any:
        """A field's value unchecked, for the caller (or a later reader) to check."""
        return self._get(key)

    def has(self, key: _Str) -> _Bool:
        return key in self._rec

    def subs_list(self, key: _Str, *, max_len: _Int) -> list[Any]:
        """A list of at most max_len items, each for the caller to check."""
        v = self._get(key)
        if not isinstance(v, list):
            raise self.fail(key, f"is {type(v).__name__}, not a list")
        if len(v) > max_len:
            raise self.fail(key, f"has {len(v)} items, more than {max_len}")
        return v

    def sub(self, key: _Str) -> Reader:
        """A nested record (its own `done()` is the caller's)."""
        return Reader(f"{self.what}.{key}", self._get(key))

    def subs(self, key: _Str, *, length: _Int) -> list[Reader]:
        v = self._get(key)
        if not isinstance(v, list) or len(v) != length:
            raise self.fail(key, f"is not a list of {length} records")
        return [Reader(f"{self.what}.{key}[{i}]", x) for i, x in enumerate(v)]

    def done(self) -> None:
        extra = sorted(str(k) for k in self._rec if k not in self._seen)
        if extra:
            raise StateError(f"{self.what}: unknown field(s) {', '.join(extra)} "
                             f"(a record of another layout)")
