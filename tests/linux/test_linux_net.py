"""The network from inside Debian's Linux: `pyhv run --net ...` end to end, with QEMU TCG
and the same passt back end as the reference.

- `--net user`: the guest's /init gets a lease from passt (udhcpc), fetches a page and a
  1 MiB file from an HTTP server on the host's 127.0.0.1 (through passt's gateway
  mapping) and sends 512 KiB back with nc; the lease's MTU (65520) is applied, so the
  TCP segments in both directions are up to 64 KiB frames;
- the same command on QEMU TCG (`-device virtio-net-pci -netdev stream` to passt) prints
  the same results.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from pyhv import images
from pyhv.exitmarker import ExitMarker
from pyhv.net.passt import passt_path

BOOT_TIMEOUT = 120
ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")     # SeaBIOS clears the screen
BIG = bytes((i * 2654435761 >> 13) & 0xFF for i in range(1 << 20))
pytestmark = pytest.mark.skipif(passt_path() is None,
                                reason="--net user needs passt (Debian package passt)")


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = b"hello from the host\n" if self.path == "/" else BIG
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_port() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


class Uploads:
    """A TCP server on the host's 127.0.0.1: each connection's bytes, read to EOF."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.got: list[bytes] = []
        self.t = threading.Thread(target=self._serve, daemon=True)
        self.t.start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                c.settimeout(60)
                data = bytearray()
                try:
                    while chunk := c.recv(1 << 20):
                        data += chunk
                except OSError:
                    pass
                self.got.append(bytes(data))


@pytest.fixture(scope="module")
def uploads() -> Iterator[Uploads]:
    u = Uploads()
    yield u
    u.sock.close()


def _gateway() -> str:
    """passt's gateway for the guest: the host's default route."""
    out = subprocess.run(["ip", "-4", "route", "show", "default"], capture_output=True,
                         text=True, timeout=10).stdout.split()
    return out[out.index("via") + 1] if "via" in out else ""


def guest_command(port: int, upload_port: int) -> str:
    gw = _gateway()
    url = f"http://{gw}:{port}"
    return (f"ip -4 -o addr show eth0 | grep -q 'inet ' && echo LEASE; "
            f"wget -q -O - {url}/; "
            f"wget -q -O - {url}/big | md5sum; "
            f"dd if=/dev/urandom of=/tmp/up bs=1024 count=512 2>/dev/null; md5sum < /tmp/up; "
            f"nc -w 2 {gw} {upload_port} < /tmp/up; "
            "echo mtu $(cat /sys/class/net/eth0/mtu)")


def check_output(out: str, uploads: Uploads) -> None:
    lines = [ANSI.sub("", ln).strip() for ln in out.replace("\r", "").splitlines()]
    assert any(ln.endswith("LEASE") for ln in lines), out
    assert "hello from the host" in lines, out
    assert f"{hashlib.md5(BIG).hexdigest()}  -" in lines, out
    sums = [ln.split()[0] for ln in lines if ln.endswith("  -")]
    up = sums[1]
    assert [hashlib.md5(u).hexdigest() for u in uploads.got[-1:]] == [up], out
    assert len(uploads.got[-1]) == 512 * 1024
    assert "mtu 65520" in lines, out           # the lease's MTU: frames up to 65534 bytes


@pytest.mark.timeout(BOOT_TIMEOUT + 60)
def test_net_user_dhcp_http(debian_image: images.LinuxImage, http_port: int,
                            uploads: Uploads) -> None:
    r = subprocess.run([sys.executable, "-m", "pyhv", "run", "--engine", "emu", "--timeout",
                        str(BOOT_TIMEOUT), "--net", "user", "--mac", "52:54:00:12:34:56",
                        "--command", guest_command(http_port, uploads.port)],
                       stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=BOOT_TIMEOUT + 30)
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0, (out, r.stderr.decode()[-3000:])
    check_output(out, uploads)


