"""Opening a disk image by path: format probe and backing chain.

    top.qcow2 --backing--> mid.qcow2 --backing--> base.raw

A relative backing name is resolved against the directory of the image that names it
(as QEMU does). The chain is opened read-only below the top image, is capped at
MAX_CHAIN_DEPTH images, and a file met twice is a cycle: both are ImageErrors naming the
files. A file is identified by its device and inode (`file_id`), so a loop through a
hard link, a symlink or another spelling of a path is reported as the loop it is. A
backing format named in the image's header extension is used as given; otherwise the
format is probed (qcow2 magic, else raw).

Every image of the chain is opened with QEMU's permission locks (lock.py): the top one
for what the caller asks (read-only or read-write), the backing files read-only. An
image another process uses in a conflicting way is refused with QEMU's message
("Failed to get "write" lock / Is another process using the image [path]?"), and
`force_share` (qemu-img's -U, read-only opens only) shares everything, for the whole
chain; `guest` (a guest's disk, e.g. virtio-blk) refuses to share writes as QEMU's block
devices do (which changes only what a raw image allows others). Whatever was opened is
closed again when a later step fails.
"""

from __future__ import annotations

import os

from pyhv.disk.blockdev import BlockDevice
from pyhv.disk.lock import access_for
from pyhv.disk.qcow2.header import MAGIC, MAX_CLUSTER_BITS, parse_header
from pyhv.disk.qcow2.image import Qcow2Image
from pyhv.disk.raw import RawImage
from pyhv.errors import ImageError

MAX_CHAIN_DEPTH = 64
FORMATS = ("raw", "qcow2")

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


def backing_of(path: str) -> tuple[str | None, str | None]:
    """(backing file name, backing format) from a qcow2 header, read without locks (as
    QEMU's format probe reads)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ImageError(f"cannot open {path}: {e.strerror}") from e
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 4096, 0)
        if len(head) >= 24:
            bits = int.from_bytes(head[20:24], "big")
            if 12 < bits <= MAX_CLUSTER_BITS:
                head = os.pread(fd, 1 << bits, 0)
    finally:
        os.close(fd)
    h = parse_header(head, size)
    return h.backing_file, h.backing_format


def open_image(path: str, fmt: str | None = None, *, read_only: bool = True,
               backing: bool = True, force_share: bool = False, guest: bool = False,
               _seen: tuple[tuple[FileId, str], ...] = ()) -> BlockDevice:
    """Open `path` (and, unless backing=False, its backing chain), locked."""
    ident = file_id(path)
    if any(ident == i for i, _name in _seen):
        names = [name for _i, name in _seen] + [path]
        raise ImageError(f"backing chain has a cycle: {' -> '.join(names)}")
    if len(_seen) >= MAX_CHAIN_DEPTH:
        raise ImageError(f"backing chain deeper than {MAX_CHAIN_DEPTH} images")
    if not os.path.exists(path):
        if _seen:
            raise ImageError(f"backing file {path} of {_seen[-1][1]} does not exist")
        raise ImageError(f"{path}: no such file")
    fmt = fmt or probe(path)
    if fmt not in FORMATS:
        raise ImageError(f"unknown image format {fmt!r} (supported: raw, qcow2)")
    access = access_for(fmt, read_only=read_only, force_share=force_share,
                        guest=guest and not _seen)
    if fmt == "raw":
        return RawImage(path, read_only=read_only, access=access)
    name, bfmt = backing_of(path)
    back: BlockDevice | None = None
    if name and backing:
        bpath = resolve_backing(path, name)
        if bfmt is not None and bfmt not in FORMATS:
            raise ImageError(f"unknown backing format {bfmt!r} in {path}")
        back = open_image(bpath, bfmt, read_only=True, force_share=force_share,
                          _seen=_seen + ((ident, path),))
    try:
        return Qcow2Image(path, read_only=read_only, backing=back, access=access)
    except BaseException:
        if back is not None:
            back.close()
        raise
