"""Live migration between two `pyhv run` processes on localhost (pyhv.migration).

A counting guest (tests/guests/core/counter.S: "count N" lines) runs in a source pyhv
with a control socket; a destination pyhv waits with `--incoming tcp:127.0.0.1:0`;
`pyhv migrate` moves the VM. The source's output up to the switch-over followed by the
destination's output must be one unbroken count: no gap, no repeat. The source ends
with status 0 ("migrated") only after the destination runs; the report has the
downtime, bytes and rounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from guestbuild import GuestBuilder, engine_unavailable
from migrationkit import PyhvProc, assert_counts_on, destination, migrate, source

from pyhv.vmclient import VmError, call

ENGINES = [pytest.param(e, marks=pytest.mark.skipif(engine_unavailable(e) is not None,
                                                    reason=f"{engine_unavailable(e)}"))
           for e in ("emu", "kvm")]


def machine_args(guests: GuestBuilder, engine: str, guest: str = "counter") -> list[str]:
    return ["--kernel", str(guests(guest)), "--mem", "16M", "--engine", engine]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_counting_guest_moves_to_another_pyhv_with_no_gap(
        guests: GuestBuilder, tmp_path: Path, engine: str) -> None:
    args = machine_args(guests, engine)
    dst, uri = destination(args)
    procs: list[PyhvProc] = [dst]
    try:
        sock = tmp_path / "src.sock"
        src = source(args, sock)
        procs.append(src)
        src.wait_out(b"count 20\n")
        r = migrate(sock, uri, "--json")
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["status"] == "completed"
        assert report["rounds"] >= 2 and report["bytes"] > 0
        assert report["downtime_ms"] is not None
        assert 0 < report["downtime_ms"] < report["total_s"] * 1000
        assert report["zero_pages"] > 0          # most of a 16 MiB guest is untouched
        # where the downtime went, mark to mark on one clock: pause to first instruction
        parts = report["switchover_ms"]
        assert list(parts) == ["park", "scan", "pages", "capture", "state_transfer",
                               "apply", "start"]
        assert all(v >= 0 for v in parts.values())
        assert abs(sum(parts.values()) - report["downtime_ms"]) < 0.01 * len(parts)
        assert src.wait_exit() == 0
        assert b"migrated to " + uri.encode() in src.err
        before = bytes(src.out)
        n = assert_counts_on(before)
        dst.wait_out(b"count %d\n" % (n + 20))
        dst.end()
        after = bytes(dst.out)
        assert after and not after.startswith(b"count 1\n")
        assert b"the VM runs here now" in dst.err
        assert assert_counts_on(before + after) >= n + 20
    finally:
        for p in procs:
            p.kill()


def test_the_destination_refuses_another_machine_shape_and_the_source_runs_on(
        guests: GuestBuilder, tmp_path: Path) -> None:
    """A destination started with other machine options (32M against 16M) refuses at the
    header; the source keeps counting with no gap and can migrate later."""
    if engine_unavailable("emu"):
        pytest.skip(f"{engine_unavailable('emu')}")
    args = machine_args(guests, "emu")
    bad = [*args[:-4], "--mem", "32M", "--engine", "emu"]
    dst, uri = destination(bad)
    sock = tmp_path / "src.sock"
    src = source(args, sock)
    try:
        src.wait_out(b"count 5\n")
        for body, words in (({"uri": "udp:x:1"}, "tcp:HOST:PORT"),
                            ({"uri": uri, "max_downtime_ms": -1}, "max_downtime_ms"),
                            ({"uri": uri, "colour": 1}, "unknown field")):
            with pytest.raises(VmError, match=words):
                call(sock, "PUT", "/migrate", body)
        assert call(sock, "GET", "/migrate") == {"status": "none"}
        r = migrate(sock, uri)
        assert r.returncode == 2
        assert "refused" in r.stderr and "RAM" in r.stderr, r.stderr
        assert "keeps running on the source" in r.stderr
        assert dst.wait_exit() == 2
        assert b"nothing ran" in dst.err and not dst.out
        n = assert_counts_on(bytes(src.out))
        src.wait_out(b"count %d\n" % (n + 5))
        assert_counts_on(bytes(src.out))
    finally:
        src.kill()
        dst.kill()
