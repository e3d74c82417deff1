"""`pyhv run` at its edges: bad input, guests that never stop, --strict-io, stdout that
is not read or closed, reset loops, unrecognised images, pyhv's own bugs.

Contract (pyhv.runner, pyhv.cli): bad input (a missing, empty, truncated or non-kernel
image, a malformed or impossible --mem, an unknown engine, a kernel that does not fit)
ends with status 2 and exactly one "pyhv: ..." line on stderr, no traceback, before the
guest runs; --timeout ends a guest that never stops with status 124; with --strict-io an
access to a port no device claims is fatal (status 4, naming the port), without it the
port reads as all ones and writes are ignored. Console output never blocks the run (an
unread stdout drops output with one warning; a closed one ends the run quietly, 141); a
reset loop is a failure (4); a device model's exception is pyhv's bug (70).

Synchronisation is by the guest's bytes and pyhv's messages on pipes, never by sleeps;
every subprocess has a timeout that only guards against hangs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from guestbuild import (
    GuestBuilder,
    Run,
    engine_params,
    engine_unavailable,
    run_pyhv,
    run_pyhv_raw,
)

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


# ---------------------------------------------------------------------- the run's edges
# Guests here are a few hand-assembled real-mode bytes (no toolchain needed).

FLOOD = bytes.fromhex("baf803" "31c0" "ee" "fec0" "ebfb")  # mov dx,0x3f8; xor ax,ax;
#                                                   1: out dx,al; inc al; jmp 1b
RESET = bytes.fromhex("b0fe" "e664" "ebfe")          # mov al,0xfe; out 0x64,al (i8042 reset)
FAULTY = bytes.fromhex("baf002" "ee" "f4")           # mov dx,0x2f0; out dx,al; hlt
HOST_GUARD_S = 60                                    # a hang guard, never a measurement


def _image(tmp: Path, name: str, code: bytes) -> Path:
    p = tmp / name
    p.write_bytes(code)
    return p


def _pyhv_argv(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "pyhv", "run", *map(str, args)]


def _counting(n: int) -> bytes:
    return bytes(i & 0xFF for i in range(n))


def each_engine() -> list[object]:
    """pytest params: one per engine, skipped where it cannot run, kvm marked."""
    return [pytest.param(p.values[1], marks=p.marks, id=p.values[1])  # type: ignore[attr-defined]
            for p in engine_params([None], lambda _: "")]


@pytest.mark.parametrize("engine", each_engine())
def test_unread_stdout_pipe_does_not_block_the_run(tmp_path: Path, engine: str) -> None:
    """A guest floods the console into a pipe nobody reads until pyhv has exited:
    --timeout still ends the run (124); what was written is the guest's bytes in order.
    (How much is dropped depends on the engine's speed; the next test checks the
    warning and the count.)"""
    eng = engine
    err = tmp_path / "stderr"
    with err.open("wb") as ferr:
        p = subprocess.Popen(_pyhv_argv("--kernel", _image(tmp_path, "flood.bin", FLOOD),
                                        "--format", "flat", "--engine", eng,
                                        "--timeout", "3"),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=ferr)
        try:
            status = p.wait(timeout=HOST_GUARD_S)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            assert p.stdout is not None
            out = p.stdout.read()
            p.stdout.close()
    stderr = err.read_text("latin-1")
    assert status == 124, stderr[-3000:]
    assert "Traceback" not in stderr
    assert len(out) >= 4096 and out[:4096] == _counting(4096)


@pytest.mark.skipif(engine_unavailable("emu") is not None, reason="emu unavailable")
def test_sigterm_ends_a_run_whose_stdout_is_not_read(tmp_path: Path) -> None:
    """Once output is being dropped (one warning), SIGTERM still ends the run: 143."""
    p = subprocess.Popen(_pyhv_argv("--kernel", _image(tmp_path, "flood.bin", FLOOD),
                                    "--format", "flat", "--engine", "emu",
                                    "--timeout", str(HOST_GUARD_S)),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        assert p.stderr is not None
        before = []
        while line := p.stderr.readline().decode():   # until pipe and buffer are full
            before.append(line)
            if "dropping output" in line:
                break
        assert before and "dropping output" in before[-1], before
        p.send_signal(signal.SIGTERM)
        status = p.wait(timeout=HOST_GUARD_S)
        rest = p.stderr.read().decode()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()
    assert status == 143, rest
    assert "dropping output" not in rest                   # one warning, then a count
    assert "were dropped" in rest and "Traceback" not in rest


@pytest.mark.parametrize("engine", each_engine())
def test_closed_stdout_ends_the_run_quietly(tmp_path: Path, engine: str) -> None:
    """`pyhv run ... | head -c 10`: the run ends with 141 (as a tool killed by SIGPIPE)
    and pyhv says nothing."""
    eng = engine
    p = subprocess.Popen(_pyhv_argv("--kernel", _image(tmp_path, "flood.bin", FLOOD),
                                    "--format", "flat", "--engine", eng,
                                    "--timeout", str(HOST_GUARD_S)),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stderr is not None
        assert p.stdout.read(10) == _counting(10)
        p.stdout.close()
        status = p.wait(timeout=HOST_GUARD_S)
        err = p.stderr.read().decode()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if p.stderr is not None:
            p.stderr.close()
    assert (status, err) == (141, "")


@pytest.mark.parametrize("engine", each_engine())
def test_a_reset_loop_is_reported_as_a_failure(tmp_path: Path, engine: str) -> None:
    eng = engine
    r = run_pyhv("--kernel", _image(tmp_path, "reset.bin", RESET), "--format", "flat",
                 "--engine", eng, timeout=HOST_GUARD_S)
    assert r.status == 4, r.explain()
    assert "the guest reset 20 times in a row" in r.stderr, r.explain()
    assert "--on-reboot" not in r.stderr and "Traceback" not in r.stderr, r.explain()


def test_reset_with_on_reboot_exit_ends_the_run(tmp_path: Path) -> None:
    if engine_unavailable("emu"):
        pytest.skip("emu unavailable")
    r = run_pyhv("--kernel", _image(tmp_path, "reset.bin", RESET), "--format", "flat",
                 "--engine", "emu", "--on-reboot", "exit", timeout=HOST_GUARD_S)
    assert r.status == 0, r.explain()
    assert ("pyhv: the guest reset (i8042 reset); --on-reboot exit ends the run"
            in r.stderr), r.explain()


# ---------------------------------------------------------------------- --format auto

def test_an_unrecognised_file_is_not_run_as_flat(tmp_path: Path) -> None:
    """Text (or anything else without a signature) is refused with the reasons, not run
    as real-mode code; --format flat still runs it."""
    text = _image(tmp_path, "passwd", b"root:x:0:0:root:/root:/bin/bash\n" * 20)
    r = run_pyhv_raw("--kernel", text, "--timeout", "10")
    assert_refused(r)
    for why in ("not Linux", "not multiboot", "not ELF64", "not a boot sector",
                "--format flat"):
        assert why in r.stderr, r.explain()


@pytest.mark.parametrize("engine", each_engine())
def test_a_boot_sector_is_run_as_flat(tmp_path: Path, engine: str) -> None:
    eng = engine
    code = bytes.fromhex("b005" "e6f4" "ebfe")              # mov al,5; out 0xf4,al
    sector = code + bytes(510 - len(code)) + b"\x55\xaa"
    r = run_pyhv("--kernel", _image(tmp_path, "boot.img", sector), "--engine", eng)
    assert r.status == 11, r.explain()


# ---------------------------------------------------------------------- internal errors

DRIVER = '''\
"""pyhv's command line with a test-only faulty device on port 0x2f0 in every machine."""
import sys
from pyhv import cli, machine

