"""Opening a disk image by path: format probe and backing chain.

    top.qcow2 --backing--> mid.qcow2 --backing--> base.raw

A relative backing name is resolved against the directory of the image that names it
(as QEMU does). The chain is opened read-only below the top image, is capped at
MAX_CHAIN_DEPTH images, and a file met twice (by real path) is a cycle: both are
ImageErrors naming the files. A backing format named in the image's header extension
is used as given; otherwise the format is probed (qcow2 magic, else raw).
"""

from __future__ import annotations

import os

from pyhv.disk.blockdev import BlockDevice
from pyhv.disk.qcow2.header import MAGIC
from pyhv.disk.qcow2.image import Qcow2Image
from pyhv.disk.raw import RawImage
from pyhv.errors import ImageError

MAX_CHAIN_DEPTH = 64
FORMATS = ("raw", "qcow2")


def probe(path: str) -> str:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ImageError(f"cannot open {path}: {e.strerror}") from e
    return "qcow2" if magic == MAGIC else "raw"


def resolve_backing(image_path: str, name: str) -> str:
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(image_path), name)


def open_image(path: str, fmt: str | None = None, *, read_only: bool = True,
               backing: bool = True, _seen: tuple[str, ...] = ()) -> BlockDevice:
    """Open `path` (and, unless backing=False, its backing chain)."""
    real = os.path.realpath(path)
    if real in _seen:
        raise ImageError(f"backing chain has a cycle: {' -> '.join(_seen + (real,))}")
    if len(_seen) >= MAX_CHAIN_DEPTH:
        raise ImageError(f"backing chain deeper than {MAX_CHAIN_DEPTH} images")
    if not os.path.exists(path):
        if _seen:
            raise ImageError(f"backing file {path} of {_seen[-1]} does not exist")
        raise ImageError(f"{path}: no such file")
    fmt = fmt or probe(path)
    if fmt == "raw":
        return RawImage(path, read_only=read_only)
    if fmt != "qcow2":
        raise ImageError(f"unknown image format {fmt!r} (supported: raw, qcow2)")
    img = Qcow2Image(path, read_only=True)
    name, bfmt = img.h.backing_file, img.h.backing_format
    img.close()
    back: BlockDevice | None = None
    if name and backing:
        bpath = resolve_backing(path, name)
        if bfmt is not None and bfmt not in FORMATS:
            raise ImageError(f"unknown backing format {bfmt!r} in {path}")
        back = open_image(bpath, bfmt, read_only=True, _seen=_seen + (real,))
    try:
        return Qcow2Image(path, read_only=read_only, backing=back)
    except BaseException:
        if back is not None:
            back.close()
        raise
