"""Linux kernels: the x86 boot protocol for bzImage, and the uncompressed vmlinux ELF.

Source of the facts: Linux's Documentation/arch/x86/boot.rst ("The Linux/x86 Boot
Protocol"). A bzImage is a real-mode setup part followed by the protected-mode kernel:

    file offset 0       +---------------------------+
                        | boot sector (legacy)      |
    0x1f1               | setup header ("HdrS" at   |  copied into boot_params at 0x1f1
                        |   0x202, ends at 0x202 +  |
                        |   byte[0x201])            |
                        | real-mode setup code      |
    (setup_sects+1)*512 +---------------------------+
                        | protected-mode kernel:    |  loaded at pref_address (16 MiB),
                        |   decompressor + payload  |  64-bit entry at load + 0x200
                        |   (payload_offset/length  |
                        |    at 0x248/0x24c)        |
                        +---------------------------+

pyhv never runs the real-mode setup code: it plays the boot loader's part itself and
enters the kernel through the 64-bit boot protocol (protocol >= 2.12, XLF_KERNEL_64):

- boot_params (the "zero page", 4 KiB) at layout.ZERO_PAGE: the image's setup header
  copied to 0x1f1, type_of_loader 0xff, the command line pointer (layout.CMDLINE), the
  initrd (ramdisk_image/size and their ext_ high halves), and the e820 table from
  layout.e820_map();
- the CPU in long mode with identity paging over the first 4 GiB (2 MiB pages), the boot
  GDT's flat __BOOT_CS (0x10, 64-bit code) and __BOOT_DS (0x18), interrupts off,
  RSI = boot_params, RIP = load address + 0x200.

Kernels without XLF_KERNEL_64 (protocol 2.06..2.11, or 32-bit builds) get the 32-bit
boot protocol instead: flat protected mode, paging off, a GDT whose 0x10 is 32-bit code,
ESI = boot_params, EIP = load address.

Decompression (`decompress=True`, the default): the payload is the kernel's vmlinux ELF
compressed with gzip, xz, lzma, bzip2 or LZ4 (Debian's cloud kernel), or zstd/lzo. For
every format Python can decode (lz4 through the `lz4` package, the rest through the
stdlib) pyhv decompresses it itself and loads the ELF's PT_LOAD segments at their
physical addresses, entering at the ELF's (physical) entry, the kernel's own startup_64:
exactly where the kernel's decompressor would have jumped, with the same boot_params.
On a software CPU this saves the seconds the decompressor would spend. zstd/lzo payloads
fall back to loading the bzImage as is. A bare vmlinux ELF (`--kernel vmlinux`) is loaded
the same way, with a setup header that pyhv writes itself (version 2.15, HdrS, 0xAA55).
Its PVH note (XEN_ELFNOTE_PHYS32_ENTRY) is not used: that entry expects Xen's
hvm_start_info, not boot_params.

Invariants: the whole image (and the initrd) is validated before the first byte is
written to guest memory; every failure is an `ImageError` with a one-line message;
kernel, initrd and pyhv's boot structures below 1 MiB never overlap; the initrd goes as
high as the kernel allows (below initrd_addr_max and the top of low RAM), page aligned.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from dataclasses import dataclass, replace

from pyhv.arch.x86 import boot, gdt, layout
from pyhv.arch.x86.cpustate import CpuState, DescriptorTable, Segment
from pyhv.errors import ImageError
from pyhv.loader import elf
from pyhv.loader.image import BootRequest, LoadedGuest, check_place, read_file
from pyhv.memory import GuestMemory

# ---------------------------------------------------------------- boot_params layout
# Offsets inside boot_params (arch/x86/include/uapi/asm/bootparam.h); the setup header
# offsets are the same in the bzImage file and in boot_params.

ZP_SIZE = 0x1000
ZP_ACPI_RSDP_ADDR = 0x070
ZP_EXT_RAMDISK_IMAGE = 0x0C0
ZP_EXT_RAMDISK_SIZE = 0x0C4
ZP_EXT_CMD_LINE_PTR = 0x0C8
ZP_E820_ENTRIES = 0x1E8
ZP_SENTINEL = 0x1EF
ZP_HDR = 0x1F1
ZP_HDR_MAX_END = 0x290          # edd_mbr_sig_buffer starts here: the header never passes it
ZP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128

# Setup header fields: (offset, struct format).
H_SETUP_SECTS = 0x1F1
H_SYSSIZE = 0x1F4
H_VID_MODE = 0x1FA
H_BOOT_FLAG = 0x1FE
H_JUMP = 0x200
H_HEADER = 0x202
H_VERSION = 0x206
H_KERNEL_VERSION = 0x20E
H_TYPE_OF_LOADER = 0x210
H_LOADFLAGS = 0x211
H_CODE32_START = 0x214
H_RAMDISK_IMAGE = 0x218
H_RAMDISK_SIZE = 0x21C
H_CMD_LINE_PTR = 0x228
H_INITRD_ADDR_MAX = 0x22C
H_KERNEL_ALIGNMENT = 0x230
H_RELOCATABLE = 0x234
H_MIN_ALIGNMENT = 0x235
H_XLOADFLAGS = 0x236
H_CMDLINE_SIZE = 0x238
H_PAYLOAD_OFFSET = 0x248
H_PAYLOAD_LENGTH = 0x24C
H_SETUP_DATA = 0x250
H_PREF_ADDRESS = 0x258
H_INIT_SIZE = 0x260

BOOT_FLAG = 0xAA55
HDRS = b"HdrS"
MIN_VERSION = 0x0206            # cmdline_size appears in 2.06; older kernels are refused
VERSION_64BIT = 0x020C          # xloadflags (and with it XLF_KERNEL_64) appear in 2.12
LOADED_HIGH, QUIET_FLAG, KEEP_SEGMENTS, CAN_USE_HEAP = 0x01, 0x20, 0x40, 0x80
XLF_KERNEL_64, XLF_CAN_BE_LOADED_ABOVE_4G = 0x1, 0x2
LOADER_TYPE_UNDEFINED = 0xFF    # "boot loader not registered": what boot.rst asks of others
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF    # protocols before 2.03 (boot.rst)
DEFAULT_CMDLINE_SIZE = 255              # protocols before 2.06
X86_COMMAND_LINE_SIZE = 2048            # what a synthesised header offers a bare vmlinux
ENTRY64_OFFSET = 0x200
LOAD_PHYSICAL_ADDR = 0x100_0000         # x86-64 default CONFIG_PHYSICAL_START
BZIMAGE_LOW_LOAD = layout.HIGH_MEMORY   # non-relocatable kernels: code32_start, 1 MiB

MAX_KERNEL_SIZE = 1 << 30               # a decompressed kernel larger than this is refused
LOW_RESERVED = [(0, layout.HIGH_MEMORY, "pyhv's boot structures and the BIOS area below "
                 "1 MiB")]

_GZIP, _XZ, _LZMA, _BZIP2 = b"\x1f\x8b", b"\xfd7zXZ\x00", b"\x5d\x00\x00", b"BZh"
_LZ4_LEGACY, _ZSTD, _LZO = b"\x02\x21\x4c\x18", b"\x28\xb5\x2f\xfd", b"\x89LZO"
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20      # each legacy-frame block decompresses to at most 8 MiB


# ---------------------------------------------------------------- the setup header

@dataclass(frozen=True)
class SetupHeader:
    """The fields of a bzImage setup header that loading depends on."""

    version: int                # e.g. 0x20f for 2.15
    setup_sects: int            # 512-byte sectors of real-mode setup (0 read as 4)
    syssize: int                # protected-mode kernel size in 16-byte paragraphs
    loadflags: int
    code32_start: int
    initrd_addr_max: int        # highest address the initrd's last byte may occupy
    kernel_alignment: int
    relocatable: bool
    min_alignment: int          # log2
    xloadflags: int
    cmdline_size: int           # longest command line, NUL excluded
    payload_offset: int         # from the start of the protected-mode kernel
    payload_length: int
    pref_address: int
    init_size: int              # bytes the kernel needs from its load address to boot
    kernel_version: str         # the version string the image carries ("" if none)
    raw: bytes                  # file bytes [0x1f1, end of header): copied to boot_params

    @property
    def setup_size(self) -> int:
        """Bytes of the real-mode part: where the protected-mode kernel starts."""
        return (self.setup_sects + 1) * 512

    @property
    def kernel_64(self) -> bool:
        return self.version >= VERSION_64BIT and bool(self.xloadflags & XLF_KERNEL_64)

    @property
    def version_str(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"

    @property
    def release(self) -> str:
        """The kernel release ("6.1.0-56-cloud-amd64"): the version string's first word."""
        return self.kernel_version.split(" ", 1)[0] if self.kernel_version else ""


