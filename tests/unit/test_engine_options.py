"""Engine options: declared by the engine class, checked by it, set with
`pyhv run --engine-opt NAME=VALUE` (never through the environment)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pyhv.engines import ENGINES, engine_class
from pyhv.errors import ConfigError


def test_trap_declares_umip_with_default_off() -> None:
    trap = engine_class("trap")
    assert trap.parse_options({}) == {"umip": False}
    assert trap.parse_options({"umip": "on"}) == {"umip": True}
    assert trap.parse_options({"umip": "OFF"}) == {"umip": False}


@pytest.mark.parametrize(("engine", "given", "message"), [
    ("trap", {"umip": "maybe"}, "umip=maybe: expected on or off, got 'maybe' (umip=on|off)"),
    ("trap", {"speed": "2"}, "engine 'trap' has no option 'speed' (it takes umip=on|off)"),
    ("kvm", {"umip": "on"}, "engine 'kvm' has no option 'umip' (it takes none)"),
    ("emu", {"umip": "on"}, "engine 'emu' has no option 'umip' (it takes none)"),
])
def test_an_option_the_engine_does_not_take_is_refused(engine: str, given: dict[str, str],
                                                       message: str) -> None:
    with pytest.raises(ConfigError) as e:
        engine_class(engine).parse_options(given)
    assert message in str(e.value)


def pyhv_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyhv", "run", *args], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_run_help_documents_every_engine_option() -> None:
    text = " ".join(pyhv_run("--help").stdout.split())
    assert "--engine-opt NAME=VALUE" in text
    for name in ENGINES:
        for opt in engine_class(name).options:
            assert f"{name}: {opt.name}={opt.values}" in text


@pytest.mark.parametrize(("args", "message"), [
    (("--engine", "kvm", "--engine-opt", "umip=on"), "engine 'kvm' has no option 'umip'"),
    (("--engine", "trap", "--engine-opt", "umip=maybe"), "expected on or off"),
    (("--engine", "trap", "--engine-opt", "umip"), "expected NAME=VALUE"),
])
def test_run_refuses_a_bad_engine_option_before_anything_runs(
        tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    img = tmp_path / "halt.bin"
    img.write_bytes(b"\xfa\xf4")                                       # cli; hlt
    r = pyhv_run("--kernel", str(img), "--format", "flat", *args, "--timeout", "10")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("pyhv: ") and message in r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stdout == ""
