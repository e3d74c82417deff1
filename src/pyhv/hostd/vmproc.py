"""One VM's process under the host daemon: `pyhv run` in its own session.

`spawn` starts `python -m pyhv run <definition's options> [--pin ...] --name NAME --console-sock
DIR/vms/NAME.console` with PYHV_RUN_DIR=DIR/vms (so the VM's control socket and its
pyhv.rundir lock live in the daemon's state directory), stdin from /dev/null, stdout
(the console output) to NAME.log and stderr (pyhv's own messages) to NAME.err. The
process starts a new session (setsid), so it is its own process group and outlives the
daemon: a daemon restart, or a daemon crash, does not touch the VMs.

Liveness is the kernel's word, never a guess from files: a VM is alive while a process
holds its rundir lock (`holder`), whose pid is the VM's. `probe` asks its control API.

Invariants: every wait here is bounded; `kill_group` never signals a pid the caller did
not get from the VM's own lock or from spawn.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pyhv import rundir
from pyhv.hostd.cpu import pin_args
from pyhv.hostd.models import VmDefinition
from pyhv.hostd.statedir import StateDir
from pyhv.vmclient import VmError, call

PROBE_TIMEOUT_S = 5.0


def argv(state: StateDir, d: VmDefinition, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "pyhv", "run", *d.run_args(), *pin_args(d), "--name", d.name,
            "--console-sock", str(state.vm_path(d.name, "console")), *extra]


def clean_stale(state: StateDir, name: str) -> None:
    """Remove what a dead run of `name` left (its console socket); the caller has made
    sure no process holds the name."""
    with contextlib.suppress(FileNotFoundError):
        state.vm_path(name, "console").unlink()


def spawn(state: StateDir, d: VmDefinition, extra: tuple[str, ...] = ()
          ) -> subprocess.Popen[bytes]:
    """`extra`: more `pyhv run` options (`--incoming tcp:HOST:0` for a migration in).
    The VM's snapshots go to DIR/snapshots/NAME (PYHV_SNAPSHOT_DIR)."""
    env = {**os.environ, "PYHV_RUN_DIR": str(state.vms),
           "PYHV_SNAPSHOT_DIR": str(state.path / "snapshots")}
    with open(state.vm_path(d.name, "log"), "wb") as out, \
            open(state.vm_path(d.name, "err"), "wb") as err:
        return subprocess.Popen(argv(state, d, extra), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err, env=env, start_new_session=True,
                                close_fds=True)


def holder(state: StateDir, name: str) -> int | None:
    """The pid of the live process holding `name`'s lock, or None."""
    return rundir.holder(state.vm_path(name, "lock"))


def probe(state: StateDir, name: str, timeout: float = PROBE_TIMEOUT_S
          ) -> dict[str, Any] | None:
    """The VM's GET /machine, or None when it does not answer."""
    sock = state.vm_path(name, "sock")
    if not sock.exists():
        return None
    try:
        return call(sock, "GET", "/machine", timeout=timeout)
    except VmError:
        return None


def control(state: StateDir, name: str, method: str, path: str,
            body: dict[str, Any] | None = None, timeout: float = 15.0) -> dict[str, Any]:
    """A call to the VM's control API (VmError on failure)."""
    return call(state.vm_path(name, "sock"), method, path, body, timeout=timeout)


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal the VM's process group (its session: pyhv run and anything it started)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def wait_gone(state: StateDir, name: str, proc: subprocess.Popen[bytes] | None,
              timeout: float) -> bool:
    """Wait until the VM's process has ended (reaped when it is our child)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return True
        elif holder(state, name) is None:
            return True
        time.sleep(0.05)
    return False


def err_tail(state: StateDir, name: str, lines: int = 3) -> str:
    """The last lines pyhv printed on the VM's stderr (why a start failed)."""
    try:
        text = state.vm_path(name, "err").read_bytes()[-4096:].decode("utf-8", "replace")
    except OSError:
        return ""
    return " | ".join(ln.strip() for ln in text.strip().splitlines()[-lines:])


def log_tail(path: Path, nbytes: int) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - nbytes))
            return f.read()
    except OSError:
        return b""
