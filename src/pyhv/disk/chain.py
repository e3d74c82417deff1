"""The files of a backing chain: identity, membership and a header-only walk.

    top.qcow2 --backing--> mid.qcow2 --backing--> base.raw

Two names are the same file when they resolve to the same device and inode (hard links,
symlinks and `./x` spellings included); a name that does not exist yet is compared by its
real path. `walk` follows a chain by reading each image's header only (the image is
opened without its backing file), so it works on chains that `open_image` refuses; it is
bounded by `MAX_CHAIN_DEPTH` and reports a file met twice as qemu-img does ("Backing file
'X' creates an infinite loop."), so no walk loops. `devices` lists an opened chain
(`open_image` already refused cycles and over-deep chains there).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from pyhv.disk.blockdev import BlockDevice
from pyhv.disk.open import MAX_CHAIN_DEPTH, open_image, resolve_backing
from pyhv.disk.qcow2.image import Qcow2Image
from pyhv.errors import ImageError

FileId = tuple[int, int] | str


def file_id(path: str) -> FileId:
    """(st_dev, st_ino) of an existing file, else its real path."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return (st.st_dev, st.st_ino)


def same_file(a: str, b: str) -> bool:
    return file_id(a) == file_id(b) or os.path.realpath(a) == os.path.realpath(b)


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


def walk(path: str, fmt: str | None = None, *,
         tolerant: bool = False) -> Iterator[tuple[str, BlockDevice]]:
    """Yield (path, image opened read-only without its backing file), top first.

    Each image is closed when the caller asks for the next one. With tolerant=True a
    backing file that cannot be opened ends the walk quietly (for checks that must
    work on broken chains); a loop is always an ImageError."""
    seen: set[FileId] = set()
    depth = 0
    cur: str | None = path
    while cur is not None:
        ident = file_id(cur)
        if ident in seen:
            raise ImageError(f"Backing file '{cur}' creates an infinite loop.")
        if depth > MAX_CHAIN_DEPTH:
            raise ImageError(f"backing chain deeper than {MAX_CHAIN_DEPTH} images")
        seen.add(ident)
        try:
            dev = open_image(cur, fmt, backing=False)
        except ImageError:
            if tolerant and depth:
                return
            raise
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


def chain_holds(path: str, fmt: str | None, target: str) -> bool:
    """Whether `target` is `path` or a file of its backing chain (read from headers,
    tolerating files that cannot be opened; a loop in the chain is an ImageError)."""
    if same_file(path, target):
        return True
    if not os.path.exists(path):
        return False
    return any(same_file(p, target) for p, _dev in walk(path, fmt, tolerant=True))
