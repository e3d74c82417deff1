"""Build the emu test guests (tests/guests/emu) and run them on pyhv's own machine.

Each guest is one .S file (plus pc.inc, and the core guests' guest.h for the multiboot
header) built at test time with gcc and ld, in one of the core guests' ways
(tests/machine/guestbuild.py):

    flat       16-bit start, raw binary at 0x7c00        real16, modeswitch
    multiboot  ELF32 at 1 MiB with a multiboot header    prot32 (and sources a test writes)
    elf64      ELF64 at 1 MiB, entered in long mode      long64

They run in-process on the emu engine: pyhv.machine builds the PC (8259, 8254, 16550,
debug-exit, ...) and loads the image with pyhv's loaders, pyhv.runner runs it. So the
tests drive exactly what `pyhv run --engine emu` drives, and still see what a subprocess
would hide: the engine's counters, the vCPU, the machine's devices and clock after the
run. Every run has a host timeout (RUN_TIMEOUT_S), so no guest can hang a test.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "machine"))

from guestbuild import FLAT_LOAD, LD_ELF, BuildError, missing_tools  # noqa: E402
from guestbuild import GUESTS as CORE  # noqa: E402

from pyhv.exits import Exit  # noqa: E402
from pyhv.machine import Machine, MachineConfig  # noqa: E402
from pyhv.runner import Runner, RunResult  # noqa: E402

GUESTS = Path(__file__).resolve().parent.parent / "guests" / "emu"
KINDS = {"real16": "flat", "modeswitch": "flat", "prot32": "multiboot", "long64": "elf64"}
MEM = 16 << 20
RUN_TIMEOUT_S = 30.0

__all__ = ["GUESTS", "KINDS", "Booted", "Ran", "build", "build_source", "missing_tools"]


def _run(cmd: list[str]) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr}")


def build_source(src: Path, kind: str, out: Path) -> Path:
    """Build one .S file as `kind` into directory `out`; returns the image."""
    name = src.stem
    obj = out / f"{name}.o"
    inc = [f"-I{GUESTS}", f"-I{CORE}"]
    if kind == "flat":
        img = out / f"{name}.bin"
        _run(["gcc", "-m32", "-c", *inc, "-o", str(obj), str(src)])
        _run(["ld", "-m", "elf_i386", "-Ttext", hex(FLAT_LOAD), "-e", "start",
              "--oformat", "binary", "-o", str(img), str(obj)])
        return img
    img = out / f"{name}.elf"
    if kind == "multiboot":
        _run(["gcc", "-m32", "-c", *inc, "-o", str(obj), str(src)])
        _run(["ld", "-m", "elf_i386", *LD_ELF, "-o", str(img), str(obj)])
    elif kind == "elf64":
        _run(["gcc", "-c", *inc, "-o", str(obj), str(src)])
        _run(["ld", "-m", "elf_x86_64", *LD_ELF, "-o", str(img), str(obj)])
    else:
        raise ValueError(f"unknown guest kind {kind!r}")
    return img


def build(name: str, out: Path) -> Path:
    """Build tests/guests/emu/<name>.S into `out`."""
    return build_source(GUESTS / f"{name}.S", KINDS[name], out)


@dataclass
class Ran:
    """How one run ended, and what the tests look at after it."""

    out: str                          # everything the guest wrote to COM1
    result: RunResult
    runner: Runner
    machine: Machine

    @property
    def exit_code(self) -> int | None:
        """The value the guest wrote to the debug-exit port (None: it ended otherwise)."""
        return self.result.status >> 1 if self.result.reason == "debug-exit" else None

    @property
    def stats(self) -> dict[str, int | float]:
        """The emu vCPU's counters (interrupts, exceptions, syscalls, vectors...)."""
        return self.runner.engine_stats

    @property
    def last(self) -> Exit | None:
        """The exit that ended the run."""
        return self.runner.last_exit

    @property
    def virtual_ns(self) -> int:
        return self.machine.clock.now_ns()


class Booted:
    """One guest on a fresh emu machine (closed by the `emu` fixture after the test)."""

    def __init__(self, image: Path, *, append: str = "", **config: object) -> None:
        self.console = bytearray()
        if image.suffix == ".bin":  # flat binaries are named, never guessed (--format auto)
            config.setdefault("format", "flat")
        self.machine = Machine(MachineConfig(kernel=image, cmdline=append, engine="emu",
                                             mem_size=MEM, **config),  # type: ignore[arg-type]
                               self.console.extend)

    def run(self, *, timeout: float = RUN_TIMEOUT_S, max_exits: int | None = None) -> Ran:
        runner = Runner(self.machine, timeout=timeout, max_exits=max_exits)
        result = runner.run()
        return Ran(self.console.decode("latin-1"), result, runner, self.machine)

    def close(self) -> None:
        self.machine.close()