def is_bzimage(data: bytes) -> bool:
    return len(data) >= H_HEADER + 4 and data[H_HEADER:H_HEADER + 4] == HDRS


def _u8(data: bytes, off: int) -> int:
    return data[off]


def _u16(data: bytes, off: int) -> int:
    return int(struct.unpack_from("<H", data, off)[0])


def _u32(data: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", data, off)[0])


def _u64(data: bytes, off: int) -> int:
    return int(struct.unpack_from("<Q", data, off)[0])


def parse_header(data: bytes, what: str = "kernel") -> SetupHeader:
    """Parse and validate a bzImage's setup header; ImageError says what is wrong."""
    if len(data) < 0x400:
        raise ImageError(f"{what} is too small to be a Linux kernel ({len(data)} bytes)")
    if not is_bzimage(data):
        raise ImageError(f"{what} is not a Linux bzImage (no 'HdrS' setup header at 0x202)")
    version = _u16(data, H_VERSION)
    if version < MIN_VERSION:
        raise ImageError(f"{what}: Linux boot protocol {version >> 8}.{version & 0xFF:02d} is "
                         "too old (pyhv needs 2.06 or later, Linux 2.6.22+)")
    if _u16(data, H_BOOT_FLAG) != BOOT_FLAG:
        raise ImageError(f"{what}: setup header lacks the 0xAA55 boot flag (corrupt image?)")
    hdr_end = min(H_HEADER + _u8(data, H_JUMP + 1), ZP_HDR_MAX_END)
    if hdr_end < H_INIT_SIZE + 4 and version >= 0x020A:
        raise ImageError(f"{what}: setup header is shorter than protocol "
                         f"{version >> 8}.{version & 0xFF:02d} defines (corrupt image?)")
    setup_sects = _u8(data, H_SETUP_SECTS) or 4
    setup_size = (setup_sects + 1) * 512
    loadflags = _u8(data, H_LOADFLAGS)
    if not loadflags & LOADED_HIGH:
        raise ImageError(f"{what} is a zImage (loaded low): pyhv boots only bzImages")
    syssize = _u32(data, H_SYSSIZE)
    pm_size = len(data) - setup_size
    if pm_size <= 0:
        raise ImageError(f"{what} is truncated: it ends inside the real-mode setup code "
                         f"({len(data)} of at least {setup_size} bytes)")
    if syssize * 16 > pm_size:
        raise ImageError(f"{what} is truncated: the setup header says the protected-mode "
                         f"kernel has {syssize * 16} bytes, the file holds {pm_size}")

    def has(v: int) -> bool:
        return version >= v

    initrd_addr_max = _u32(data, H_INITRD_ADDR_MAX) if has(0x0203) else DEFAULT_INITRD_ADDR_MAX
    kernel_alignment = _u32(data, H_KERNEL_ALIGNMENT) if has(0x0205) else layout.HIGH_MEMORY
    relocatable = bool(_u8(data, H_RELOCATABLE)) if has(0x0205) else False
    if relocatable and (kernel_alignment == 0 or kernel_alignment & (kernel_alignment - 1)):
        raise ImageError(f"{what}: kernel_alignment {kernel_alignment:#x} is not a power of 2")
    xloadflags = _u16(data, H_XLOADFLAGS) if has(0x020C) else 0
    cmdline_size = _u32(data, H_CMDLINE_SIZE) if has(0x0206) else DEFAULT_CMDLINE_SIZE
    payload_offset = _u32(data, H_PAYLOAD_OFFSET) if has(0x0208) else 0
    payload_length = _u32(data, H_PAYLOAD_LENGTH) if has(0x0208) else 0
    if payload_length and payload_offset + payload_length > pm_size:
        raise ImageError(f"{what} is truncated: its compressed payload "
                         f"({payload_offset:#x}+{payload_length:#x}) runs past the end of "
                         "the file")
    pref_address = _u64(data, H_PREF_ADDRESS) if has(0x020A) else BZIMAGE_LOW_LOAD
    init_size = _u32(data, H_INIT_SIZE) if has(0x020A) else 0
    init_size = max(init_size, pm_size)
    kv_ptr = _u16(data, H_KERNEL_VERSION)
    kernel_version = ""
    if kv_ptr and 0x200 + kv_ptr < min(len(data), setup_size):
        raw_kv = data[0x200 + kv_ptr:min(len(data), setup_size, 0x200 + kv_ptr + 256)]
        kernel_version = raw_kv.split(b"\0", 1)[0].decode("ascii", "replace")
    return SetupHeader(version=version, setup_sects=setup_sects, syssize=syssize,
                       loadflags=loadflags, code32_start=_u32(data, H_CODE32_START),
                       initrd_addr_max=initrd_addr_max, kernel_alignment=kernel_alignment,
                       relocatable=relocatable, min_alignment=_u8(data, H_MIN_ALIGNMENT),
                       xloadflags=xloadflags, cmdline_size=cmdline_size,
                       payload_offset=payload_offset, payload_length=payload_length,
                       pref_address=pref_address, init_size=init_size,
                       kernel_version=kernel_version, raw=bytes(data[ZP_HDR:hdr_end]))


def synthetic_header(footprint: int, load_addr: int) -> SetupHeader:
    """A setup header for a bare vmlinux, which carries none (protocol 2.15, 64-bit)."""
    raw = bytearray(H_INIT_SIZE + 4 - ZP_HDR)

    def put(fmt: str, off: int, value: int | bytes) -> None:
        struct.pack_into(fmt, raw, off - ZP_HDR, value)

    put("<H", H_BOOT_FLAG, BOOT_FLAG)
    put("<B", H_JUMP + 1, H_INIT_SIZE + 4 - H_HEADER)
    put("4s", H_HEADER, HDRS)
    put("<H", H_VERSION, 0x020F)
    put("<H", H_VID_MODE, 0xFFFF)
    put("<B", H_LOADFLAGS, LOADED_HIGH)
    put("<I", H_CODE32_START, load_addr)
    put("<I", H_INITRD_ADDR_MAX, 0x7FFFFFFF)
    put("<I", H_KERNEL_ALIGNMENT, 0x200000)
    put("<B", H_RELOCATABLE, 1)
    put("<B", H_MIN_ALIGNMENT, 21)
    put("<H", H_XLOADFLAGS, XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G)
    put("<I", H_CMDLINE_SIZE, X86_COMMAND_LINE_SIZE - 1)
    put("<Q", H_PREF_ADDRESS, load_addr)
    put("<I", H_INIT_SIZE, footprint)
    return SetupHeader(version=0x020F, setup_sects=0, syssize=0, loadflags=LOADED_HIGH,
                       code32_start=load_addr, initrd_addr_max=0x7FFFFFFF,
                       kernel_alignment=0x200000, relocatable=True, min_alignment=21,
                       xloadflags=XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G,
                       cmdline_size=X86_COMMAND_LINE_SIZE - 1, payload_offset=0,
                       payload_length=0, pref_address=load_addr, init_size=footprint,
                       kernel_version="", raw=bytes(raw))


# ---------------------------------------------------------------- payload decompression

def payload_format(payload: bytes) -> str:
    """The compression of a bzImage payload, by its magic number."""
    for magic, name in ((_GZIP, "gzip"), (_XZ, "xz"), (_LZ4_LEGACY, "lz4"), (_ZSTD, "zstd"),
                        (_LZO, "lzo"), (_BZIP2, "bzip2"), (_LZMA, "lzma")):
        if payload.startswith(magic):
            return name
    if payload.startswith(elf.ELF_MAGIC):
        return "none"
    return "unknown"


def payload(data: bytes, hdr: SetupHeader) -> bytes:
    """The compressed kernel inside a bzImage (empty before protocol 2.08)."""
    start = hdr.setup_size + hdr.payload_offset
    return data[start:start + hdr.payload_length]


def _lz4_legacy(blob: bytes, limit: int, what: str) -> bytes:
    """Decode LZ4's legacy frame: magic, then (u32 size, block) until the data ends.

    The kernel build appends the decompressed size (u32) after the last block, so a
    "block size" that would run past the end marks the end of the frame.
    """
    import lz4.block

    out: list[bytes] = []
    total, pos = 0, 4
    while pos + 4 <= len(blob):
        (size,) = struct.unpack_from("<I", blob, pos)
        if size == LZ4_LEGACY_MAGIC:        # a concatenated frame starts
            pos += 4
            continue
        if pos + 4 + size > len(blob):
            break
        try:
            chunk = lz4.block.decompress(blob[pos + 4:pos + 4 + size],
                                         uncompressed_size=LZ4_LEGACY_BLOCK)
        except lz4.block.LZ4BlockError as e:
            raise ImageError(f"{what}: corrupt LZ4 payload ({e})") from None
        total += len(chunk)
        if total > limit:
            raise ImageError(f"{what}: decompressed kernel exceeds {limit >> 20} MiB")
        out.append(chunk)
        pos += 4 + size
    return b"".join(out)


def decompress_payload(data: bytes, hdr: SetupHeader, what: str = "kernel") -> bytes | None:
    """The vmlinux ELF inside a bzImage, or None where pyhv cannot decode the format
    (zstd, lzo; then the kernel's own decompressor runs). Corrupt payloads raise."""
    blob = payload(data, hdr)
    if len(blob) < 8:
        return None
    fmt = payload_format(blob)
    # The build appends the decompressed size as a u32 (gzip's ISIZE does the same).
    expected = _u32(blob, len(blob) - 4)
    limit = min(MAX_KERNEL_SIZE, max(expected, 1 << 20))
    try:
        if fmt == "lz4":
            try:
                import lz4.block  # noqa: F401
            except ImportError:          # the `lz4` package is missing: the kernel decodes
                return None
            out = _lz4_legacy(blob, limit, what)
        elif fmt == "gzip":
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out = d.decompress(blob, limit + 1)
        elif fmt in ("xz", "lzma"):
            lz = lzma.LZMADecompressor(lzma.FORMAT_XZ if fmt == "xz" else lzma.FORMAT_ALONE)
            out = lz.decompress(blob, limit + 1)
        elif fmt == "bzip2":
            out = bz2.BZ2Decompressor().decompress(blob, limit + 1)
        elif fmt == "none":
            out = blob
        else:
            return None
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as e:
        raise ImageError(f"{what}: corrupt {fmt} payload ({e})") from None
    if len(out) > limit:
        raise ImageError(f"{what}: decompressed kernel exceeds {limit >> 20} MiB")
    if fmt != "none" and len(out) != expected:
        raise ImageError(f"{what}: {fmt} payload decompressed to {len(out)} bytes, the image "
                         f"says {expected} (truncated or corrupt)")
    if not out.startswith(elf.ELF_MAGIC):
        raise ImageError(f"{what}: the decompressed {fmt} payload is not an ELF kernel")
    return out


# ---------------------------------------------------------------- vmlinux

LINUX_NOTE, XEN_NOTE, XEN_ELFNOTE_GUEST_OS = "Linux", "Xen", 6


def is_linux_elf(data: bytes) -> bool:
    """True for an x86-64 vmlinux: ELF64 with Linux's or Xen's ("linux") ELF notes."""
    if not (elf.is_elf(data) and len(data) > 5 and data[4] == 2):
        return False
    try:
        image = elf.parse(data)
    except ImageError:
        return False
    return any(name == LINUX_NOTE or (name == XEN_NOTE and ntype == XEN_ELFNOTE_GUEST_OS
                                      and desc.rstrip(b"\0") == b"linux")
               for name, ntype, desc in image.notes)


def elf_release(image: elf.Elf) -> str:
    """The kernel release a vmlinux names in its Linux build-salt note, or ""."""
    for name, _ntype, desc in image.notes:
        text = desc.rstrip(b"\0")
        if name == LINUX_NOTE and len(text) > 4 and text[:1].isdigit() and b"." in text:
            return text.decode("ascii", "replace")
    return ""


@dataclass(frozen=True)
class _Vmlinux:
    image: elf.Elf
    entry: int                  # physical
    start: int
    end: int


def _parse_vmlinux(data: bytes, what: str) -> _Vmlinux:
    image = elf.parse(data, what)
    if image.bits != 64 or image.machine != elf.EM_X86_64:
        raise ImageError(f"{what}: not an x86-64 Linux kernel (ELF class {image.bits}, "
                         f"machine {image.machine})")
    start = min(s.paddr for s in image.segments)
    end = max(s.paddr + s.memsz for s in image.segments)
    if end - start > MAX_KERNEL_SIZE:
        raise ImageError(f"{what}: kernel spans {(end - start) >> 20} MiB, implausibly large")
    entry = image.entry
    if not any(s.paddr <= entry < s.paddr + s.memsz for s in image.segments):
        # e_entry may be virtual (older kernels): translate through its segment
        for s in image.segments:
            if s.vaddr <= entry < s.vaddr + s.memsz:
                entry = entry - s.vaddr + s.paddr
                break
        else:
            raise ImageError(f"{what}: entry point {image.entry:#x} is outside the kernel")
    return _Vmlinux(image, entry, start, end)


# ---------------------------------------------------------------- boot_params

def build_boot_params(hdr: SetupHeader, *, cmdline_addr: int, initrd: tuple[int, int] | None,
                      e820: list[tuple[int, int, int]]) -> bytes:
    """The 4 KiB zero page: the image's setup header plus what the loader fills in."""
    zp = bytearray(ZP_SIZE)
    zp[ZP_HDR:ZP_HDR + len(hdr.raw)] = hdr.raw
    struct.pack_into("<H", zp, H_BOOT_FLAG, BOOT_FLAG)
    zp[H_HEADER:H_HEADER + 4] = HDRS
    zp[H_TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED
    # No real-mode code runs: CAN_USE_HEAP/heap_end_ptr are moot; keep messages visible.
    zp[H_LOADFLAGS] = (zp[H_LOADFLAGS] | LOADED_HIGH) & ~QUIET_FLAG & 0xFF
    struct.pack_into("<H", zp, H_VID_MODE, 0xFFFF)        # "normal" text mode
    struct.pack_into("<I", zp, H_CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", zp, ZP_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    addr, size = initrd if initrd else (0, 0)
    struct.pack_into("<II", zp, H_RAMDISK_IMAGE, addr & 0xFFFFFFFF, size & 0xFFFFFFFF)
    struct.pack_into("<II", zp, ZP_EXT_RAMDISK_IMAGE, addr >> 32, size >> 32)
    struct.pack_into("<Q", zp, H_SETUP_DATA, 0)
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ImageError(f"memory map has {len(e820)} entries, boot_params holds "
                         f"{E820_MAX_ENTRIES_ZEROPAGE}")
    zp[ZP_E820_ENTRIES] = len(e820)
    for i, (start, length, kind) in enumerate(e820):
        struct.pack_into("<QQI", zp, ZP_E820_TABLE + 20 * i, start, length, kind)
    return bytes(zp)


# ---------------------------------------------------------------- placement

def place_initrd(mem: GuestMemory, size: int, *, kernel_end: int, addr_max: int,
                 what: str = "initrd") -> int:
    """The highest page-aligned address for `size` bytes of initrd: inside one RAM
    region, above the kernel, with its last byte at or below addr_max."""
    best = -1
    for r in mem.regions:
        top = min(r.end, addr_max + 1) & ~0xFFF
        start = (top - size) & ~0xFFF
        if size <= top and start >= max(r.gpa, kernel_end):
            best = max(best, start)
    if best < 0:
        room = max(0, (min(mem.regions[0].end, addr_max + 1) & ~0xFFF) - kernel_end)
        raise ImageError(f"{what} ({_mib(size)}) does not fit in guest RAM above the kernel "
                         f"(room for {_mib(room)} below {min(mem.size, addr_max + 1):#x}): "
                         "use a larger --mem or a smaller initrd")
    return best


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


# ---------------------------------------------------------------- entry states

def _entry_32(mem: GuestMemory, entry: int) -> CpuState:
    """boot.rst's 32-bit boot protocol: __BOOT_CS 0x10 = flat 32-bit code, 0x18 data."""
    st = boot.protected_mode(mem, entry)
    code32 = Segment.flat(boot.SEL_CODE64, code=True, bits=32)   # selector 0x10
    image = gdt.table([None, None, code32, Segment.flat(boot.SEL_DATA, code=False, bits=32),
                       st.tr, None])
    mem.write(layout.BOOT_GDT, image)
    st.gdt = DescriptorTable(layout.BOOT_GDT, len(image) - 1)
    st.cs = code32
    st.rbx = st.rdi = st.rbp = 0
    return st


# ---------------------------------------------------------------- the loader

@dataclass(frozen=True)
class _Plan:
    """What load() writes, decided before anything is written."""

    chunks: list[tuple[int, bytes, int]]     # (gpa, bytes, memsz: zero-filled past bytes)
    entry: int
    kernel_start: int
    kernel_end: int                          # first byte past the kernel's footprint
    hdr: SetupHeader
    bits: int
    description: str


def _plan_bzimage(mem: GuestMemory, data: bytes, hdr: SetupHeader, what: str) -> _Plan:
    pm = data[hdr.setup_size:]
    if hdr.relocatable:
        load_addr = _align_up(max(hdr.pref_address, layout.HIGH_MEMORY), hdr.kernel_alignment)
    else:
        load_addr = hdr.code32_start or BZIMAGE_LOW_LOAD
    # The decompressor works in [load, load + init_size); a 64-bit relocatable kernel
    # never decompresses below LOAD_PHYSICAL_ADDR, which pref_address already is.
    footprint = max(hdr.init_size, len(pm))
    check_place(mem, load_addr, footprint, f"kernel (needs {_mib(footprint)} from its load "
                f"address)", LOW_RESERVED)
    if hdr.kernel_64:
        entry, bits = load_addr + ENTRY64_OFFSET, 64
    else:
        entry, bits = load_addr, 32
    desc = (f"Linux {hdr.release or '(unknown version)'} bzImage, boot protocol "
            f"{hdr.version_str}, loaded at {load_addr:#x}, {bits}-bit entry {entry:#x} "
            f"(kernel's decompressor)")
    return _Plan([(load_addr, pm, len(pm))], entry, load_addr, load_addr + footprint, hdr,
                 bits, desc)


def _plan_vmlinux(mem: GuestMemory, blob: bytes, hdr: SetupHeader | None, what: str,
                  how: str) -> _Plan:
    vm = _parse_vmlinux(blob, what)
    for seg in vm.image.segments:
        check_place(mem, seg.paddr, seg.memsz, "kernel segment", LOW_RESERVED)
    footprint = vm.end - vm.start
    if hdr is None:
        hdr = synthetic_header(footprint, vm.start)
        release = elf_release(vm.image)
    else:
        if not hdr.kernel_64:
            raise ImageError(f"{what}: the kernel inside has no 64-bit entry (XLF_KERNEL_64)")
        release = hdr.release or elf_release(vm.image)
    chunks = [(s.paddr, blob[s.offset:s.offset + s.filesz], s.memsz)
              for s in vm.image.segments]
    desc = (f"Linux {release or '(unknown version)'} vmlinux ({how}), "
            f"{_mib(footprint)} at {vm.start:#x}, 64-bit entry {vm.entry:#x}")
    return _Plan(chunks, vm.entry, vm.start, vm.end, hdr, 64, desc)


def plan(mem: GuestMemory, data: bytes, *, what: str = "kernel",
         decompress: bool = True) -> _Plan:
    """Validate a bzImage or vmlinux against guest memory; decide where everything goes."""
    if elf.is_elf(data):
        if not is_linux_elf(data):
            raise ImageError(f"{what} is an ELF file but not an x86-64 Linux vmlinux")
        return _plan_vmlinux(mem, data, None, what, "ELF")
    hdr = parse_header(data, what)
    if decompress and hdr.kernel_64 and hdr.payload_length:
        blob = decompress_payload(data, hdr, what)
        if blob is not None:
            fmt = payload_format(payload(data, hdr))
            p = _plan_vmlinux(mem, blob, hdr, what, f"{fmt} payload decompressed by pyhv")
            # The kernel asks the boot loader for init_size bytes from its load address;
            # keep the initrd out of that range as the decompressor path would.
            return replace(p, kernel_end=max(p.kernel_end, p.kernel_start + hdr.init_size))
    return _plan_bzimage(mem, data, hdr, what)


def load(mem: GuestMemory, req: BootRequest, data: bytes | None = None, *,
         decompress: bool = True) -> LoadedGuest:
    """Load a bzImage or vmlinux (+ initrd, cmdline) and return the entry state."""
    what = f"kernel {str(req.kernel)!r}"
    data = data if data is not None else read_file(req.kernel, "kernel")
    p = plan(mem, data, what=what, decompress=decompress)
    hdr = p.hdr

    cmdline = req.cmdline.encode()
    if b"\0" in cmdline:
        raise ImageError("kernel command line contains a NUL byte")
    limit = min(hdr.cmdline_size, layout.CMDLINE_MAX - 1)
    if len(cmdline) > limit:
        raise ImageError(f"kernel command line is {len(cmdline)} bytes; this kernel accepts "
                         f"at most {limit}")

    initrd_at: tuple[int, int] | None = None
    initrd = b""
    if req.initrd is not None:
        initrd = read_file(req.initrd, "initrd")
        addr_max = hdr.initrd_addr_max
        # The 64-bit entry runs on pyhv's identity map of the first 4 GiB only.
        addr_max = min(addr_max, (4 << 30) - 1)
        start = place_initrd(mem, len(initrd), kernel_end=_align_up(p.kernel_end, 0x1000),
                             addr_max=addr_max, what=f"initrd {str(req.initrd)!r}")
        initrd_at = (start, len(initrd))

    zero_page = build_boot_params(hdr, cmdline_addr=layout.CMDLINE, initrd=initrd_at,
                                  e820=layout.e820_map(mem.size))

    # Everything is validated: write.
    extents: list[tuple[int, int]] = []
    for gpa, blob, memsz in p.chunks:
        mem.write(gpa, blob)
        if memsz > len(blob):
            mem.fill(gpa + len(blob), memsz - len(blob))
        extents.append((gpa, gpa + memsz))
    if initrd_at is not None:
        mem.write(initrd_at[0], initrd)
        extents.append((initrd_at[0], initrd_at[0] + len(initrd)))
    mem.write(layout.CMDLINE, cmdline + b"\0")
    mem.write(layout.ZERO_PAGE, zero_page)

    st = boot.long_mode(mem, p.entry) if p.bits == 64 else _entry_32(mem, p.entry)
    st.rsi = layout.ZERO_PAGE
    desc = p.description
    if initrd_at is not None:
        desc += f", initrd {_mib(len(initrd))} at {initrd_at[0]:#x}"
    return LoadedGuest("linux", st, desc, extents)


__all__ = ["SetupHeader", "build_boot_params", "decompress_payload", "is_bzimage",
           "is_linux_elf", "load", "parse_header", "payload_format", "place_initrd", "plan"]
