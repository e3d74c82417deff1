"""Initramfs images: a writer (and a reader, for tests and `pyhv guest list`) of the
"newc" cpio format that Linux unpacks into its rootfs at boot.

Format (Linux's Documentation/driver-api/early-userspace/buffer-format.rst): a sequence
of entries, each

    +-------------------------------------------------------------+
    | "070701" | 13 fields, 8 ASCII hex digits each (110 bytes)   |
    |   ino mode uid gid nlink mtime filesize devmajor devminor    |
    |   rdevmajor rdevminor namesize (with its NUL) check (0)      |
    +-------------------------------------------------------------+
    | name, NUL, padded with NULs to a multiple of 4 bytes         |
    | data (file bytes, or a symlink's target), padded to 4 bytes  |
    +-------------------------------------------------------------+

ended by an entry named "TRAILER!!!". The archive may be gzip-compressed as a whole.

Design: `Initramfs` collects entries in insertion order, creating missing parent
directories first, so the kernel never meets a file whose directory does not exist yet.
Paths are stored without a leading slash (as `find . | cpio -o -H newc` writes them).
Output is deterministic: inode numbers count from 1 in order, mtime is fixed (0 unless
given), uid/gid 0, and the gzip header carries no timestamp, so the same inputs give the
same bytes. Adding a path twice is an error (the kernel would silently keep the last).
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_SIZE = 110


@dataclass(frozen=True)
class Entry:
    """One cpio member: a directory, regular file, symlink or device node."""

    path: str           # relative, no leading "/"
    mode: int           # st_mode: file type bits | permission bits
    data: bytes = b""   # file contents, or a symlink's target
    rdev: tuple[int, int] = (0, 0)   # (major, minor) of a device node
    nlink: int = 1

    @property
    def kind(self) -> str:
        if stat.S_ISDIR(self.mode):
            return "dir"
        if stat.S_ISLNK(self.mode):
            return "symlink"
        if stat.S_ISCHR(self.mode):
            return "char"
        if stat.S_ISBLK(self.mode):
            return "block"
        return "file"


def _norm(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"bad initramfs path {path!r}")
    return "/".join(parts)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n & 3)


class Initramfs:
    """An initramfs under construction."""

    def __init__(self, *, mtime: int = 0) -> None:
        self.mtime = mtime
        self._entries: dict[str, Entry] = {}

    # ------------------------------------------------------------------ adding

    def _add(self, entry: Entry) -> None:
        if entry.path in self._entries:
            raise ValueError(f"{entry.path!r} is already in the initramfs")
        parent = entry.path.rpartition("/")[0]
        if parent and parent not in self._entries:
            self.add_dir(parent)
        elif parent and self._entries[parent].kind != "dir":
            raise ValueError(f"{parent!r} is not a directory")
        self._entries[entry.path] = entry

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self._add(Entry(_norm(path), stat.S_IFDIR | (mode & 0o7777), nlink=2))

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add(Entry(_norm(path), stat.S_IFREG | (mode & 0o7777), bytes(data)))

    def add_symlink(self, path: str, target: str) -> None:
        if not target:
            raise ValueError("empty symlink target")
        self._add(Entry(_norm(path), stat.S_IFLNK | 0o777, target.encode()))

    def add_device(self, path: str, kind: str, major: int, minor: int,
                   mode: int = 0o600) -> None:
        """A device node; kind is "c" (character) or "b" (block)."""
        if kind not in ("c", "b"):
            raise ValueError(f"device kind must be 'c' or 'b', not {kind!r}")
        fmt = stat.S_IFCHR if kind == "c" else stat.S_IFBLK
        self._add(Entry(_norm(path), fmt | (mode & 0o7777), rdev=(major, minor)))

    def __contains__(self, path: str) -> bool:
        return _norm(path) in self._entries

    @property
    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    # ------------------------------------------------------------------ output

    def to_bytes(self, compress: str = "gzip") -> bytes:
        """The archive: compress is "gzip" (level 6, no timestamp) or "none"."""
        raw = write_newc(self.entries, mtime=self.mtime)
        if compress == "none":
            return raw
        if compress == "gzip":
            return gzip.compress(raw, compresslevel=6, mtime=0)
        raise ValueError(f"unknown compression {compress!r} (gzip or none)")


def _header(ino: int, e: Entry, mtime: int, namesize: int) -> bytes:
    fields = (ino, e.mode, 0, 0, e.nlink, mtime, len(e.data), 0, 0, e.rdev[0], e.rdev[1],
              namesize, 0)
    return MAGIC + b"".join(b"%08X" % f for f in fields)


def write_newc(entries: list[Entry], *, mtime: int = 0) -> bytes:
    """Serialise entries (in order) plus the trailer as a newc archive."""
    out = bytearray()
    for ino, e in enumerate([*entries, Entry(TRAILER, 0)], start=1):
        name = e.path.encode() + b"\0"
        out += _header(0 if e.path == TRAILER else ino, e, mtime, len(name))
        out += name + _pad4(HEADER_SIZE + len(name))
        out += e.data + _pad4(len(e.data))
    return bytes(out)


# ---------------------------------------------------------------------- reading

class CpioError(ValueError):
    """A malformed newc archive."""


def read_newc(data: bytes) -> list[Entry]:
    """Parse a newc archive (gzip-compressed or not) back into entries."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise CpioError(f"corrupt gzip stream: {e}") from None
    entries: list[Entry] = []
    pos = 0
    while True:
        if pos + HEADER_SIZE > len(data):
            raise CpioError(f"archive ends inside a header at {pos:#x} (no trailer)")
        if data[pos:pos + 6] != MAGIC:
            raise CpioError(f"bad magic {data[pos:pos + 6]!r} at {pos:#x}")
        try:
            f = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise CpioError(f"non-hex header field at {pos:#x}") from None
        mode, nlink, filesize, rmaj, rmin, namesize = f[1], f[4], f[6], f[9], f[10], f[11]
        name_start = pos + HEADER_SIZE
        name_end = name_start + namesize
        data_start = name_end + (-(HEADER_SIZE + namesize) & 3)
        data_end = data_start + filesize
        if namesize == 0 or data_end > len(data):
            raise CpioError(f"entry at {pos:#x} runs past the end of the archive")
        name = data[name_start:name_end - 1].decode("utf-8", "surrogateescape")
        if name == TRAILER:
            return entries
        entries.append(Entry(name, mode, data[data_start:data_end], (rmaj, rmin), nlink))
        pos = data_end + (-filesize & 3)


__all__ = ["CpioError", "Entry", "Initramfs", "read_newc", "write_newc"]
