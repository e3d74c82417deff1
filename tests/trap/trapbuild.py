"""Build the trap teaching guests (tests/guests/trap) and run them through `pyhv run`.

Each guest is one .S file (plus kernel64.h/.inc and the core guests' guest.h and
serial64.inc), built with gcc and ld as an ELF64 image at 1 MiB, which pyhv's loader
enters in long mode at CPL 0: the entry a 64-bit kernel gets, and the only one the
trap engine accepts. The link script and tool checks come from tests/machine/guestbuild.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "machine"))

from guestbuild import (  # noqa: E402
    GUESTS as CORE,
)
from guestbuild import (  # noqa: E402
    HOST_TIMEOUT_MARGIN_S,
    LD_ELF,
    BuildError,
    Run,
    engine_unavailable,
    missing_tools,
)

TRAP_GUESTS = Path(__file__).resolve().parent.parent / "guests" / "trap"
NAMES = ("teach", "sensitive", "badgdt", "badidt", "hidden", "cannot", "bench", "paging",
         "paging_high", "paging_upper", "btedge", "btirq", "usermode")

__all__ = ["CORE", "NAMES", "TRAP_GUESTS", "BuildError", "Run", "build", "engine_unavailable",
           "missing_tools", "run_pyhv", "unavailable"]


def _run(cmd: list[str]) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr}")


def build(name: str, out: Path) -> Path:
    """Build tests/guests/trap/<name>.S into `out`; returns the ELF64 image. A name
    ending in `-pv` is the PV build of that source (-DPV, pvops.h)."""
    src, defs = (name[:-3], ["-DPV"]) if name.endswith("-pv") else (name, [])
    obj, img = out / f"{name}.o", out / f"{name}.elf"
    _run(["gcc", "-c", *defs, f"-I{TRAP_GUESTS}", f"-I{CORE}", "-o", str(obj),
          str(TRAP_GUESTS / f"{src}.S")])
    _run(["ld", "-m", "elf_x86_64", *LD_ELF, "-o", str(img), str(obj)])
    return img


def session_builder(factory: pytest.TempPathFactory, label: str) -> Callable[[str], Path]:
    """For a session fixture: get(name) -> the built image, each built at most once; skips
    (with the reason) when gcc/as/ld are missing. Shared by the trap, bt and pv tests."""
    missing = missing_tools()
    if missing:
        pytest.skip(f"cannot build the trap guests: {', '.join(missing)} not installed")
    out = factory.mktemp(label)
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build(name, out)
        return built[name]
    return get


def unavailable(engine: str) -> str | None:
    """Why `engine` cannot run here (trap needs a usable /dev/kvm), or None."""
    why: str | None = engine_unavailable("kvm" if engine == "trap" else engine)
    return why


def run_pyhv(*args: str | Path, timeout: float = 20.0, umip: bool = False,
             env: dict[str, str] | None = None) -> Run:
    """`pyhv run ARGS --timeout T`, with the trap engine's `--engine-opt umip=on` when
    `umip`; `env` adds variables to the environment."""
    extra = ["--engine-opt", "umip=on"] if umip else []
    argv = [sys.executable, "-m", "pyhv", "run", *map(str, args), *extra,
            "--timeout", str(timeout)]
    p = subprocess.run(argv, capture_output=True, timeout=timeout + HOST_TIMEOUT_MARGIN_S,
                       stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    return Run(p.returncode, p.stdout.decode("latin-1"), p.stderr.decode("latin-1", "replace"),
               argv)
