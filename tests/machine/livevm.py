"""A machine running on a thread of the test process, for tests that pause it, capture
its state and continue it elsewhere (tests/machine/test_vmstate_guest.py).

`LiveVm(config)` builds the machine (its serial output collected in `out`); `start()`
runs it on a thread under a guest timeout; `wait_for(b"...")` waits for output;
`pause()` parks it (raising if it does not park in time); `stop()` ends the run and
joins the thread. Every wait has a deadline, so no test can hang on a guest."""

from __future__ import annotations

import threading
import time

from pyhv.machine import Machine, MachineConfig, StopRequest
from pyhv.runner import Runner, RunResult

GUEST_TIMEOUT_S = 60.0


class LiveVm:
    def __init__(self, config: MachineConfig) -> None:
        self.out = bytearray()
        self._lock = threading.Lock()
        self.machine = Machine(config, self._console)
        self.runner = Runner(self.machine, timeout=GUEST_TIMEOUT_S)
        self.result: RunResult | None = None
        self._thread: threading.Thread | None = None

    def _console(self, data: bytes) -> None:
        with self._lock:
            self.out += data

    def output(self) -> bytes:
        with self._lock:
            return bytes(self.out)

    def start(self) -> LiveVm:
        def run() -> None:
            self.result = self.runner.run()
        self._thread = threading.Thread(target=run, name="test-vm", daemon=True)
        self._thread.start()
        return self

    def wait_for(self, text: bytes, timeout: float = 30.0, since: int = 0) -> None:
        """Wait until `text` appears in the output after byte `since`."""
        deadline = time.monotonic() + timeout
        while text not in self.output()[since:]:
            if self._thread is not None and not self._thread.is_alive():
                raise AssertionError(f"the run ended ({self.result}) before {text!r}; "
                                     f"output {self.output()[-200:]!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout} s; "
                                     f"output {self.output()[-200:]!r}")
            time.sleep(0.01)

    def wait_more(self, n: int, since: int, timeout: float = 30.0) -> None:
        """Wait until the output has n bytes past byte `since`."""
        deadline = time.monotonic() + timeout
        while len(self.output()) < since + n:
            if self._thread is not None and not self._thread.is_alive():
                raise AssertionError(f"the run ended ({self.result}) early")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {n} bytes of output within {timeout} s")
            time.sleep(0.01)

    def pause(self) -> None:
        self.runner.pause()
        if not self.runner.wait_parked(10.0):
            raise AssertionError("the VM did not park within 10 s")

    def stop(self) -> None:
        if self._thread is not None:
            self.runner.stop(StopRequest("user", 0, "test"))
            self._thread.join(timeout=15.0)
            assert not self._thread.is_alive(), "the run did not end within 15 s"
            self._thread = None

    def close(self) -> None:
        self.stop()
        self.machine.close()
