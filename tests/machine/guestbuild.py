"""Build the core test guests (tests/guests/core) at test time, and run them through
the real `pyhv run` command.

Each guest is one source file (plus shared includes) built with the host's gcc and ld
into a temporary directory, in one of four ways:

    flat       16-bit start, linked at 0x7c00, a 512-byte boot sector ending in 55 aa
               (.bin; what --format auto takes as flat)
    multiboot  32-bit ELF at 1 MiB with a multiboot v1 header   (.elf)
    elf64      64-bit ELF at 1 MiB, entered in long mode        (.elf)
    c32        a multiboot .S start stub + freestanding C       (.elf)

`GuestBuilder` builds each guest once per test session (the `guests` fixture in
conftest.py holds one). `run_pyhv` runs `python -m pyhv run ...` in a subprocess with
both a guest timeout (pyhv's --timeout) and a host timeout (subprocess.run's), so no
guest can hang the test run.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")

GUESTS = Path(__file__).resolve().parent.parent / "guests" / "core"
LINK_SCRIPT = GUESTS / "guest.ld"
TOOLS = ("gcc", "as", "ld")

# name -> how it is built (the source is GUESTS/<name>.S, or <name>.c for c32)
KINDS: dict[str, str] = {
    "hello": "multiboot",
    "realmode": "flat",
    "pm32": "flat",
    "long64": "elf64",
    "pi": "c32",
    "exitcode": "multiboot",
    "fwcfg": "multiboot",
    "triplefault": "multiboot",
    "pit": "multiboot",
    "faults64": "elf64",
    "user64": "elf64",
    "stuck": "multiboot",
    "ioprobe": "multiboot",
    "bigbss": "multiboot",
    "smp": "c32",
    "counter": "multiboot",
    "tsc": "multiboot",
    "echo": "multiboot",
    "dirtier": "multiboot",
    "counter64": "elf64",
}

C_FLAGS = ["-m32", "-ffreestanding", "-fno-pic", "-mgeneral-regs-only", "-nostdlib", "-O2",
           "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-Wall", "-Werror"]
LD_ELF = ["-T", str(LINK_SCRIPT), "-z", "max-page-size=0x1000", "-z", "noexecstack",
          "--build-id=none"]
FLAT_LOAD = 0x7C00
BOOT_SECTOR = 512

HOST_TIMEOUT_MARGIN_S = 30    # subprocess timeout = guest --timeout + this


def missing_tools() -> list[str]:
    """The build tools this host lacks (empty when guests can be built)."""
    return [t for t in TOOLS if shutil.which(t) is None]


class BuildError(RuntimeError):
    pass


def _run(cmd: list[str]) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr}")


def build(name: str, out: Path) -> Path:
    """Build guest `name` into directory `out`; returns the image path."""
    kind = KINDS[name]
    inc = f"-I{GUESTS}"
    if kind == "flat":
        obj, img = out / f"{name}.o", out / f"{name}.bin"
        _run(["gcc", "-m32", "-c", inc, "-o", str(obj), str(GUESTS / f"{name}.S")])
        _run(["ld", "-m", "elf_i386", "-Ttext", hex(FLAT_LOAD), "-e", "start",
              "--oformat", "binary", "-o", str(img), str(obj)])
        code = img.read_bytes()
        if len(code) > BOOT_SECTOR - 2:
            raise BuildError(f"{name}: {len(code)} bytes do not fit in a boot sector")
        img.write_bytes(code + bytes(BOOT_SECTOR - 2 - len(code)) + b"\x55\xaa")
        return img
    img = out / f"{name}.elf"
    if kind == "multiboot":
        obj = out / f"{name}.o"
        _run(["gcc", "-m32", "-c", inc, "-o", str(obj), str(GUESTS / f"{name}.S")])
        _run(["ld", "-m", "elf_i386", *LD_ELF, "-o", str(img), str(obj)])
    elif kind == "elf64":
        obj = out / f"{name}.o"
        _run(["gcc", "-c", inc, "-o", str(obj), str(GUESTS / f"{name}.S")])
        _run(["ld", "-m", "elf_x86_64", *LD_ELF, "-o", str(img), str(obj)])
    elif kind == "c32":
        start, cobj = out / f"{name}_start.o", out / f"{name}.o"
        _run(["gcc", "-m32", "-c", inc, "-o", str(start), str(GUESTS / f"{name}_start.S")])
        _run(["gcc", *C_FLAGS, "-c", "-o", str(cobj), str(GUESTS / f"{name}.c")])
        _run(["ld", "-m", "elf_i386", *LD_ELF, "-o", str(img), str(start), str(cobj)])
    else:
        raise ValueError(f"unknown guest kind {kind!r}")
    return img


class GuestBuilder:
    """Builds each guest at most once into one directory."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._built: dict[str, Path] = {}

    def __call__(self, name: str) -> Path:
        if name not in self._built:
            self._built[name] = build(name, self.out)
        return self._built[name]


