"""The run loop over a real machine: endings, statuses, the state machine, on each engine.

Guests are a few hand-assembled bytes in a flat real-mode image or a minimal ELF64 (the
trap engine runs only 64-bit kernels), so these tests need no toolchain; each runs under
a timeout so none can hang.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from pathlib import Path

import pytest

from pyhv.engines import engine_class
from pyhv.exits import Shutdown
from pyhv.machine import Machine, MachineConfig, StopRequest
from pyhv.runner import (
    STATUS_CRASH,
    STATUS_INTERNAL,
    STATUS_OK,
    STATUS_TIMEOUT,
    Runner,
    RunResult,
    VmState,
)


def engines(names: tuple[str, ...] = ("emu", "kvm")) -> list[object]:
    out: list[object] = []
    for name in names:
        why = engine_class(name).probe()
        out.append(pytest.param(name, marks=pytest.mark.skipif(
            why is not None, reason=f"engine {name} unavailable: {why}")))
    return out


ELF64_ENTRY = 0x200000


def elf64(code: bytes) -> bytes:
    """A minimal ELF64 kernel: one PT_LOAD of `code` at 2 MiB, entered in long mode."""
    ehdr = struct.pack("<4sBBBB8xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 2, 62, 1,
                       ELF64_ENTRY, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, ELF64_ENTRY, ELF64_ENTRY, len(code),
                       len(code), 0x1000)
    return ehdr + phdr + bytes(0x1000 - len(ehdr) - len(phdr)) + code


def machine64(tmp_path: Path, code: bytes, engine: str) -> Machine:
    img = tmp_path / "guest64.elf"
    img.write_bytes(elf64(code))
    return Machine(MachineConfig(kernel=img, format="elf64", engine=engine,
                                 mem_size=16 << 20), lambda _b: None)


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


# ---------------------------------------------------------------------- one error policy

FAULTY_PORT = 0x2F0


class FaultyDevice:
    """A test-only device model with a bug: every access raises."""

    def read(self, offset: int, size: int) -> int:
        raise RuntimeError("faulty test device: read")

    def write(self, offset: int, size: int, value: int) -> None:
        raise RuntimeError("faulty test device: write")


# mov dx, 0x2f0; out dx, al (or in al, dx); hlt -- in real mode and in 64-bit mode
FAULTY_CODE = {
    ("real", "write"): b"\xba\xf0\x02\xee\xf4",
    ("real", "read"): b"\xba\xf0\x02\xec\xf4",
    ("long", "write"): b"\x66\xba\xf0\x02\xee\xf4",
    ("long", "read"): b"\x66\xba\xf0\x02\xec\xf4",
}


@pytest.mark.parametrize("access", ["write", "read"])
@pytest.mark.parametrize("engine", engines(("emu", "kvm", "trap")))
def test_a_device_model_bug_is_an_internal_error(tmp_path: Path, engine: str,
                                                 access: str) -> None:
    """An exception from a device model is pyhv's bug, on every engine: status 70, one
    line naming the device and the access, the traceback kept for a log; never "the
    guest crashed" (4) and never an exception out of run()."""
    mode = "long" if engine == "trap" else "real"
    code = FAULTY_CODE[(mode, access)]
    m = (machine64(tmp_path, code, engine) if mode == "long"
         else machine(tmp_path, code, engine))
    m.pio.register(FAULTY_PORT, 1, FaultyDevice(), "faulty test device")
    _, res = run(m)
    assert isinstance(res, RunResult)
    assert (res.status, res.reason) == (STATUS_INTERNAL, "internal"), res
    assert "\n" not in res.detail
    assert "faulty test device" in res.detail and f"{FAULTY_PORT:#x}" in res.detail, res
    assert f"RuntimeError: faulty test device: {access}" in res.detail, res
    assert "Traceback" in res.traceback
    assert 'raise RuntimeError("faulty test device' in res.traceback


@pytest.mark.parametrize("engine", engines(("emu", "kvm", "trap")))
def test_kick_after_close_is_harmless(tmp_path: Path, engine: str) -> None:
    """Input or a signal may kick the vCPU while the machine closes: never an error."""
    m = (machine64(tmp_path, b"\xf4", engine) if engine == "trap"
         else machine(tmp_path, b"\xfa\xf4", engine))
    r, _ = run(m)                       # run() closes the machine
    r.kick()
    r.vcpu.kick()


