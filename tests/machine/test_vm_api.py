"""The control API of a running VM (pyhv.vmapi) and virsh's verbs on it (pyhv.cmd_vm).

A counting guest (tests/guests/core/counter.S) runs on emu under `pyhv run --name` with
its run directory in a temporary folder. Pause is proved by the guest's own progress,
not by timing: the engine's executed-block counter, the virtual guest clock (which only
executed guest code advances) and the guest's port accesses are unchanged across reads
while paused, and after resume the count goes on from where it stopped, with no gap.
Shutdown presses the ACPI power button: the guest's OSPM loop sees PWRBTN_STS and powers
off through S5 (status 0). Bad requests get JSON 4xx answers, never a traceback.

Every subprocess has a timeout; waits are bounded loops on an observable condition.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from guestbuild import GuestBuilder, engine_unavailable

pytestmark = pytest.mark.skipif(engine_unavailable("emu") is not None,
                                reason=str(engine_unavailable("emu")))

GUEST_TIMEOUT_S = 120
WAIT_S = 30.0


def wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def pyhv(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyhv", *args], capture_output=True,
                          text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)


def request(sock: Path, raw: bytes) -> tuple[int, dict[str, str], Any]:
    """Send raw HTTP bytes; (status, headers, decoded JSON body)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(str(sock))
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    assert headers["content-type"] == "application/json", data
    return status, headers, json.loads(body)


def api(sock: Path, method: str, path: str, body: object = None) -> tuple[int, Any]:
    data = b"" if body is None else json.dumps(body).encode()
    raw = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
           f"Connection: close\r\n\r\n").encode() + data
    status, _, obj = request(sock, raw)
    return status, obj


@dataclass
class Vm:
    name: str
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    sock: Path
    env: dict[str, str]

    def counts(self) -> list[int]:
        return [int(n) for n in re.findall(rb"count (\d+)\n", self.out.read_bytes())]

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    run_dir = tmp_path / "run"
    return {**os.environ, "PYHV_RUN_DIR": str(run_dir)}


@pytest.fixture
def start(guests: GuestBuilder, env: dict[str, str], tmp_path: Path
          ) -> Iterator[Callable[..., Vm]]:
    vms: list[Vm] = []

    def _start(name: str, *extra: str, engine: str = "emu") -> Vm:
        out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with out.open("wb") as o, err.open("wb") as e:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pyhv", "run", "--kernel", str(guests("counter")),
                 "--engine", engine, "--name", name, "--timeout", str(GUEST_TIMEOUT_S),
                 *extra],
                stdout=o, stderr=e, stdin=subprocess.DEVNULL, env=env)
        vm = Vm(name, proc, out, err, Path(env["PYHV_RUN_DIR"]) / f"{name}.sock", env)
        vms.append(vm)
        wait_for(lambda: vm.sock.exists() and len(vm.counts()) > 2 or
                 proc.poll() is not None, f"{name}'s socket and first counts")
        assert proc.poll() is None, err.read_text()
        return vm

    yield _start
    for vm in vms:
        if vm.proc.poll() is None:
            vm.proc.kill()
            vm.proc.wait(timeout=10)


def engine_progress(stats: dict[str, Any]) -> tuple[object, ...]:
    return (stats["engine"]["blocks executed"], stats["guest_clock_ns"],
            stats["io_ports"], stats["exits_total"])


