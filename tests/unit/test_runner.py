"""The run loop over a real machine: endings, statuses, the state machine, on each engine.

Guests are a few hand-assembled real-mode bytes in a flat image, so these tests need no
toolchain; each runs under a --timeout so none can hang.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from pyhv.engines import engine_class
from pyhv.machine import Machine, MachineConfig, StopRequest
from pyhv.runner import STATUS_CRASH, STATUS_OK, STATUS_TIMEOUT, Runner, VmState


def engines() -> list[object]:
    out: list[object] = []
    for name in ("emu", "kvm"):
        why = engine_class(name).probe()
        out.append(pytest.param(name, marks=pytest.mark.skipif(
            why is not None, reason=f"engine {name} unavailable: {why}")))
    return out


def machine(tmp_path: Path, code: bytes, engine: str, *, strict: bool = False,
            out: bytearray | None = None) -> Machine:
    img = tmp_path / "guest.bin"
    img.write_bytes(code)
    sink = out if out is not None else bytearray()
    return Machine(MachineConfig(kernel=img, format="flat", engine=engine, mem_size=4 << 20,
                                 strict_io=strict), sink.extend)


def run(m: Machine, timeout: float = 20) -> tuple[Runner, object]:
    r = Runner(m, timeout=timeout)
    try:
        return r, r.run()
    finally:
        m.close()


@pytest.mark.parametrize("engine", engines())
def test_cli_hlt_is_a_clean_end(tmp_path: Path, engine: str) -> None:
    r, res = run(machine(tmp_path, b"\xfa\xf4", engine))          # cli; hlt
    assert (res.status, res.reason) == (STATUS_OK, "halt")       # type: ignore[attr-defined]
    assert r.state is VmState.STOPPED


@pytest.mark.parametrize("engine", engines())
def test_debug_exit_status(tmp_path: Path, engine: str) -> None:
    _, res = run(machine(tmp_path, b"\xb0\x05\xe6\xf4\xeb\xfe", engine))  # mov al,5; out 0xf4
    assert (res.status, res.reason) == ((5 << 1) | 1, "debug-exit")  # type: ignore[attr-defined]


@pytest.mark.parametrize("engine", engines())
def test_serial_output_reaches_the_console(tmp_path: Path, engine: str) -> None:
    # mov dx,0x3f8; mov al,'A'; out dx,al; mov al,'\n'; out dx,al; cli; hlt
    code = b"\xba\xf8\x03\xb0A\xee\xb0\n\xee\xfa\xf4"
    out = bytearray()
    _, res = run(machine(tmp_path, code, engine, out=out))
    assert out == b"A\n" and res.status == STATUS_OK  # type: ignore[attr-defined]


@pytest.mark.parametrize("engine", engines())
def test_unknown_port_reads_all_ones_and_strict_io_ends_the_run(tmp_path: Path,
                                                                 engine: str) -> None:
    # in al,0x99; out 0xf4,al  -> status (0xff << 1 | 1) & 0xff
    code = b"\xe4\x99\xe6\xf4\xeb\xfe"
    _, res = run(machine(tmp_path, code, engine))
    assert res.status == 0xFF  # type: ignore[attr-defined]
    _, res = run(machine(tmp_path, code, engine, strict=True))
    assert res.status == STATUS_CRASH and "0x99" in res.detail  # type: ignore[attr-defined]


@pytest.mark.parametrize("engine", engines())
def test_timeout_ends_a_spinning_guest(tmp_path: Path, engine: str) -> None:
    _, res = run(machine(tmp_path, b"\xeb\xfe", engine), timeout=0.5)   # jmp $
    assert (res.status, res.reason) == (STATUS_TIMEOUT, "timeout")  # type: ignore[attr-defined]


@pytest.mark.parametrize("engine", engines())
def test_pause_resume_stop_from_another_thread(tmp_path: Path, engine: str) -> None:
    m = machine(tmp_path, b"\xeb\xfe", engine)
    r = Runner(m, timeout=30)
    box: list[object] = []
    t = threading.Thread(target=lambda: box.append(r.run()))
    t.start()
    try:
        for _ in range(200):
            if r.state is VmState.RUNNING:
                break
            time.sleep(0.01)
        r.pause()
        assert r.state is VmState.PAUSED
        time.sleep(0.1)
        before = r.stats.t_guest
        time.sleep(0.2)
        assert r.stats.t_guest - before < 0.05          # paused: the vCPU does not run
        r.resume()
        assert r.state is VmState.RUNNING
        r.stop(StopRequest("user", 0, "stopped by test"))
        t.join(10)
        assert not t.is_alive()
    finally:
        m.close()
    assert box and box[0].reason == "user"  # type: ignore[attr-defined]
    assert r.state is VmState.STOPPED


def test_run_twice_is_refused(tmp_path: Path) -> None:
    m = machine(tmp_path, b"\xfa\xf4", "emu")
    try:
        r = Runner(m, timeout=10)
        r.run()
        with pytest.raises(RuntimeError):
            r.run()
    finally:
        m.close()


def test_bad_image_creates_nothing(tmp_path: Path) -> None:
    from pyhv.errors import ImageError
    img = tmp_path / "big.bin"
    img.write_bytes(b"\x90" * (700 << 10))             # above the VGA hole from 0x7c00
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ImageError):
        Machine(MachineConfig(kernel=img, format="flat", engine="emu", mem_size=4 << 20),
                lambda _b: None)
    assert len(os.listdir("/proc/self/fd")) == fds


def test_without_unicorn_emu_says_so_and_kvm_still_runs(tmp_path: Path) -> None:
    """unicorn missing: `--engine emu` fails with one line naming the package; the kvm
    engine (and everything else) still works."""
    import subprocess
    import sys

    fake = tmp_path / "site" / "unicorn"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('unicorn is not installed here')\n")
    img = tmp_path / "halt.bin"
    img.write_bytes(b"\xfa\xf4")                                       # cli; hlt
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}:{os.environ.get('PYTHONPATH', '')}"}

    def pyhv(engine: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pyhv", "run", "--kernel", str(img),
                               "--format", "flat", "--engine", engine, "--timeout", "20"],
                              capture_output=True, text=True, env=env, timeout=60,
                              stdin=subprocess.DEVNULL)

    r = pyhv("emu")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("pyhv: ") and "'unicorn'" in r.stderr
    if engine_class("kvm").probe() is None:
        assert pyhv("kvm").returncode == 0


@pytest.mark.parametrize("engine", engines())
@pytest.mark.parametrize(("sig", "status"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_signals_end_a_spinning_guest_promptly(tmp_path: Path, engine: str, sig: str,
                                               status: int) -> None:
    """A guest spinning inside the engine (no exits, no timers) still lets pyhv act on
    SIGINT/SIGTERM at once: the signal's wakeup kicks the vCPU."""
    import signal
    import subprocess
    import sys

    img = tmp_path / "spin.bin"
    img.write_bytes(b"\xba\xf8\x03\xb0R\xee\xeb\xfe")  # mov dx,0x3f8; mov al,'R'; out; jmp $
    p = subprocess.Popen([sys.executable, "-m", "pyhv", "run", "--kernel", str(img),
                          "--format", "flat", "--engine", engine, "--timeout", "60"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        assert p.stdout is not None
        assert p.stdout.read(1) == b"R"          # the guest runs: pyhv is in its run loop
        time.sleep(0.3)
        p.send_signal(getattr(signal, sig))
        _, err_b = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err = err_b.decode()
    assert p.returncode == status, err
    assert "Traceback" not in err