def test_a_late_kick_cannot_kill_the_process_at_exit() -> None:
    """The KVM engine's kick is SIGUSR1, whose default action kills the process. Python
    puts its handlers back to SIG_DFL as it finalizes, so a kick sent to a vCPU thread
    that a loaded host had not scheduled yet was delivered then and killed a finished
    `pyhv run` (status -10). From the last atexit hook (run after pyhv's, before
    Python's reset) SIGUSR1 must be ignored, which also drops a pending kick."""
    import subprocess
    import sys
    code = ("import atexit, signal\n"
            "atexit.register(lambda: print('at exit ignored',\n"
            "                              signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN))\n"
            "from pyhv.kvm.vcpu import install_kick_handler\n"
            "install_kick_handler()\n"
            "print('running', callable(signal.getsignal(signal.SIGUSR1)))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert (p.returncode, p.stdout) == (0, "running True\nat exit ignored True\n"), p


# ---------------------------------------------------------------------- crash reports

@pytest.mark.parametrize("engine", engines(("emu", "kvm", "trap")))
def test_crash_report_bytes_come_through_the_guests_paging(tmp_path: Path,
                                                           engine: str) -> None:
    """A 64-bit guest (paging on) executes UD2 with no IDT: triple fault. The report
    pairs the RIP of the UD2 with its bytes, read through the guest's page tables."""
    code = b"\x90" * 3 + b"\x0f\x0b"          # nop x3; ud2
    _, res = run(machine64(tmp_path, code, engine))
    assert isinstance(res, RunResult)
    assert (res.status, res.reason) == (STATUS_CRASH, "crash"), res
    assert res.rip == ELF64_ENTRY + 3, res
    assert res.insn[:2] == b"\x0f\x0b", res


@pytest.mark.parametrize("engine", engines(("emu", "kvm")))
def test_crash_bytes_are_those_at_the_reported_rip(tmp_path: Path, engine: str) -> None:
    """The bytes printed next to a RIP are read at that RIP, not at wherever the vCPU
    stands now (here: the entry, 0x7c00; the shutdown names 0x7c04)."""
    m = machine(tmp_path, b"\xfa\xf4\x90\x90\x0f\x0b\xcc", engine)   # cli; hlt; nop; nop; ud2
    try:
        r = Runner(m, timeout=5)
        res = r._handle(Shutdown("triple fault (test)", rip=0x7C04))
    finally:
        m.close()
    assert res is not None and res.rip == 0x7C04
    assert res.insn[:3] == b"\x0f\x0b\xcc", res


class _HostTime:
    """A host clock that moves only when the run loop waits (then by exactly the wait):
    how much host time an idle guest's timer took, without reading the wall clock."""

    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    # the runner's wake event: nothing sets it, each wait lasts its whole timeout
    def wait(self, timeout: float | None = None) -> bool:
        self.t += timeout or 0.0
        return False

    def clear(self) -> None:
        pass

    def set(self) -> None:
        pass

    def is_set(self) -> bool:
        return False


@pytest.mark.parametrize("engine", engines(("emu",)))
def test_idle_guest_time_never_runs_ahead_of_the_host(tmp_path: Path, engine: str,
                                                     monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
    """A guest that lags the host (a slow boot on a loaded host: 100 s of host time, no
    guest time yet) waits 1 s of guest time, e.g. for a DHCP offer from passt: that
    second is a second of host time too, not skipped at once "to catch up" (which let
    udhcpc's, ARP's and ping's timeouts run out before the host-side peer could answer)."""
    import pyhv.runner as runner_mod
    host = _HostTime()
    m = machine(tmp_path, b"\xf4", engine)
    try:
        r = Runner(m, timeout=20)
        assert r.virtual
        monkeypatch.setattr(runner_mod.time, "monotonic", host.monotonic)
        r._t0, r._guest0_ns = host.t - 100.0, m.clock.now_ns()   # the run began 100 s ago
        r.wake = host  # type: ignore[assignment]
        t0_guest, t0_host = m.clock.now_ns(), host.t
        fired: list[tuple[int, float]] = []
        m.timers.schedule(t0_guest + 10**9, lambda: fired.append((m.clock.now_ns(), host.t)))
        r._idle(ready=lambda: bool(fired))
        monkeypatch.undo()
        assert len(fired) == 1
        guest_at, host_at = fired[0]
        assert guest_at - t0_guest == 10**9
        assert host_at - t0_host >= 1.0        # the peer had its second
    finally:
        m.close()
