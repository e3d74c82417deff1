"""The qcow2 header (cluster 0) and its extensions: parse, validate, serialize.

On-disk layout of cluster 0 (all numbers big-endian; qcow2.txt "Header"):

    0   magic "QFI\\xfb"         4   version (2|3)
    8   backing_file_offset     16   backing_file_size (<= 1023)
    20  cluster_bits (9..21)    24   size (virtual, bytes)
    32  crypt_method (0)        36   l1_size (entries)
    40  l1_table_offset         48   refcount_table_offset
    56  refcount_table_clusters 60   nb_snapshots
    64  snapshots_offset        --- v2 header ends at 72 ---
    72  incompatible_features   80   compatible_features
    88  autoclear_features      96   refcount_order (v2: 4)
    100 header_length           104  compression_type (if header_length > 104)
    header_length: extensions { u32 type, u32 length, data, pad to 8 } ... type 0 ends
    backing file name anywhere in cluster 0 (backing_file_offset)

Invariants after `parse_header`: every offset is cluster-aligned and its table lies inside
the file, every count is below QEMU's own caps (so no allocation is proportional to an
unchecked field), the L1 table covers the virtual size, and no unknown incompatible
feature is set. Bytes 36..72 (L1, refcount table and snapshot table pointers) are what
`pack_pointers` rewrites: a single 36-byte write inside one sector is the atomic commit
point of every whole-metadata update (snapshots, refcount rebuilds).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pyhv.errors import ImageError

MAGIC = b"QFI\xfb"
V2_HEADER_LEN = 72
V3_HEADER_LEN = 104
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 << 20  # QEMU's QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 << 20  # QEMU's QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536
MAX_BACKING_NAME = 1023
MAX_VIRTUAL_SIZE = 1 << 55  # beyond this L2 offsets cannot address the data

# Incompatible feature bits (qcow2.txt header byte 72)
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION
# Compatible feature bits (byte 80)
COMPAT_LAZY_REFCOUNTS = 1 << 0
# Autoclear feature bits (byte 88)
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# Header extension types
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

FEATURE_NAMES: list[tuple[int, int, str]] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
]

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")
_POINTERS = struct.Struct(">IQQIIQ")  # bytes 36..72


@dataclass
class Header:
    """A validated qcow2 header and its extensions."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_LEN
    compression_type: int = 0
    backing_file: str | None = None
    backing_format: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    unknown_extensions: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    def pack(self) -> bytes:
        """Serialize header, extensions and backing name into (at most) one cluster.

        The feature-name table is optional: it is left out when it would not fit (512-byte
        clusters with a backing file)."""
        try:
            return self._pack(True)
        except ImageError:
            return self._pack(False)

    def _pack(self, feature_table: bool) -> bytes:
        hlen = V2_HEADER_LEN if self.version == 2 else 112
        out = bytearray(_V2.pack(
            MAGIC, self.version, 0, 0, self.cluster_bits, self.size, self.crypt_method,
            self.l1_size, self.l1_table_offset, self.refcount_table_offset,
            self.refcount_table_clusters, self.nb_snapshots, self.snapshots_offset))
        if self.version == 3:
            out += _V3.pack(self.incompatible_features, self.compatible_features,
                            self.autoclear_features, self.refcount_order, hlen)
            out += bytes([self.compression_type]) + bytes(7)
        exts: list[tuple[int, bytes]] = []
        if self.backing_format:
            exts.append((EXT_BACKING_FORMAT, self.backing_format.encode()))
        if self.version == 3 and feature_table:
            table = b"".join(struct.pack(">BB46s", t, b, n.encode())
                             for t, b, n in FEATURE_NAMES)
            exts.append((EXT_FEATURE_TABLE, table))
        exts.extend(self.unknown_extensions)
        for typ, data in exts:
            out += struct.pack(">II", typ, len(data)) + data + bytes(-len(data) % 8)
        out += bytes(8)  # end-of-extensions marker
        if self.backing_file:
            name = self.backing_file.encode()
            struct.pack_into(">QI", out, 8, len(out), len(name))
            self.backing_file_offset, self.backing_file_size = len(out), len(name)
            out += name
        else:
            self.backing_file_offset = self.backing_file_size = 0
        if len(out) > self.cluster_size:
            raise ImageError("header, extensions and backing file name exceed one cluster")
        self.header_length = hlen
        return bytes(out)

    def pack_pointers(self) -> bytes:
        """Bytes 36..72: L1 size/offset, refcount table, snapshot table (atomic commit)."""
        return _POINTERS.pack(self.l1_size, self.l1_table_offset, self.refcount_table_offset,
                              self.refcount_table_clusters, self.nb_snapshots,
                              self.snapshots_offset)


