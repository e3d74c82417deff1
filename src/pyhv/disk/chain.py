"""The files of a backing chain: identity, membership and a header-only walk.

    top.qcow2 --backing--> mid.qcow2 --backing--> base.raw

Two names are the same file when they resolve to the same device and inode (hard links,
symlinks and `./x` spellings included; `open.file_id`); a name that does not exist yet is
compared by its real path. `walk` follows a chain image by image (each opened, locked,
without its backing file), so it works on chains that `open_image` refuses; `names`
follows it from the headers alone, without locks, for checks on chains that may be in
use or broken. Both are bounded by `MAX_CHAIN_DEPTH` and report a file met twice as
qemu-img does ("Backing file 'X' creates an infinite loop."), so no walk loops. `devices`
lists an opened chain (`open_image` already refused cycles and over-deep chains there).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from pyhv.disk.blockdev import BlockDevice
from pyhv.disk.open import (
    MAX_CHAIN_DEPTH,
    FileId,
    backing_of,
    file_id,
    open_image,
    probe,
    resolve_backing,
    same_file,
)
from pyhv.disk.qcow2.image import Qcow2Image
from pyhv.errors import ImageError


def devices(dev: BlockDevice) -> list[BlockDevice]:
    """An opened chain, top first (bounded even if a caller linked devices by hand)."""
    out: list[BlockDevice] = []
    cur: BlockDevice | None = dev
    while cur is not None and len(out) <= MAX_CHAIN_DEPTH:
        out.append(cur)
        cur = cur.backing if isinstance(cur, Qcow2Image) else None
    return out


def device_path(dev: BlockDevice) -> str:
    path = getattr(dev, "path", None)
    return path if isinstance(path, str) else "?"


def _visit(path: str, seen: set[FileId], depth: int) -> None:
    """Refuse a file met before (a loop) or a chain past MAX_CHAIN_DEPTH."""
    ident = file_id(path)
    if ident in seen:
        raise ImageError(f"Backing file '{path}' creates an infinite loop.")
    if depth > MAX_CHAIN_DEPTH:
        raise ImageError(f"backing chain deeper than {MAX_CHAIN_DEPTH} images")
    seen.add(ident)


def walk(path: str, fmt: str | None = None, *,
         force_share: bool = False) -> Iterator[tuple[str, BlockDevice]]:
    """Yield (path, image opened read-only, locked, without its backing file), top
    first (`force_share`: qemu-img's -U). Each image is closed when the caller asks for
    the next one; a loop is an ImageError."""
    seen: set[FileId] = set()
    depth = 0
    cur: str | None = path
    while cur is not None:
        _visit(cur, seen, depth)
        dev = open_image(cur, fmt, backing=False, force_share=force_share)
        try:
            yield cur, dev
            nxt: str | None = None
            if isinstance(dev, Qcow2Image) and dev.h.backing_file:
                nxt = resolve_backing(cur, dev.h.backing_file)
                fmt = dev.h.backing_format
        finally:
            dev.close()
        cur = nxt
        depth += 1


def names(path: str, fmt: str | None = None) -> Iterator[str]:
    """The files of the chain from `path`, top first, read from their headers without
    taking locks (as QEMU's format probe reads), so that images in use by a guest can be
    looked at; a file that cannot be read ends the chain quietly (it may be missing or
    broken: this is for checks that must work on such chains); a loop is an
    ImageError."""
    seen: set[FileId] = set()
    depth = 0
    cur: str | None = path
    while cur is not None:
        _visit(cur, seen, depth)
        yield cur
        try:
            if (fmt or probe(cur)) != "qcow2":
                return
            name, fmt = backing_of(cur)
        except ImageError:
            return
        cur = resolve_backing(cur, name) if name else None
        depth += 1


def chain_holds(path: str, fmt: str | None, target: str) -> bool:
    """Whether `target` is `path` or a file of its backing chain (read from headers,
    tolerating files that cannot be opened; a loop in the chain is an ImageError)."""
    if same_file(path, target):
        return True
    if not os.path.exists(path):
        return False
    return any(same_file(p, target) for p in names(path, fmt))