def test_list_info_suspend_resume_shutdown(start: Callable[..., Vm]) -> None:
    vm = start("counter1")
    env = vm.env
    assert stat.S_IMODE(vm.sock.stat().st_mode) == 0o600

    r = pyhv("list", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"name": "counter1", "state": "running", "engine": "emu",
                                     "pid": vm.proc.pid, "cpus": 1, "memory_mib": 128}]
    r = pyhv("list", env=env)
    assert re.search(rf"counter1\s+running\s+emu\s+{vm.proc.pid}", r.stdout), r.stdout
    r = pyhv("info", "counter1", "--json", env=env)
    info = json.loads(r.stdout)
    assert info["name"] == "counter1" and info["state"] == "running"
    assert info["engine"] == "emu" and info["cpus"] == 1 and info["pid"] == vm.proc.pid
    assert info["memory_bytes"] == 128 << 20 and "serial16550" in info["devices"]
    assert info["acpi_power_button"] is True
    # a socket path names the VM too
    assert json.loads(pyhv("info", str(vm.sock), "--json", env=env).stdout)["pid"] == \
        vm.proc.pid

    # running: the guest's counters move
    _, s1 = api(vm.sock, "GET", "/stats")
    wait_for(lambda: engine_progress(api(vm.sock, "GET", "/stats")[1]) !=
             engine_progress(s1), "the running guest's counters to move")

    r = pyhv("suspend", "counter1", env=env)
    assert r.returncode == 0 and "suspended" in r.stdout, r.stderr
    assert api(vm.sock, "GET", "/state") == (200, {"state": "paused"})
    _, p1 = api(vm.sock, "GET", "/stats")
    at_pause = vm.counts()
    time.sleep(0.5)               # gives a (wrongly) running guest time to move; no timing asserted
    _, p2 = api(vm.sock, "GET", "/stats")
    assert p1["state"] == p2["state"] == "paused"
    assert engine_progress(p1) == engine_progress(p2)
    assert vm.counts() == at_pause
    # shutdown is refused while paused (the guest could not act on the button)
    r = pyhv("shutdown", "counter1", env=env)
    assert r.returncode == 2 and "paused" in r.stderr and "Traceback" not in r.stderr

    r = pyhv("resume", "counter1", env=env)
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr
    last = at_pause[-1]
    wait_for(lambda: len(vm.counts()) > len(at_pause) + 5, "the count to go on")
    counts = vm.counts()
    assert counts == list(range(1, len(counts) + 1))      # from where it was, no gap
    assert counts[len(at_pause) - 1] == last

    r = pyhv("shutdown", "counter1", env=env)
    assert r.returncode == 0 and "power button pressed" in r.stdout, r.stderr
    assert vm.finish() == 0, vm.err.read_text()
    assert vm.out.read_bytes().endswith(b"power button\n")
    assert not vm.sock.exists()
    r = pyhv("list", "--json", env=env)
    assert json.loads(r.stdout) == []
    r = pyhv("info", "counter1", env=env)
    assert r.returncode == 2 and r.stderr.startswith("pyhv: no VM named 'counter1'")


