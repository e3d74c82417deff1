"""The exit marker: how a guest command's exit status comes back over the console.

pyhv's /init (pyhv.images) runs the command in `pyhv.cmd=<base64>` and then prints

    @@PYHV-EXIT <status>@@

(the plain marker, `ExitMarker()`). That marker is public: a command whose output holds
such a line would fake the status and hide what follows. So `pyhv run --command CMD`
does not hand CMD to /init as is but a wrapper (`ExitMarker.wrap`) that runs CMD in its
own `sh -c` and then prints a marker carrying a nonce drawn for this run
(`ExitMarker.fresh()`: 64 random bits, 16 hex digits):

    @@PYHV-EXIT-<nonce> <status>@@

right after CMD's output, on its last line if that lacks a newline (`printf abc`). /init
then prints its own plain marker and powers off; pyhv shows neither, since everything
after the first marker of this run's nonce is the guest shutting down.

Unforgeable in practice: the nonce reaches the guest only inside the base64-encoded
command line, and the wrapper builds the marker from printf arguments, so not even
printing the decoded wrapper prints a marker with the nonce. Only markers that carry
this run's nonce count; any other text, marker-like or not, is command output.

Recognition is one streaming scanner (`MarkerScanner`), used by the console as output
arrives and by `parse()` over a whole capture (QEMU's output in tests): it passes on at
once every byte that cannot start a marker and holds back only the longest tail that is
still a prefix of one (at most the prefix, 3 digits and "@@"), so a prompt or a partial
line shows without delay, in order.

Invariants: what the scanner passes on, followed by what it holds, is exactly what it
was fed, until a marker completes; the marker and everything after it are never passed
on; the status is the shell's, 0-255.
"""

from __future__ import annotations

import re
import secrets
import shlex
from dataclasses import dataclass

MARKER_WORD = "@@PYHV-EXIT"
_TAIL = re.compile(rb"(\d{1,3})(@{0,2})")


@dataclass(frozen=True)
class ExitMarker:
    """One marker format: the plain /init one (nonce "") or a run's own (a nonce)."""

    nonce: str = ""

    @classmethod
    def fresh(cls) -> ExitMarker:
        return cls(secrets.token_hex(8))

    @property
    def prefix(self) -> bytes:
        """The bytes every marker of this format starts with, up to the status."""
        return (f"{MARKER_WORD}-{self.nonce} " if self.nonce else f"{MARKER_WORD} ").encode()

    def text(self, status: int) -> bytes:
        """The marker for `status`, as the guest prints it (without the newline)."""
        return self.prefix + str(status).encode() + b"@@"

    def wrap(self, command: str) -> str:
        """A shell script that runs `command` in its own `sh -c`, prints this marker with
        its status and exits with that status. The script's text holds no marker."""
        if not self.nonce:
            return command
        return (f"sh -c {shlex.quote(command)}\n"
                "s=$?\n"
                f"printf '{MARKER_WORD}-%s %d@@\\n' {self.nonce} \"$s\"\n"
                'exit "$s"\n')

    def scanner(self) -> MarkerScanner:
        return MarkerScanner(self.prefix)

    def parse(self, data: bytes) -> int | None:
        """The status in the first marker of this format inside `data`, or None."""
        sc = self.scanner()
        sc.feed(data)
        return sc.status


class MarkerScanner:
    """Finds a marker in a byte stream fed piece by piece; passes the rest on."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.status: int | None = None     # set once a marker completes
        self._held = bytearray()

    @property
    def done(self) -> bool:
        return self.status is not None

    def feed(self, data: bytes) -> bytes:
        """The bytes of `data` (and of what was held) that are certainly not a marker.
        After a marker completes, nothing more is passed on."""
        if self.status is not None:
            return b""
        held = self._held
        if not held and 0x40 not in data:         # no '@': nothing can start a marker
            return data
        out = bytearray()
        for b in data:
            if not held and b != 0x40:
                out.append(b)
                continue
            held.append(b)
            while held:
                state = self._state(held)
                if state is None:                 # not a marker: release its first byte
                    out.append(held.pop(0))
                    continue
                if state >= 0:
                    self.status = state
                    held.clear()
                    return bytes(out)
                break                             # still possibly a marker: hold it
        return bytes(out)

    def finish(self) -> bytes:
        """The stream ended: release what was held (it was not a marker)."""
        out = bytes(self._held)
        self._held.clear()
        return out if self.status is None else b""

    def _state(self, held: bytearray) -> int | None:
        """None: `held` cannot become a marker; -1: it may; n >= 0: a marker of status n."""
        p = self.prefix
        if len(held) <= len(p):
            return -1 if p.startswith(held) else None
        if not held.startswith(p):
            return None
        m = _TAIL.fullmatch(held, len(p))
        if m is None:
            return None
        if m.group(2) == b"@@":
            return int(m.group(1)) & 0xFF
        return -1