@dataclass
class Run:
    status: int
    stdout: str
    stderr: str
    argv: list[str]

    def explain(self) -> str:
        """A failure message: the command and everything it printed."""
        return (f"\n$ {' '.join(self.argv)}\nstatus {self.status}\n--- stdout\n"
                f"{self.stdout}--- stderr\n{self.stderr}")


def run_pyhv(*args: str | Path, timeout: float = 20.0) -> Run:
    """`pyhv run ARGS --timeout T`; stdout is the guest's serial output.

    `timeout` is the guest's (pyhv's --timeout); the host gives the process a margin on
    top, so a pyhv that ignores --timeout fails the test instead of hanging it.
    """
    argv = [sys.executable, "-m", "pyhv", "run", *map(str, args), "--timeout", str(timeout)]
    p = subprocess.run(argv, capture_output=True, timeout=timeout + HOST_TIMEOUT_MARGIN_S,
                       stdin=subprocess.DEVNULL)
    return Run(p.returncode, p.stdout.decode("latin-1"), p.stderr.decode("latin-1", "replace"),
               argv)


def run_pyhv_raw(*args: str | Path, host_timeout: float = 60.0) -> Run:
    """`pyhv run ARGS` exactly as given (for bad-input tests: no --timeout added)."""
    argv = [sys.executable, "-m", "pyhv", "run", *map(str, args)]
    p = subprocess.run(argv, capture_output=True, timeout=host_timeout,
                       stdin=subprocess.DEVNULL)
    return Run(p.returncode, p.stdout.decode("latin-1"), p.stderr.decode("latin-1", "replace"),
               argv)


# ---------------------------------------------------------------------- engines

@functools.cache
def engine_unavailable(engine: str) -> str | None:
    """None when `engine` can run here, else why not (the skip reason)."""
    if engine == "kvm":
        if not Path("/dev/kvm").exists():
            return "/dev/kvm is missing"
        from pyhv.engines.kvm import KvmEngine
        why = KvmEngine.probe()
        return f"/dev/kvm is not usable: {why}" if why else None
    from pyhv.engines.emu import EmuEngine
    why = EmuEngine.probe()
    return f"the emu engine is unavailable: {why}" if why else None


ENGINES = ("emu", "kvm")


def engine_params(items: Sequence[T], ident: Callable[[T], str]) -> list[object]:
    """pytest params (item, engine) for every item on every engine: a skip where the
    engine is unavailable, and the `kvm` marker."""
    out: list[object] = []
    for item in items:
        for engine in ENGINES:
            marks: list[pytest.MarkDecorator] = []
            why = engine_unavailable(engine)
            if why:
                marks.append(pytest.mark.skip(reason=why))
            if engine == "kvm":
                marks.append(pytest.mark.kvm)
            out.append(pytest.param(item, engine, marks=marks, id=f"{ident(item)}-{engine}"))
    return out