@pytest.mark.slow
@pytest.mark.qemu
@pytest.mark.timeout(BOOT_TIMEOUT + 60)
def test_net_user_reference_on_qemu(debian_image: images.LinuxImage, http_port: int,
                                    uploads: Uploads) -> None:
    """The same guest command on QEMU TCG with virtio-net-pci on the same passt (passt
    and QEMU on the two ends of a socketpair, as pyhv connects passt)."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("needs qemu-system-x86_64")
    ours, theirs = socket.socketpair()
    passt = subprocess.Popen([passt_path() or "passt", "-f", "-q", "-1", "--fd",
                              str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    theirs.close()
    try:
        marker = ExitMarker.fresh()
        img = debian_image
        r = subprocess.run(
            [qemu, "-accel", "tcg", "-M", "pc", "-m", "256", "-nographic", "-no-reboot",
             "-monitor", "none", "-serial", "stdio", "-nic", "none",
             "-kernel", str(img.kernel_path), "-initrd", str(img.initrd_path), "-append",
             f"{img.cmdline_default} quiet pyhv.net=dhcp "
             + images.command_param(guest_command(http_port, uploads.port), marker),
             "-netdev", f"stream,id=n0,server=off,addr.type=fd,addr.str={ours.fileno()}",
             "-device", "virtio-net-pci,netdev=n0,romfile=,mac=52:54:00:12:34:56"],
            pass_fds=(ours.fileno(),), stdin=subprocess.DEVNULL, capture_output=True,
            timeout=BOOT_TIMEOUT)
        out = r.stdout.decode(errors="replace")
        assert marker.parse(r.stdout) == 0, out[-3000:]
        check_output(out, uploads)
    finally:
        ours.close()
        passt.terminate()
        passt.wait(10)


@pytest.mark.slow
@pytest.mark.timeout(BOOT_TIMEOUT + 60)
def test_net_tap(debian_image: images.LinuxImage, uploads: Uploads) -> None:
    """`--net tap=NAME` on a persistent tap with a host address (root only): the guest
    pings the host and sends it 512 KiB with nc on the tap's private subnet."""
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("a tap with a host address needs root and /dev/net/tun")
    name = f"pyhvn{os.getpid() % 100000}"
    sh = ["ip", "tuntap", "add", name, "mode", "tap"]
    subprocess.run(sh, check=True, timeout=10)
    try:
        for cmd in (["ip", "addr", "add", "10.211.0.1/24", "dev", name],
                    ["ip", "link", "set", name, "up"]):
            subprocess.run(cmd, check=True, timeout=10)
        sink = socket.create_server(("10.211.0.1", 0))
        port = sink.getsockname()[1]
        got: list[bytes] = []

        def serve() -> None:
            c, _ = sink.accept()
            with c:
                data = bytearray()
                while chunk := c.recv(1 << 20):
                    data += chunk
                got.append(bytes(data))
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        cmd = ("ip link set eth0 up && ip addr add 10.211.0.2/24 dev eth0; "
               "for i in $(seq 30); do ping -c 1 -W 1 10.211.0.1 >/dev/null && break; done; "
               "ping -c 1 -W 2 10.211.0.1 | grep -c 'bytes from'; "
               "dd if=/dev/urandom of=/tmp/up bs=1024 count=512 2>/dev/null; md5sum < /tmp/up; "
               f"nc -w 2 10.211.0.1 {port} < /tmp/up")
        r = subprocess.run([sys.executable, "-m", "pyhv", "run", "--engine", "emu",
                            "--timeout", str(BOOT_TIMEOUT), "--net", f"tap={name}",
                            "--command", cmd], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=BOOT_TIMEOUT + 30)
        out = r.stdout.decode(errors="replace")
        assert r.returncode == 0, (out, r.stderr.decode()[-2000:])
        t.join(10)
        sink.close()
        lines = [ln.strip() for ln in out.replace("\r", "").splitlines()]
        assert "1" in lines, out
        assert got and f"{hashlib.md5(got[0]).hexdigest()}  -" in lines, out
        assert len(got[0]) == 512 * 1024
    finally:
        subprocess.run(["ip", "tuntap", "del", name, "mode", "tap"], timeout=10)
