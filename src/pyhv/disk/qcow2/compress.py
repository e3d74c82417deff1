"""Compressed clusters: raw deflate streams (zlib, window bits -12), as QEMU writes them.

A compressed cluster holds one guest cluster deflated with no zlib header or trailer;
the stream starts at any byte offset and its sector count is rounded up (cluster.py), so
the reader may be handed a few bytes past the stream's end and must ignore them.
"""

from __future__ import annotations

import zlib

from pyhv.errors import ImageError


def compress_cluster(data: bytes) -> bytes | None:
    """Deflate one cluster; None when compression does not save space."""
    c = zlib.compressobj(6, zlib.DEFLATED, -12)
    out = c.compress(data) + c.flush()
    return out if len(out) < len(data) else None


def decompress_cluster(stream: bytes, cluster_size: int) -> bytes:
    d = zlib.decompressobj(-12)
    try:
        out = d.decompress(stream, cluster_size)
    except zlib.error as e:
        raise ImageError(f"corrupt compressed cluster: {e}") from e
    if len(out) != cluster_size:
        raise ImageError(f"compressed cluster inflates to {len(out)} bytes, not "
                         f"{cluster_size}")
    return out
