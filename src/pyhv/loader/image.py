"""What every loader shares: the boot request, the result, reading and placing images.

Design: a loader is a function `load(mem, request) -> LoadedGuest`. It validates the
image completely before writing anything, writes the image and its boot structures into
`GuestMemory`, and returns the entry `CpuState`. Nothing here knows an engine.

`place()` is the one check every loader uses before copying bytes into the guest: the
destination must be RAM and must not overlap pyhv's own boot structures below 1 MiB
(layout.py) unless the loader owns that area (flat real-mode images).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pyhv.arch.x86.cpustate import CpuState
from pyhv.errors import ImageError
from pyhv.memory import GuestMemory

MAX_IMAGE = 1 << 31


@dataclass
class BootRequest:
    kernel: Path
    cmdline: str = ""
    initrd: Path | None = None
    format: str = "auto"
    load_addr: int | None = None       # flat images: where to load (default 0x7c00)


@dataclass
class LoadedGuest:
    format: str
    entry: CpuState
    description: str
    extents: list[tuple[int, int]] = field(default_factory=list)  # [start, end) written


def read_file(path: Path, what: str) -> bytes:
    """The file's bytes, or a one-line ImageError (missing, unreadable, empty, huge)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError(f"{what} {str(path)!r} does not exist") from None
    except OSError as e:
        raise ImageError(f"{what} {str(path)!r}: {e.strerror}") from None
    if path.is_dir():
        raise ImageError(f"{what} {str(path)!r} is a directory")
    if size == 0:
        raise ImageError(f"{what} {str(path)!r} is empty")
    if size > MAX_IMAGE:
        raise ImageError(f"{what} {str(path)!r} is too large ({size} bytes)")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ImageError(f"{what} {str(path)!r}: {e.strerror}") from None


def check_place(mem: GuestMemory, start: int, size: int, what: str,
                reserved: list[tuple[int, int, str]] | None = None) -> None:
    """Refuse to put [start, start+size) outside RAM or over a reserved range."""
    if size <= 0:
        return
    if not mem.contains(start, size):
        raise ImageError(f"{what} at {start:#x}-{start + size:#x} does not fit in guest RAM "
                         f"({mem.size >> 20} MiB): use a larger --mem")
    for lo, hi, name in reserved or []:
        if start < hi and lo < start + size:
            raise ImageError(f"{what} at {start:#x}-{start + size:#x} overlaps {name} "
                             f"({lo:#x}-{hi:#x})")