class Faulty:
    def read(self, offset, size):
        raise RuntimeError("faulty test device: read")
    def write(self, offset, size, value):
        raise RuntimeError("faulty test device: write")

build = machine.Machine._build
def with_faulty(self, config, console):
    build(self, config, console)
    self.pio.register(0x2F0, 1, Faulty(), "faulty test device")
machine.Machine._build = with_faulty
sys.exit(cli.main(sys.argv[1:]))
'''


@pytest.mark.parametrize(("debug", "engine"), engine_params([False, True],
                                                             lambda d: "debug" if d
                                                             else "log"))
def test_a_device_model_bug_is_reported_as_an_internal_error(tmp_path: Path, debug: bool,
                                                             engine: str) -> None:
    """Status 70 and one line saying it is pyhv's bug; the traceback in a log file the
    line names, or on stderr with --debug. Never "the guest crashed", never a bare
    traceback."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    logs = tmp_path / "logs"
    logs.mkdir()
    argv = [sys.executable, str(driver), "run", "--kernel",
            str(_image(tmp_path, "faulty.bin", FAULTY)), "--format", "flat",
            "--engine", engine, "--timeout", "20", *(["--debug"] if debug else [])]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=HOST_GUARD_S,
                       stdin=subprocess.DEVNULL, env={**os.environ, "TMPDIR": str(logs)})
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("pyhv: ")]
    assert p.returncode == 70, p.stderr
    assert len(lines) == 1 and "internal error, a bug in pyhv" in lines[0], p.stderr
    assert "faulty test device raised RuntimeError" in lines[0], p.stderr
    assert "crashed" not in p.stderr
    written = list(logs.glob("pyhv-internal-*.log"))
    if debug:
        assert "Traceback" in p.stderr and written == [], p.stderr
    else:
        assert "Traceback" not in p.stderr and len(written) == 1, p.stderr
        assert str(written[0]) in lines[0]
        assert 'raise RuntimeError("faulty test device: write")' in written[0].read_text()
