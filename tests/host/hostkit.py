"""The host daemon's test kit: a real `pyhv host serve` in a subprocess (`Daemon`), raw
HTTP to it over its UNIX socket or TCP, the `pyhv vm` CLI, and bounded waits.

A Daemon runs in its own session; `reap()` kills its process group and the process group
of every VM that still holds a lock in its state directory (SIGKILL), so nothing
outlives a test. Every wait is a bounded loop on an observable condition; every
subprocess has a timeout.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyhv import rundir

WAIT_S = 60.0


def wait_for(cond: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


class _Unix(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=90)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(90)
        self.sock.connect(self.unix_path)


class Daemon:
    def __init__(self, state: Path, *extra: str) -> None:
        self.state = state
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        env = {k: v for k, v in os.environ.items() if k != "PYHV_STATE_DIR"}
        self.err = self.state.parent / "daemon.err"
        with self.err.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pyhv", "host", "serve", "--state-dir",
                 str(self.state), "--listen", "127.0.0.1:0", *self.extra],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env,
                start_new_session=True)
        proc = self.proc
        wait_for(lambda: (self.state / "daemon.json").exists() or proc.poll() is not None,
                 "the daemon to start")
        assert proc.poll() is None, self.err.read_text()
        info = json.loads((self.state / "daemon.json").read_text())
        self.tcp = info["listen"]
        self.token = (self.state / "token").read_text().strip()
        return self

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; the VMs stay."""
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout=30)

    def request(self, method: str, path: str, body: object = None, *,
                token: str | None = "default", raw: bytes | None = None,
                tcp: bool = False, headers: dict[str, str] | None = None
                ) -> tuple[int, Any]:
        if tcp:
            host, port = self.tcp.rsplit(":", 1)
            conn: http.client.HTTPConnection = http.client.HTTPConnection(
                host, int(port), timeout=90)
        else:
            conn = _Unix(str(self.state / "api.sock"))
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {self.token if token == 'default' else token}"
        data = raw if raw is not None else (None if body is None
                                            else json.dumps(body).encode())
        if data is not None:
            h.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=data, headers=h)
            resp = conn.getresponse()
            text = resp.read()
        finally:
            conn.close()
        return resp.status, (json.loads(text) if text else None)

    def ok(self, method: str, path: str, body: object = None) -> Any:
        status, obj = self.request(method, path, body)
        assert 200 <= status < 300, (status, obj)
        return obj

    def cli(self, *args: str, stdin: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        verb, *rest = args
        return subprocess.run([sys.executable, "-m", "pyhv", "vm", verb, "--state-dir",
                               str(self.state), *rest], capture_output=True, text=True,
                              timeout=120, input=stdin)

    def vm(self, name: str) -> dict[str, Any]:
        vm: dict[str, Any] = self.ok("GET", f"/v1/vms/{name}")
        return vm

    def events(self, name: str) -> list[dict[str, Any]]:
        ev: list[dict[str, Any]] = self.ok("GET", f"/v1/events?vm={name}")["events"]
        return ev

    def wait_state(self, name: str, *states: str) -> dict[str, Any]:
        vm: dict[str, Any] = wait_for(
            lambda: (v := self.vm(name))["state"] in states and v, f"{name} in {states}")
        return vm

    def vm_pids(self) -> list[int]:
        out = []
        for lock in (self.state / "vms").glob("*.lock"):
            pid = rundir.holder(lock)
            if pid:
                out.append(pid)
        return out

    def reap(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        for pid in self.vm_pids():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        wait_for(lambda: not self.vm_pids(), "the VMs to die", timeout=30)
        # a daemon killed mid-test cannot remove its VMs' cgroups: do it (they are empty)
        from pyhv.hostd.cpu import CpuPlacer
        placer = CpuPlacer(self.state.absolute())
        for name in [p.stem for p in (self.state / "vms").glob("*.lock")] + \
                [g.name for g in self._groups(placer)]:
            with contextlib.suppress(Exception):
                placer.remove(name)

    @staticmethod
    def _groups(placer: Any) -> list[Path]:
        if placer.fs is None:
            return []
        parent = placer.fs.cpu_base / placer.parent
        return [g for g in parent.iterdir() if g.is_dir()] if parent.is_dir() else []


