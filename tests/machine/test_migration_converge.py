"""Live migration of a guest that dirties RAM faster than the link carries it
(tests/guests/core/dirtier.S: 256 pages rewritten per sweep, a "count N" line per sweep),
over a link held to 4 MB/s by `--bandwidth`.

With auto-converge (the default) the source throttles the guest's vCPU once a round
shows the guest dirtying more than half of what the link carried: the report's rounds
show the throttle rising. Without it (`--no-auto-converge`) no round is throttled. In
both, the migration switches over at the latest after `--max-rounds` and the count goes
on on the destination with no gap and no repeat. (Nothing here asserts on timings: the
rounds' durations and rates are the host's business; the throttle decision only needs
the guest to rewrite its 256 pages faster than every 2 s, which it does by orders of
magnitude.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from guestbuild import GuestBuilder, engine_unavailable
from migrationkit import PyhvProc, assert_counts_on, destination, migrate, source

pytestmark = pytest.mark.skipif(engine_unavailable("emu") is not None,
                                reason=f"{engine_unavailable('emu')}")


def move(guests: GuestBuilder, tmp_path: Path, *extra: str) -> dict[str, object]:
    args = ["--kernel", str(guests("dirtier")), "--mem", "16M", "--engine", "emu"]
    dst, uri = destination(args)
    procs: list[PyhvProc] = [dst]
    try:
        sock = tmp_path / "src.sock"
        src = source(args, sock)
        procs.append(src)
        src.wait_out(b"count 3\n")
        r = migrate(sock, uri, "--json", "--bandwidth", "4", "--max-rounds", "4", *extra)
        assert r.returncode == 0, r.stderr
        report: dict[str, object] = json.loads(r.stdout)
        assert src.wait_exit() == 0
        before = bytes(src.out)
        n = assert_counts_on(before)
        dst.wait_out(b"count %d\n" % (n + 3))
        dst.end()
        assert assert_counts_on(before + bytes(dst.out)) >= n + 3
        return report
    finally:
        for p in procs:
            p.kill()


def test_auto_converge_throttles_a_guest_that_outruns_the_link(
        guests: GuestBuilder, tmp_path: Path) -> None:
    report = move(guests, tmp_path)
    history = report["history"]
    assert isinstance(history, list) and len(history) == report["rounds"] == 5
    throttles = [h["throttle"] for h in history[:-1]]
    assert throttles[0] == 0.0                     # round 1 runs free
    assert all(t > 0 for t in throttles[1:]), throttles
    assert throttles[1:] == sorted(throttles[1:])  # it only rises
    assert all(h["dirty_rate_pps"] > 0 for h in history[:-1])


@pytest.mark.slow
def test_without_auto_converge_no_round_is_throttled(guests: GuestBuilder,
                                                     tmp_path: Path) -> None:
    report = move(guests, tmp_path, "--no-auto-converge")
    history = report["history"]
    assert isinstance(history, list) and len(history) == 5
    assert all(h["throttle"] == 0.0 for h in history)
