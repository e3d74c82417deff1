"""Two `pyhv run` processes for the live-migration tests (tests/machine/test_migration*.py).

`PyhvProc(args)` starts `python -m pyhv run ARGS` with its stdout and stderr collected by
threads (never a blocking read); `wait_err(regex)` / `wait_out(bytes)` wait with a
deadline; `end()` stops it (SIGTERM, then SIGKILL) and returns its status. `migrate()`
runs `pyhv migrate` under a host timeout. `assert_counts_on` checks a counting guest's
joined output. Every wait has a deadline: no test can hang on a guest or a peer.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PYHV = [sys.executable, "-m", "pyhv"]
GUEST_TIMEOUT_S = 90


def counting(n: int) -> bytes:
    return b"".join(b"count %d\n" % i for i in range(1, n + 1))


def assert_counts_on(text: bytes) -> int:
    """`text` is exactly the counter's output from 1 (it may end mid-line); returns the
    last complete count."""
    last = [int(x) for x in re.findall(rb"count (\d+)\n", text)]
    assert last, text[:200]
    assert text == counting(last[-1] + 1)[:len(text)], \
        f"gap or repeat in the count: ...{text[-160:]!r}"
    return last[-1]


class PyhvProc:
    def __init__(self, args: list[str], prefix: list[str] | None = None) -> None:
        self.p = subprocess.Popen([*(prefix or []), *PYHV, "run", *args,
                                   "--timeout", str(GUEST_TIMEOUT_S)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        self.out = bytearray()
        self.err = bytearray()
        self._threads = [threading.Thread(target=self._pump, args=(s, buf), daemon=True)
                         for s, buf in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream: object, buf: bytearray) -> None:
        import os
        fd = stream.fileno()  # type: ignore[attr-defined]
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            buf += chunk

    def _wait(self, found: object, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not found():  # type: ignore[operator]
            if self.p.poll() is not None:
                time.sleep(0.2)         # let the pumps take the last bytes
                if found():  # type: ignore[operator]
                    return
                raise AssertionError(f"pyhv ended ({self.p.returncode}) before {what}; "
                                     f"stderr {bytes(self.err)[-400:]!r}, "
                                     f"stdout {bytes(self.out)[-200:]!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s; stderr "
                                     f"{bytes(self.err)[-400:]!r}")
            time.sleep(0.02)

    def wait_err(self, pattern: bytes, timeout: float = 60.0) -> re.Match[bytes]:
        hit: list[re.Match[bytes]] = []

        def found() -> bool:
            m = re.search(pattern, bytes(self.err))
            if m:
                hit.append(m)
            return m is not None
        self._wait(found, f"{pattern!r} on stderr", timeout)
        return hit[-1]

    def wait_out(self, text: bytes, timeout: float = 60.0) -> None:
        self._wait(lambda: text in bytes(self.out), f"{text!r} on stdout", timeout)

    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pyhv did not end within {timeout} s; stderr "
                                 f"{bytes(self.err)[-400:]!r}") from None
        for t in self._threads:
            t.join(5.0)
        return rc

    def end(self) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(15.0)
            except subprocess.TimeoutExpired:
                self.p.kill()
        return self.wait_exit()

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.wait_exit()


def destination(args: list[str], listen: str = "tcp:127.0.0.1:0",
                prefix: list[str] | None = None) -> tuple[PyhvProc, str]:
    """A `pyhv run --incoming` process and the address it listens on."""
    dst = PyhvProc([*args, "--incoming", listen], prefix)
    m = dst.wait_err(rb"waiting for a migration on (tcp:\S+)")
    return dst, m.group(1).decode()


def source(args: list[str], sock: Path, prefix: list[str] | None = None) -> PyhvProc:
    src = PyhvProc([*args, "--api-sock", str(sock)], prefix)
    deadline = time.monotonic() + 60
    while not sock.exists():
        if src.p.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no API socket; stderr {bytes(src.err)[-400:]!r}")
        time.sleep(0.02)
    return src


def migrate(sock: Path, uri: str, *extra: str, timeout: float = 120.0
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PYHV, "migrate", str(sock), uri, *extra], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
