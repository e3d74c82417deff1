"""`pyhv run` at its edges: bad input, guests that never stop, --strict-io.

Contract (pyhv.runner, pyhv.cli): bad input (a missing, empty, truncated or non-kernel
image, a malformed or impossible --mem, an unknown engine, a kernel that does not fit)
ends with status 2 and exactly one "pyhv: ..." line on stderr, no traceback, before the
guest runs; --timeout ends a guest that never stops with status 124; with --strict-io an
access to a port no device claims is fatal (status 4, naming the port), without it the
port reads as all ones and writes are ignored.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from guestbuild import GuestBuilder, Run, engine_params, run_pyhv, run_pyhv_raw

# ---------------------------------------------------------------------- bad input


def assert_refused(r: Run) -> None:
    """Status 2, one 'pyhv: ' line on stderr, no traceback, no guest output."""
    lines = r.stderr.strip().splitlines()
    assert r.status == 2, r.explain()
    assert len(lines) == 1 and lines[0].startswith("pyhv: "), r.explain()
    assert "Traceback" not in r.stderr and r.stdout == "", r.explain()


def _missing(tmp: Path, _g: GuestBuilder) -> list[str]:
    return ["--kernel", str(tmp / "no-such-kernel.elf")]


def _directory(tmp: Path, _g: GuestBuilder) -> list[str]:
    return ["--kernel", str(tmp)]


def _empty(tmp: Path, _g: GuestBuilder) -> list[str]:
    (tmp / "empty.elf").write_bytes(b"")
    return ["--kernel", str(tmp / "empty.elf")]


def _truncated_elf(tmp: Path, g: GuestBuilder) -> list[str]:
    """The first 200 bytes of a multiboot ELF: headers point past the end."""
    (tmp / "trunc.elf").write_bytes(g("hello").read_bytes()[:200])
    return ["--kernel", str(tmp / "trunc.elf")]


def _truncated_elf64(tmp: Path, g: GuestBuilder) -> list[str]:
    (tmp / "trunc64.elf").write_bytes(g("long64").read_bytes()[:300])
    return ["--kernel", str(tmp / "trunc64.elf"), "--format", "elf64"]


def _elf32_without_multiboot(tmp: Path, g: GuestBuilder) -> list[str]:
    """An ELF32 whose multiboot magic was erased: pyhv cannot know how to enter it."""
    data = bytearray(g("hello").read_bytes())
    magic = (0x1BADB002).to_bytes(4, "little")
    at = data.find(magic)
    assert at >= 0
    data[at:at + 4] = bytes(4)
    (tmp / "nomb.elf").write_bytes(bytes(data))
    return ["--kernel", str(tmp / "nomb.elf")]


def _flat_too_big(tmp: Path, _g: GuestBuilder) -> list[str]:
    """A flat image that cannot fit between 0x7c00 and the VGA hole at 0xa0000."""
    (tmp / "big.bin").write_bytes(bytes(700_000))
    return ["--kernel", str(tmp / "big.bin"), "--format", "flat"]


def _kernel_beyond_mem(_tmp: Path, g: GuestBuilder) -> list[str]:
    """bigbss needs 1 MiB + 16 MiB; 8 MiB of RAM cannot hold it (32 MiB can: the
    bigbss case in test_machine_guests.py)."""
    return ["--kernel", str(g("bigbss")), "--mem", "8M"]


def _mem(value: str) -> Callable[[Path, GuestBuilder], list[str]]:
    def args(_tmp: Path, g: GuestBuilder) -> list[str]:
        return ["--kernel", str(g("hello")), f"--mem={value}"]
    return args


def _engine(name: str) -> Callable[[Path, GuestBuilder], list[str]]:
    def args(_tmp: Path, g: GuestBuilder) -> list[str]:
        return ["--kernel", str(g("hello")), "--engine", name]
    return args


def _missing_initrd(tmp: Path, g: GuestBuilder) -> list[str]:
    return ["--kernel", str(g("hello")), "--initrd", str(tmp / "no-such-initrd")]


BAD_INPUT: dict[str, Callable[[Path, GuestBuilder], list[str]]] = {
    "missing-kernel": _missing,
    "kernel-is-directory": _directory,
    "empty-kernel": _empty,
    "truncated-elf32": _truncated_elf,
    "truncated-elf64": _truncated_elf64,
    "elf32-no-multiboot": _elf32_without_multiboot,
    "flat-too-big": _flat_too_big,
    "kernel-beyond-mem": _kernel_beyond_mem,
    "mem-12Q": _mem("12Q"),
    "mem-1T": _mem("1T"),          # more than any host these tests run on
    "mem-abc": _mem("abc"),
    "mem-0": _mem("0"),
    "mem-negative": _mem("-1M"),
    "mem-below-minimum": _mem("1M"),
    "engine-unknown": _engine("vmware"),
    "missing-initrd": _missing_initrd,
}


@pytest.mark.parametrize("make_args", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_one_line(guests: GuestBuilder, tmp_path: Path,
                               make_args: Callable[[Path, GuestBuilder], list[str]]) -> None:
    assert_refused(run_pyhv_raw(*make_args(tmp_path, guests)))


@pytest.mark.parametrize("engine", ["kvm", "emu"])
def test_bad_input_before_the_engine(tmp_path: Path, engine: str) -> None:
    """An unusable image is refused the same way whichever engine was asked for, even
    one this host cannot provide."""
    assert_refused(run_pyhv_raw("--kernel", str(tmp_path / "nothing"), "--engine", engine))


# ---------------------------------------------------------------------- never stops

TIMEOUT_S = 2


@pytest.mark.parametrize(("mode", "engine"), engine_params(["spin", "idle"], str))
def test_timeout(guests: GuestBuilder, mode: str, engine: str) -> None:
    """A guest that loops (spin) or sleeps with nothing to wake it (idle) is ended by
    --timeout with status 124, promptly, with the guest's output intact."""
    t0 = time.monotonic()
    r = run_pyhv("--kernel", guests("stuck"), "--engine", engine, "--append", mode,
                 timeout=TIMEOUT_S)
    took = time.monotonic() - t0
    assert (r.status, r.stdout) == (124, f"stuck: {mode}\n"), r.explain()
    assert "Traceback" not in r.stderr, r.explain()
    assert TIMEOUT_S <= took < TIMEOUT_S + 10, f"took {took:.1f} s{r.explain()}"


# ---------------------------------------------------------------------- --strict-io

@pytest.mark.parametrize(("strict", "engine"), engine_params([False, True],
                                                             lambda s: "strict" if s
                                                             else "lenient"))
def test_unclaimed_port(guests: GuestBuilder, strict: bool, engine: str) -> None:
    r = run_pyhv("--kernel", guests("ioprobe"), "--engine", engine,
                 *(["--strict-io"] if strict else []))
    if strict:
        assert (r.status, r.stdout) == (4, "port 0x2f0 reads "), r.explain()
        assert "0x2f0" in r.stderr, r.explain()
    else:
        assert (r.status, r.stdout) == (3, "port 0x2f0 reads 000000ff\n"
                                           "port 0x2f0 written\n"), r.explain()
    assert "Traceback" not in r.stderr, r.explain()
