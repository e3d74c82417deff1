"""A minimal, validating ELF reader: the header and PT_LOAD program headers.

Only what loading a kernel needs: class (32/64), machine, entry, and the loadable
segments with their file ranges and physical/virtual addresses. Every offset and size is
checked against the file before use, so a hostile image yields `ImageError`, never an
IndexError or a huge allocation.

ELF header (System V gABI): e_ident[16], e_type u16, e_machine u16, e_version u32,
e_entry, e_phoff, e_shoff (word-sized), e_flags u32, e_ehsize, e_phentsize, e_phnum, ...
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyhv.errors import ImageError

ELF_MAGIC = b"\x7fELF"
EM_386, EM_X86_64 = 3, 62
PT_LOAD, PT_NOTE = 1, 4
MAX_PHNUM = 512


@dataclass(frozen=True)
class LoadSegment:
    offset: int
    filesz: int
    memsz: int
    vaddr: int
    paddr: int
    flags: int


@dataclass(frozen=True)
class Elf:
    bits: int
    machine: int
    entry: int
    segments: list[LoadSegment]
    notes: list[tuple[str, int, bytes]]   # (name, type, desc) from PT_NOTE segments


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def parse(data: bytes, what: str = "image") -> Elf:
    if len(data) < 52 or not is_elf(data):
        raise ImageError(f"{what} is not an ELF file")
    ei_class, ei_data = data[4], data[5]
    if ei_data != 1:
        raise ImageError(f"{what}: big-endian ELF is not supported")
    if ei_class == 1:
        bits, hdr, ph = 32, "<HHIIIIIHHHHHH", "<IIIIIIII"
    elif ei_class == 2:
        bits, hdr, ph = 64, "<HHIQQQIHHHHHH", "<IIQQQQQQ"
    else:
        raise ImageError(f"{what}: unknown ELF class {ei_class}")
    if len(data) < 16 + struct.calcsize(hdr):
        raise ImageError(f"{what}: truncated ELF header")
    (_type, machine, _ver, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum,
     *_rest) = struct.unpack_from(hdr, data, 16)
    if machine not in (EM_386, EM_X86_64):
        raise ImageError(f"{what}: ELF machine {machine} is not x86")
    if phnum == 0:
        raise ImageError(f"{what}: ELF file has no program headers")
    if phnum > MAX_PHNUM or phentsize < struct.calcsize(ph):
        raise ImageError(f"{what}: implausible ELF program header table "
                         f"({phnum} entries of {phentsize} bytes)")
    if phoff + phnum * phentsize > len(data):
        raise ImageError(f"{what}: ELF program headers run past the end of the file")
    segments: list[LoadSegment] = []
    notes: list[tuple[str, int, bytes]] = []
    for i in range(phnum):
        fields = struct.unpack_from(ph, data, phoff + i * phentsize)
        if bits == 32:
            p_type, off, vaddr, paddr, filesz, memsz, flags, _align = fields
        else:
            p_type, flags, off, vaddr, paddr, filesz, memsz, _align = fields
        if p_type not in (PT_LOAD, PT_NOTE):
            continue
        if off + filesz > len(data):
            raise ImageError(f"{what}: ELF segment {i} (offset {off:#x}, {filesz:#x} bytes) "
                             "runs past the end of the file (truncated?)")
        if p_type == PT_NOTE:
            notes.extend(_notes(data[off:off + filesz]))
            continue
        if memsz < filesz:
            raise ImageError(f"{what}: ELF segment {i} has memsz < filesz")
        if memsz:
            segments.append(LoadSegment(off, filesz, memsz, vaddr, paddr, flags))
    if not segments:
        raise ImageError(f"{what}: ELF file has no loadable segment")
    return Elf(bits, machine, entry, segments, notes)


def _notes(blob: bytes) -> list[tuple[str, int, bytes]]:
    out: list[tuple[str, int, bytes]] = []
    pos = 0
    while pos + 12 <= len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
        pos += 12
        name_end = pos + ((namesz + 3) & ~3)
        desc_end = name_end + ((descsz + 3) & ~3)
        if desc_end > len(blob) + 3:
            break
        name = blob[pos:pos + namesz].rstrip(b"\0").decode("latin-1")
        out.append((name, ntype, blob[name_end:name_end + descsz]))
        pos = desc_end
    return out
