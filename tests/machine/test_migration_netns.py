"""Live migration between two "hosts" on one machine: network namespaces joined by a
veth pair (tests/machine/netns.py; docs/migration.md), so the stream crosses a real
network stack: the source pyhv runs in one namespace, the destination listens on the
other's veth address, `pyhv migrate` speaks to the source over its UNIX control socket.

- A bare-metal counting guest: one unbroken count, and the destination's veth received
  at least the stream's bytes (the migration went over it).
- A Linux guest (Debian's kernel with pyhv's initramfs on emu, no disks) whose shell
  counts `count N` every 0.1 s of guest time: the count goes on on the destination with
  no gap and no repeat (so its timers, APIC and clock came across, not only RAM and
  registers). Over the veth pair when root, else (slow) over localhost.

Skipped with the reason when not root or without `ip`."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from guestbuild import GuestBuilder, engine_unavailable
from migrationkit import PyhvProc, assert_counts_on, destination, migrate, source
from netns import NetnsPair, unavailable

from pyhv import images
from pyhv.errors import HostError

EMU = engine_unavailable("emu")
NETNS = unavailable()
LINUX_LOOP = "i=0; while true; do i=$((i+1)); echo count $i; sleep 0.1; done"


@pytest.fixture
def hosts() -> Iterator[NetnsPair]:
    if NETNS is not None:
        pytest.skip(NETNS)
    pair = NetnsPair()
    yield pair
    pair.close()


@pytest.mark.skipif(EMU is not None, reason=f"{EMU}")
def test_a_counting_guest_crosses_the_veth_pair(guests: GuestBuilder, tmp_path: Path,
                                                hosts: NetnsPair) -> None:
    args = ["--kernel", str(guests("counter")), "--mem", "16M", "--engine", "emu"]
    dst, uri = destination(args, f"tcp:{hosts.addr['b']}:0", hosts.exec_prefix("b"))
    procs: list[PyhvProc] = [dst]
    try:
        assert uri.startswith(f"tcp:{hosts.addr['b']}:")
        sock = tmp_path / "src.sock"
        src = source(args, sock, hosts.exec_prefix("a"))
        procs.append(src)
        src.wait_out(b"count 5\n")
        rx0 = hosts.rx_bytes("b")
        r = migrate(sock, uri, "--json")
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert hosts.rx_bytes("b") - rx0 >= report["bytes"]
        assert src.wait_exit() == 0
        before = bytes(src.out)
        n = assert_counts_on(before)
        dst.wait_out(b"count %d\n" % (n + 5))
        dst.end()
        assert assert_counts_on(before + bytes(dst.out)) >= n + 5
    finally:
        for p in procs:
            p.kill()


def linux_counts(text: bytes) -> list[int]:
    return [int(x) for x in re.findall(rb"count (\d+)\r?\n", text)]


@pytest.fixture(scope="module")
def linux_image() -> images.LinuxImage:
    """pyhv's Linux image (as tests/linux/conftest.py fetches it)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("needs Debian's apt-get and dpkg-deb to fetch the guest kernel")
    try:
        return images.fetch_linux(quiet=True)
    except HostError as e:
        pytest.skip(f"cannot fetch Debian's kernel here: {e}")


def migrate_linux(tmp_path: Path, hosts: NetnsPair | None) -> None:
    if EMU is not None:
        pytest.skip(EMU)
    args = ["--engine", "emu", "--mem", "128M"]
    listen = f"tcp:{hosts.addr['b']}:0" if hosts else "tcp:127.0.0.1:0"
    dst, uri = destination(args, listen, hosts.exec_prefix("b") if hosts else None)
    procs: list[PyhvProc] = [dst]
    try:
        sock = tmp_path / "src.sock"
        src = source([*args, "--command", LINUX_LOOP], sock,
                     hosts.exec_prefix("a") if hosts else None)
        procs.append(src)
        src.wait_out(b"count 10\r\n", timeout=120)
        r = migrate(sock, uri, "--json")
        assert r.returncode == 0, r.stderr
        assert src.wait_exit() == 0, bytes(src.err)
        before = bytes(src.out)
        n = linux_counts(before)[-1]
        dst.wait_out(b"count %d\r\n" % (n + 10), timeout=120)
        dst.end()
        counts = linux_counts(before + bytes(dst.out))
        assert counts == list(range(1, len(counts) + 1)), counts
        assert counts[-1] >= n + 10
    finally:
        for p in procs:
            p.kill()


def test_a_linux_guest_counting_crosses_the_veth_pair(
        tmp_path: Path, hosts: NetnsPair, linux_image: images.LinuxImage) -> None:
    migrate_linux(tmp_path, hosts)


@pytest.mark.slow
def test_a_linux_guest_counting_migrates_over_localhost(
        tmp_path: Path, linux_image: images.LinuxImage) -> None:
    migrate_linux(tmp_path, None)
