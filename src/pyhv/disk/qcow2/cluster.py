"""L1 and L2 table entries: decoding and validation (qcow2.txt "Cluster mapping").

    L1 entry:  63 COPIED | 62..56 reserved | 55..9 L2 table offset | 8..0 reserved
    L2 entry, standard cluster:
               63 COPIED | 62 = 0 | 61..56 reserved | 55..9 host offset | 8..1 reserved
               | 0 reads-as-zero (v3)
    L2 entry, compressed cluster (bit 62 = 1), with x = 62 - (cluster_bits - 8):
               61..x  additional 512-byte sectors holding the deflate stream
               x-1..0 host byte offset of the stream (not aligned)

COPIED means "refcount is exactly 1": a write may go in place. A standard entry with offset
0 and bit 0 clear is unallocated (reads from the backing file, or zeros). Compressed
entries never carry COPIED.

`Mapping` validation (`check_l2_entry`) refuses reserved bits, unaligned offsets, clusters
past the end of the file and clusters inside metadata, so that a hostile image cannot make
pyhv read outside the file or write over its own tables.
"""

from __future__ import annotations

from pyhv.errors import ImageError

COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1
OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1_RESERVED = 0x7F000000000001FF
L2_RESERVED = 0x3F000000000001FE

KIND_UNALLOCATED = 0
KIND_ZERO = 1
KIND_NORMAL = 2
KIND_COMPRESSED = 3


def compressed_fields(cluster_bits: int) -> tuple[int, int]:
    """(offset mask, sector-count shift) of a compressed L2 entry."""
    x = 62 - (cluster_bits - 8)
    return (1 << x) - 1, x


def decode_compressed(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, byte length to read) of a compressed cluster's deflate stream."""
    mask, shift = compressed_fields(cluster_bits)
    off = entry & mask
    nsect = ((entry & ~COPIED & ~COMPRESSED) >> shift) + 1
    return off, nsect * 512 - (off & 511)


def encode_compressed(off: int, length: int, cluster_bits: int) -> int:
    mask, shift = compressed_fields(cluster_bits)
    nsect = (off + length - 1) // 512 - off // 512  # additional sectors
    return COMPRESSED | (nsect << shift) | off


def kind_of(entry: int) -> int:
    if entry & COMPRESSED:
        return KIND_COMPRESSED
    if entry & ZERO:
        return KIND_ZERO
    if entry & OFFSET_MASK:
        return KIND_NORMAL
    return KIND_UNALLOCATED


def compressed_clusters(entry: int, cluster_bits: int) -> range:
    """Host cluster indices touched by a compressed cluster's stream."""
    off, length = decode_compressed(entry, cluster_bits)
    return range(off >> cluster_bits, ((off + length - 1) >> cluster_bits) + 1)


def check_l1_entry(i: int, e: int, cs: int, file_size: int) -> None:
    if e & L1_RESERVED:
        raise ImageError(f"L1 entry {i} has reserved bits set ({e:#x})")
    off = e & OFFSET_MASK
    if off % cs:
        raise ImageError(f"L1 entry {i}: L2 table offset {off:#x} is not cluster-aligned")
    if off + cs > file_size:
        raise ImageError(f"L1 entry {i}: L2 table at {off:#x} lies past the end of the file")


def check_l2_entry(where: str, e: int, version: int, cluster_bits: int,
                   file_size: int) -> None:
    cs = 1 << cluster_bits
    if e & COMPRESSED:
        if e & COPIED:
            raise ImageError(f"{where}: compressed cluster with COPIED flag")
        off, length = decode_compressed(e, cluster_bits)
        if off + length > file_size + 512 or off >= file_size:
            raise ImageError(f"{where}: compressed data at {off:#x} lies past the end of "
                             "the file")
        return
    if e & L2_RESERVED:
        raise ImageError(f"{where}: reserved bits set in L2 entry ({e:#x})")
    if e & ZERO and version < 3:
        raise ImageError(f"{where}: zero-cluster flag in a version 2 image")
    off = e & OFFSET_MASK
    if off % cs:
        raise ImageError(f"{where}: data cluster offset {off:#x} is not cluster-aligned")
    if off and off >= file_size:
        raise ImageError(f"{where}: data cluster at {off:#x} lies past the end of the file")
