"""Helpers of the snapshot tests: the counting guest's expected output, and edits that
make a snapshot directory damaged or foreign."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyhv.snapshot.manifest import MANIFEST, RAM


def counting(n: int) -> bytes:
    """tests/guests/core/counter.S's output up to "count n"."""
    return b"".join(b"count %d\n" % i for i in range(1, n + 1))


def continues(text: bytes, offset: int) -> None:
    """`text` is the counter's output from byte `offset` of its whole output on."""
    n = max([int(x) for x in re.findall(rb"count (\d+)", text)] + [1]) + 2
    whole = counting(n)
    assert len(text) > 20, text
    assert whole[offset:offset + len(text)] == text, \
        f"expected to continue at {offset}: {whole[offset:offset + 40]!r}, got {text[:40]!r}"


def offset_in_count(text: bytes) -> int:
    """Where in the counter's whole output `text` (a contiguous piece of it, more than
    one line long) begins; AssertionError if it is not such a piece."""
    m = re.search(rb"count (\d+)\n", text)
    assert m is not None, text[:80]
    n = int(m.group(1))
    offset = len(counting(n - 1)) - m.start()
    assert offset >= 0
    continues(text, offset)
    return offset


def rewrite_json(snapdir: Path, name: str, change: Callable[[dict[str, Any]], None]) -> None:
    """Change a JSON file of a snapshot and keep the manifest's checksum of it right (a
    foreign but consistent snapshot, not a damaged one)."""
    path = snapdir / name
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    if name != MANIFEST:
        m = json.loads((snapdir / MANIFEST).read_text())
        m["files"][name] = {"size": path.stat().st_size,
                            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        (snapdir / MANIFEST).write_text(json.dumps(m))


def flip_ram_byte(snapdir: Path) -> None:
    """Change one byte of guest RAM data (the kernel's pages at 1 MiB hold data)."""
    fd = os.open(snapdir / RAM, os.O_RDWR)
    try:
        at = os.lseek(fd, 0x100000, os.SEEK_DATA)
        b = os.pread(fd, 1, at)
        os.pwrite(fd, bytes([b[0] ^ 0x40]), at)
    finally:
        os.close(fd)