def l1_entries_needed(size: int, cluster_bits: int) -> int:
    """L1 entries needed to map `size` bytes (one L2 table maps cluster_size**2/8)."""
    span = (1 << cluster_bits) * ((1 << cluster_bits) // 8)
    return -(-size // span)


def _table_in_file(what: str, offset: int, nbytes: int, cluster_size: int,
                   file_size: int) -> None:
    if offset % cluster_size:
        raise ImageError(f"{what} offset {offset:#x} is not cluster-aligned")
    if offset == 0 and nbytes:
        raise ImageError(f"{what} overlaps the header (offset 0)")
    if offset + nbytes > file_size:
        raise ImageError(f"{what} at {offset:#x} (+{nbytes}) extends past the end of the "
                         f"file ({file_size} bytes)")


def parse_header(buf: bytes, file_size: int) -> Header:
    """Parse and validate cluster 0 (`buf` holds at least its first bytes)."""
    if len(buf) < V2_HEADER_LEN or buf[:4] != MAGIC:
        raise ImageError("not a qcow2 image (bad magic)")
    f = _V2.unpack_from(buf, 0)
    h = Header(*f[1:])
    if h.version not in (2, 3):
        raise ImageError(f"unsupported qcow2 version {h.version}")
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageError(f"cluster_bits {h.cluster_bits} out of range "
                         f"({MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS})")
    cs = h.cluster_size
    if len(buf) < min(cs, file_size):
        raise ImageError("truncated header cluster")
    if h.version == 3:
        if len(buf) < V3_HEADER_LEN:
            raise ImageError("truncated v3 header")
        (h.incompatible_features, h.compatible_features, h.autoclear_features,
         h.refcount_order, h.header_length) = _V3.unpack_from(buf, V2_HEADER_LEN)
        if h.header_length < V3_HEADER_LEN or h.header_length % 8 or h.header_length > cs:
            raise ImageError(f"header_length {h.header_length} invalid (104..cluster size, "
                             "multiple of 8)")
        if h.header_length > V3_HEADER_LEN:
            h.compression_type = buf[104]
        if h.refcount_order > 6:
            raise ImageError(f"refcount_order {h.refcount_order} out of range (0..6)")
    else:
        h.header_length = V2_HEADER_LEN
        h.refcount_order = 4
    if h.crypt_method != 0:
        raise ImageError("encrypted qcow2 images are not supported (crypt_method "
                         f"{h.crypt_method})")
    if h.size > MAX_VIRTUAL_SIZE:
        raise ImageError(f"virtual size {h.size} too large")
    _parse_extensions(h, buf)
    unknown = h.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        defaults = {(t, b): n for t, b, n in FEATURE_NAMES}
        names = [h.feature_names.get((0, b)) or defaults.get((0, b), f"bit {b}")
                 for b in range(64) if unknown >> b & 1]
        raise ImageError("unsupported qcow2 feature: " + ", ".join(names))
    if h.incompatible_features & INCOMPAT_COMPRESSION and h.compression_type != 0:
        raise ImageError(f"unsupported compression type {h.compression_type} (only zlib)")
    if not h.incompatible_features & INCOMPAT_COMPRESSION and h.compression_type != 0:
        raise ImageError("compression_type set without the compression-type feature bit")
    if h.incompatible_features & INCOMPAT_COMPRESSION and h.compression_type == 0:
        raise ImageError("the compression-type feature bit is set with zlib compression "
                         "(it must not be, as QEMU requires)")
    # Tables
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise ImageError(f"L1 table too large ({h.l1_size} entries)")
    if h.l1_size < l1_entries_needed(h.size, h.cluster_bits):
        raise ImageError(f"L1 table ({h.l1_size} entries) too small for the virtual size "
                         f"{h.size}")
    _table_in_file("L1 table", h.l1_table_offset, h.l1_size * 8, cs, file_size)
    if h.refcount_table_clusters == 0:
        raise ImageError("refcount table has no clusters")
    if h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise ImageError(f"refcount table too large ({h.refcount_table_clusters} clusters)")
    _table_in_file("refcount table", h.refcount_table_offset,
                   h.refcount_table_clusters * cs, cs, file_size)
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise ImageError(f"too many snapshots ({h.nb_snapshots})")
    if h.nb_snapshots:
        _table_in_file("snapshot table", h.snapshots_offset, h.nb_snapshots * 40, cs,
                       file_size)
    elif h.snapshots_offset % cs:
        raise ImageError("snapshot table offset is not cluster-aligned")
    # Backing file name
    if h.backing_file_offset:
        if h.backing_file_size > MAX_BACKING_NAME or h.backing_file_size == 0:
            raise ImageError(f"backing file name length {h.backing_file_size} invalid")
        end = h.backing_file_offset + h.backing_file_size
        if end > cs or end > len(buf):
            raise ImageError("backing file name lies outside the header cluster")
        try:
            h.backing_file = buf[h.backing_file_offset:end].decode()
        except UnicodeDecodeError as e:
            raise ImageError("backing file name is not UTF-8") from e
    return h


def _parse_extensions(h: Header, buf: bytes) -> None:
    off = h.header_length
    limit = min(len(buf), h.cluster_size)
    seen = 0
    while True:
        if off + 8 > limit:
            if h.version == 2 and off >= limit:
                return
            raise ImageError("header extensions run past the header cluster")
        typ, length = struct.unpack_from(">II", buf, off)
        off += 8
        if typ == EXT_END:
            return
        if off + length > limit:
            raise ImageError(f"header extension {typ:#x} (length {length}) runs past the "
                             "header cluster")
        data = bytes(buf[off:off + length])
        off += length + (-length % 8)
        seen += 1
        if typ == EXT_BACKING_FORMAT:
            h.backing_format = data.decode(errors="replace")
        elif typ == EXT_FEATURE_TABLE:
            for i in range(0, length - 47, 48):
                t, b = data[i], data[i + 1]
                h.feature_names[(t, b)] = data[i + 2:i + 48].rstrip(b"\0").decode(
                    errors="replace")
        elif typ == EXT_DATA_FILE:
            raise ImageError("unsupported qcow2 feature: external data file")
        elif typ == EXT_CRYPTO:
            raise ImageError("encrypted qcow2 images are not supported")
        elif typ == EXT_BITMAPS:
            pass  # dropped (the autoclear bit is cleared when pyhv writes)
        else:
            h.unknown_extensions.append((typ, data))
