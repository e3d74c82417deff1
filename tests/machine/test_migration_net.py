"""Live migration of a Linux guest with a virtio-net NIC on passt (`--net user`).

The guest (Debian's kernel, pyhv's initramfs, emu) takes a lease from passt, then loops:
fetch a page from an HTTP server on the host's 127.0.0.1 (through passt's gateway
mapping) under a 3 s `timeout`, print `net-N-ok` or `net-N-fail`, print `count N`. The
destination is started with the same `--net user --mac`: it builds a NIC on a new passt
of its own (the back end is re-created; the NIC's state, a frame it had taken from the
back end but not delivered included, comes in the stream). After the switch-over the
guest's count goes on without a gap and its fetches succeed again through the
destination's passt (a fetch in flight at the switch-over may fail: its TCP connection
lived in the source's passt).

Slow (a Linux boot; the default run has tests/machine/test_migration_disk.py). Every
subprocess has a timeout; waits are bounded (migrationkit).
"""

from __future__ import annotations

import http.server
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from guestbuild import engine_unavailable
from migrationkit import PyhvProc, destination, migrate, source

from pyhv import images
from pyhv.errors import HostError
from pyhv.net.passt import passt_path

pytestmark = pytest.mark.slow
EMU = engine_unavailable("emu")
MAC = "52:54:00:12:34:57"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = b"hello from the host\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def linux_image() -> images.LinuxImage:
    if passt_path() is None:
        pytest.skip("--net user needs passt")
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("needs Debian's apt-get and dpkg-deb to fetch the guest kernel")
    try:
        return images.fetch_linux(quiet=True)
    except HostError as e:
        pytest.skip(f"cannot fetch Debian's kernel here: {e}")


def gateway() -> str:
    out = subprocess.run(["ip", "-4", "route", "show", "default"], capture_output=True,
                         text=True, timeout=10).stdout.split()
    return out[out.index("via") + 1] if "via" in out else ""


def counts(text: bytes) -> list[int]:
    return [int(x) for x in re.findall(rb"count (\d+)\r?\n", text)]


def fetches(text: bytes) -> list[tuple[int, bool]]:
    return [(int(n), r == b"ok") for n, r in re.findall(rb"net-(\d+)-(ok|fail)", text)]


def test_a_linux_guest_with_a_nic_migrates_and_its_network_works_on(
        tmp_path: Path, linux_image: images.LinuxImage, http_port: int) -> None:
    if EMU is not None:
        pytest.skip(EMU)
    gw = gateway()
    if not gw:
        pytest.skip("no default route: passt has no gateway to map")
    loop = (f"i=0; while true; do i=$((i+1)); "
            f"rm -f /tmp/p; if timeout 3 wget -q -O /tmp/p http://{gw}:{http_port}/ "
            "&& grep -q hello /tmp/p; "
            "then echo net-$i-ok; else echo net-$i-fail; fi; echo count $i; sleep 0.1; done")
    args = ["--engine", "emu", "--mem", "128M", "--net", "user", "--mac", MAC]
    dst, uri = destination(args)
    procs: list[PyhvProc] = [dst]
    try:
        sock = tmp_path / "src.sock"
        src = source([*args, "--command", loop], sock)
        procs.append(src)
        src.wait_out(b"count 5\r\n", timeout=120)
        r = migrate(sock, uri, "--json")
        assert r.returncode == 0, r.stderr
        assert src.wait_exit() == 0, bytes(src.err)
        before = bytes(src.out)
        assert all(ok for _, ok in fetches(before)), before[-500:]
        n = counts(before)[-1]
        dst.wait_out(b"count %d\r\n" % (n + 8), timeout=120)
        dst.end()
        after = bytes(dst.out)
        seen = counts(before + after)
        assert seen == list(range(1, len(seen) + 1)), seen
        later = [ok for i, ok in fetches(after) if i > n + 2]
        assert later and all(later), after[-800:]
    finally:
        for p in procs:
            p.kill()
