"""Creating an empty qcow2 image (what `qemu-img create -f qcow2` writes).

    cluster 0            header, extensions, backing file name
    clusters 1..         refcount table (t clusters)
    then                 refcount blocks covering all of the above (b clusters)
    then                 L1 table, zeroed (covers the virtual size)

The metadata clusters count 1 each; everything else is unallocated. The file is locked
as its creator and the new image's bytes are reserved on it (lock.create_locked) before
it is truncated: an image another process uses, or one the file system has no room to
replace, is refused unchanged.
"""

from __future__ import annotations

import os
import struct

from pyhv.disk.lock import create_locked
from pyhv.disk.qcow2.header import (
    COMPAT_LAZY_REFCOUNTS,
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    MAX_VIRTUAL_SIZE,
    MIN_CLUSTER_BITS,
    Header,
    l1_entries_needed,
)
from pyhv.disk.qcow2.refcount import encode_counts
from pyhv.errors import ImageError


def create(path: str, size: int, *, cluster_size: int = 65536, version: int = 3,
           refcount_bits: int = 16, backing_file: str | None = None,
           backing_format: str | None = None, lazy_refcounts: bool = False) -> None:
    """Write a new, empty qcow2 image at `path` (replacing any file there)."""
    cb = cluster_size.bit_length() - 1
    if cb < 0 or cluster_size != 1 << cb or not MIN_CLUSTER_BITS <= cb <= MAX_CLUSTER_BITS:
        raise ImageError(f"cluster size {cluster_size} must be a power of two between 512 "
                         "and 2M")
    if version not in (2, 3):
        raise ImageError(f"unsupported qcow2 version {version}")
    order = refcount_bits.bit_length() - 1
    if order < 0 or refcount_bits != 1 << order or order > 6:
        raise ImageError(f"refcount_bits {refcount_bits} must be a power of two up to 64")
    if version == 2 and refcount_bits != 16:
        raise ImageError("version 2 (compat=0.10) images need refcount_bits=16")
    if version == 2 and lazy_refcounts:
        raise ImageError("lazy refcounts need version 3 (compat=1.1)")
    if size < 0 or size > MAX_VIRTUAL_SIZE:
        raise ImageError(f"image size {size} out of range")
    size = -(-size // 512) * 512  # qemu-img rounds up to whole sectors
    l1_n = l1_entries_needed(size, cb)
    if l1_n * 8 > MAX_L1_BYTES:
        raise ImageError("image too large for this cluster size")
    l1c = max(1, -(-l1_n * 8 // cluster_size))
    per = cluster_size * 8 // refcount_bits
    t, b = 1, 1
    while True:
        n_meta = 1 + t + b + l1c
        b2 = -(-n_meta // per)
        t2 = max(1, -(-b2 * 8 // cluster_size))
        if (b2, t2) == (b, t):
            break
        b, t = b2, t2
    h = Header(version=version, backing_file_offset=0, backing_file_size=0, cluster_bits=cb,
               size=size, crypt_method=0, l1_size=l1_n,
               l1_table_offset=(1 + t + b) * cluster_size,
               refcount_table_offset=cluster_size, refcount_table_clusters=t, nb_snapshots=0,
               snapshots_offset=0, refcount_order=order,
               compatible_features=COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0,
               backing_file=backing_file, backing_format=backing_format)
    out = bytearray(h.pack().ljust(cluster_size, b"\0"))
    table = [(1 + t + i) * cluster_size for i in range(b)]
    out += struct.pack(f">{len(table)}Q", *table).ljust(t * cluster_size, b"\0")
    counts = [1] * n_meta + [0] * (b * per - n_meta)
    out += encode_counts(counts, order)
    out += bytes(l1c * cluster_size)
    fd = create_locked(path, len(out), reserve=True)  # nothing lost if it cannot fit
    try:
        view = memoryview(out)
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        raise ImageError(f"cannot create {path}: {e.strerror}") from e
    finally:
        os.close(fd)
