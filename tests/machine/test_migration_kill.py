"""Process-level faults of a live migration between two `pyhv run` processes.

- The destination is killed (SIGKILL) mid-way through round 1: `pyhv migrate` fails
  with the reason, the source VM keeps running and its count goes on with no gap.
- The source is killed (SIGKILL) right after the switch-over: the destination runs on,
  and the source's output followed by the destination's is one unbroken count.
- A stream from an incompatible pyhv (another CPU model, another release, a newer stream
  version; forged by this test with pyhv.migration's own framing) is refused at its
  header: the forger gets the reason, the destination exits 2 having run nothing.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
from guestbuild import GuestBuilder, engine_unavailable
from migrationkit import PYHV, PyhvProc, assert_counts_on, destination, source

from pyhv.machine import Machine, MachineConfig
from pyhv.migration import header
from pyhv.migration.stream import HELLO, REPLY, Channel
from pyhv.vmclient import call

pytestmark = pytest.mark.skipif(engine_unavailable("emu") is not None,
                                reason=f"{engine_unavailable('emu')}")


def machine_args(guests: GuestBuilder) -> list[str]:
    return ["--kernel", str(guests("counter")), "--mem", "16M", "--engine", "emu"]


def wait_status(sock: Path, want: str, timeout: float = 60.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        p = call(sock, "GET", "/migrate")
        if p["status"] == want or (want == "sending" and int(p.get("round_sent") or 0) > 0):
            return p
        assert p["status"] not in ("failed", "cancelled", "completed"), p
        assert time.monotonic() < deadline, p
        time.sleep(0.01)


def test_killing_the_destination_mid_way_leaves_the_source_counting(
        guests: GuestBuilder, tmp_path: Path) -> None:
    args = machine_args(guests)
    dst, uri = destination(args)
    sock = tmp_path / "src.sock"
    src = source(args, sock)
    try:
        src.wait_out(b"count 3\n")
        # 20 KB/s: round 1 (about 72 KB) takes seconds, time enough to kill mid-way
        mig = subprocess.Popen([*PYHV, "migrate", str(sock), uri, "--bandwidth", "0.02"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_status(sock, "sending")
        dst.kill()
        _, err = mig.communicate(timeout=60)
        assert mig.returncode == 2, err
        assert "keeps running on the source" in err
        p = call(sock, "GET", "/migrate")
        assert p["status"] == "failed" and p["error"]
        assert call(sock, "GET", "/state")["state"] == "running"
        n = assert_counts_on(bytes(src.out))
        src.wait_out(b"count %d\n" % (n + 3))
        assert_counts_on(bytes(src.out))
        assert not dst.out
    finally:
        src.kill()
        dst.kill()


def test_killing_the_source_after_the_switch_over_leaves_the_destination_running(
        guests: GuestBuilder, tmp_path: Path) -> None:
    args = machine_args(guests)
    dst, uri = destination(args)
    procs: list[PyhvProc] = [dst]
    try:
        sock = tmp_path / "src.sock"
        src = source(args, sock)
        procs.append(src)
        src.wait_out(b"count 3\n")
        call(sock, "PUT", "/migrate", {"uri": uri})
        dst.wait_err(rb"the VM runs here now")
        src.kill()                                   # SIGKILL, right after the switch
        before = bytes(src.out)
        n = assert_counts_on(before)
        dst.wait_out(b"count %d\n" % (n + 5))
        assert dst.p.poll() is None                  # it runs on
        dst.end()
        assert assert_counts_on(before + bytes(dst.out)) >= n + 5
    finally:
        for p in procs:
            p.kill()


@pytest.mark.parametrize("change, words", [
    ({"cpu": "Imaginary CPU @ 9 GHz"}, "CPU model"),
    pytest.param({"pyhv": "7.3.0"}, "same release", marks=pytest.mark.slow),
    pytest.param({"stream": header.STREAM_VERSION + 1}, "stream version",
                 marks=pytest.mark.slow),
])
def test_a_stream_from_an_incompatible_pyhv_is_refused_at_its_header(
        guests: GuestBuilder, change: dict[str, object], words: str) -> None:
    args = machine_args(guests)
    m = Machine(MachineConfig(kernel=Path(guests("counter")), engine="emu",
                              mem_size=16 << 20), lambda _b: None)
    try:
        hello = {**header.describe(m), **change}
    finally:
        m.close()
    dst, uri = destination(args)
    try:
        host, port = uri[len("tcp:"):].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as s:
            ch = Channel(s, "the test")
            ch.send_json(HELLO, hello)
            _, reply = ch.recv_json((REPLY,))
        assert reply["ok"] is False and words in reply["error"], reply
        assert dst.wait_exit() == 2
        assert b"refused at the header" in dst.err and words.encode() in dst.err
        assert b"nothing ran" in dst.err and not dst.out
    finally:
        dst.kill()
