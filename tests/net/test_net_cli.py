"""`pyhv run --net/--mac` on the command line: bad options and back ends that cannot start
are one `pyhv:` line and status 2 before any guest runs; passt never outlives a run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pyhv.net.passt import passt_path


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyhv", "run", "--engine", "emu", *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args,message", [
    (["--net", "bogus"], "--net bogus: expected"),
    (["--net", "socket=connect:/nonexistent/x.sock"], "cannot connect to /nonexistent"),
    (["--mac", "52:54:00:00:00:01"], "--mac needs a NIC"),
    (["--net", "user", "--mac", "01:00:00:00:00:00"], "multicast"),
    (["--net", "tap=" + "x" * 20], "not a valid interface name"),
])
def test_bad_net_options(args: list[str], message: str) -> None:
    # a back end is opened when the machine is built: that needs a real kernel (pyhv's
    # Linux from the image cache); the option checks come before any of that
    kernel = [] if "socket=connect" in args[-1] else ["--kernel", "/dev/null"]
    r = run(*args, *kernel, "--command", "true")
    assert r.returncode == 2, r.stderr
    # (the last line: a first run may fetch pyhv's Linux image and say so first)
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("pyhv: ") and message in lines[-1], r.stderr
    assert "Traceback" not in r.stderr


def _passts() -> set[int]:
    r = subprocess.run(["pgrep", "-x", "passt"], capture_output=True, text=True, timeout=10)
    return {int(p) for p in r.stdout.split()}


@pytest.mark.slow
@pytest.mark.skipif(passt_path() is None, reason="needs passt")
def test_passt_is_gone_after_a_timeout() -> None:
    before = _passts()
    r = run("--net", "user", "--timeout", "15", "--command", "sleep 1000", timeout=90)
    assert r.returncode == 124, r.stderr
    assert not (_passts() - before)