def test_destroy_name_in_use_and_stale(start: Callable[..., Vm], guests: GuestBuilder,
                                       env: dict[str, str]) -> None:
    run_dir = Path(env["PYHV_RUN_DIR"])
    # a stale socket and lock left by a VM that died are cleaned up by the next one
    run_dir.mkdir(mode=0o700)
    (run_dir / "vm2.sock").write_bytes(b"")
    (run_dir / "vm2.lock").write_text("999999\n")
    r = pyhv("info", "vm2", env=env)
    assert r.returncode == 2 and "has died" in r.stderr, r.stderr
    vm = start("vm2")

    # the name is taken while it runs
    r = pyhv("run", "--kernel", str(guests("counter")), "--engine", "emu", "--name", "vm2",
             "--timeout", "20", env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (f"pyhv: a VM named 'vm2' is already running (pid "
                                f"{vm.proc.pid}); choose another --name")

    # destroy while paused: the run ends at once
    assert pyhv("suspend", "vm2", env=env).returncode == 0
    r = pyhv("destroy", "vm2", env=env)
    assert r.returncode == 0 and "destroyed" in r.stdout, r.stderr
    assert vm.finish() == 0
    assert "stopped through the control API" in vm.err.read_text()
    assert not any(run_dir.iterdir())
    r = pyhv("suspend", "vm2", env=env)
    assert r.returncode == 2 and "no VM named 'vm2'" in r.stderr


def test_bad_requests(start: Callable[..., Vm], env: dict[str, str]) -> None:
    vm = start("vm3")
    sock = vm.sock
    assert api(sock, "GET", "/nowhere")[0] == 404
    status, headers, obj = request(sock, b"DELETE /state HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405 and headers["allow"] == "GET, PUT" and "fault_message" in obj
    assert api(sock, "POST", "/machine")[0] == 405
    for body in (b"{", b"[1]", b'"paused"', b"\xff\xfe"):
        raw = (b"PUT /state HTTP/1.1\r\nContent-Length: " + str(len(body)).encode() +
               b"\r\n\r\n" + body)
        status, _, obj = request(sock, raw)
        assert status == 400 and obj["fault_message"], (body, obj)
    status, obj = api(sock, "PUT", "/state", {"state": "frozen"})
    assert status == 400 and "paused, running" in obj["fault_message"]
    assert api(sock, "PUT", "/state", {"state": "paused", "extra": 1})[0] == 400
    assert api(sock, "PUT", "/state", {"state": 3})[0] == 400
    assert api(sock, "PUT", "/actions", {"action": "explode"})[0] == 400
    assert api(sock, "PUT", "/actions")[0] == 400
    assert request(sock, b"PUT /state HTTP/1.1\r\n\r\n")[0] == 411
    assert request(sock, b"PUT /state HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n")[0] \
        == 413
    assert request(sock, b"garbage\r\n\r\n")[0] == 400
    assert request(sock, b"BREW /state HTTP/1.1\r\n\r\n")[0] == 501
    # the VM still runs after all that, and answers
    assert api(sock, "GET", "/machine")[1]["state"] == "running"
    r = pyhv("suspend", "no-such-vm", env=env)
    assert r.returncode == 2 and r.stderr.startswith("pyhv: no VM named 'no-such-vm'")
    r = pyhv("resume", "../x", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert api(sock, "PUT", "/actions", {"action": "stop"}) == \
        (200, {"action": "stop", "result": "stopping"})
    assert vm.finish() == 0


@pytest.mark.parametrize("engine, cpus", [
    pytest.param("emu", "2", id="emu-2cpus"),
    *(pytest.param("kvm", n, id=f"kvm-{n}cpus", marks=[
        pytest.mark.kvm, pytest.mark.skipif(engine_unavailable("kvm") is not None,
                                            reason=str(engine_unavailable("kvm")))])
      for n in ("1", "2")),
])
def test_pause_resume_other_run_loops(start: Callable[..., Vm], engine: str,
                                      cpus: str) -> None:
    """The round-robin loop (several vCPUs on emu), the kvm loop and kvm's threaded loop
    (several vCPUs, one thread each; the APs here wait for a SIPI) park too: the exits
    and port accesses the guest causes stop while paused, and the count goes on."""
    vm = start("loop", "--cpus", cpus, engine=engine)

    def progress() -> tuple[object, ...]:
        st = api(vm.sock, "GET", "/stats")[1]
        return st["exits_total"], st["io_ports"]
    p0 = progress()
    wait_for(lambda: progress() != p0, "the running guest's port accesses to move")
    assert api(vm.sock, "PUT", "/state", {"state": "paused"}) == (200, {"state": "paused"})
    p1, at_pause = progress(), vm.counts()
    time.sleep(0.5)               # gives a (wrongly) running guest time to move; no timing asserted
    assert progress() == p1 and vm.counts() == at_pause
    assert api(vm.sock, "PUT", "/state", {"state": "running"}) == (200, {"state": "running"})
    wait_for(lambda: len(vm.counts()) > len(at_pause) + 2, "the count to go on")
    counts = vm.counts()
    assert counts == list(range(1, len(counts) + 1))
    assert api(vm.sock, "PUT", "/actions", {"action": "shutdown"})[0] == 200
    assert vm.finish() == 0, vm.err.read_text()
    assert vm.out.read_bytes().endswith(b"power button\n")
