"""Two VMs on one L2 segment over `--net socket`: Debian's Linux in each, static
addresses, 64 KiB frames (MTU 65535, ping -s 65000: one 65042-byte frame each way) and a
TCP transfer with nc. pyhv with pyhv, and pyhv with QEMU TCG in both roles (QEMU's
`-netdev stream` listening for pyhv, pyhv listening for QEMU's `-netdev socket`), and
two pyhv VMs on taps on a host bridge (root only).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyhv import images
from pyhv.exitmarker import ExitMarker
from pyhv.net.spec import format_mac

BOOT_TIMEOUT = 150
MAC_A, MAC_B = bytes.fromhex("525400000a01"), bytes.fromhex("525400000a02")
SIZE_KIB = 256
ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")     # SeaBIOS clears the screen


def _setup(ip: str) -> str:
    return f"ip link set eth0 mtu 65535 up && ip addr add {ip}/24 dev eth0; "


# A: listens until a TCP connection brings data, prints the md5 of what it got. (On a
# loaded host B's nc can give up on a connection A already accepted: A then saw an empty
# one and must listen again rather than end the test.)
CMD_A = (_setup("10.0.0.1") + "for i in $(seq 30); do nc -l -p 5000 > /tmp/got; "
         "[ -s /tmp/got ] && break; done; echo got $(wc -c < /tmp/got) "
         "$(md5sum < /tmp/got)")
# B: waits until A answers, pings it twice with 65000-byte payloads, sends 256 KiB with
# nc. Each ping is its own `ping -c 1 -W 30`: busybox's `ping -c 2` waits for the last
# reply only twice the round trip of the first (1 s at least) once one came back, which
# a loaded host (A's guest descheduled) does not always meet: "pings 1".
CMD_B = (_setup("10.0.0.2")
         + "for i in $(seq 60); do ping -c 1 -W 1 10.0.0.1 >/dev/null 2>&1 && break; done; "
         "echo pings $(for k in 1 2; do ping -c 1 -W 30 -s 65000 10.0.0.1; done "
         "| grep -c 'bytes from'); "
         f"dd if=/dev/urandom of=/tmp/u bs=1024 count={SIZE_KIB} 2>/dev/null; "
         "echo sent $(wc -c < /tmp/u) $(md5sum < /tmp/u); "
         "for i in $(seq 30); do nc -w 30 10.0.0.1 5000 < /tmp/u && break; sleep 1; done")


def pyhv_argv(net: str, mac: bytes, cmd: str) -> list[str]:
    return [sys.executable, "-m", "pyhv", "run", "--engine", "emu", "--timeout",
            str(BOOT_TIMEOUT), "--net", net, "--mac", format_mac(mac), "--command", cmd]


def qemu_argv(img: images.LinuxImage, netdev: str, mac: bytes, cmd: str,
              marker: ExitMarker) -> list[str]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("needs qemu-system-x86_64")
    return [qemu, "-accel", "tcg", "-M", "pc", "-m", "256", "-nographic", "-no-reboot",
            "-monitor", "none", "-serial", "stdio", "-nic", "none",
            "-kernel", str(img.kernel_path), "-initrd", str(img.initrd_path), "-append",
            f"{img.cmdline_default} quiet " + images.command_param(cmd, marker),
            "-netdev", netdev, "-device",
            f"virtio-net-pci,netdev=n0,romfile=,mac={format_mac(mac)}"]


def _start(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _wait(p: subprocess.Popen[bytes]) -> tuple[int, str]:
    try:
        out, err = p.communicate(timeout=BOOT_TIMEOUT + 30)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    return p.returncode, out.decode(errors="replace") + err.decode(errors="replace")[-2000:]


def _wait_for(path: Path) -> None:
    end = time.monotonic() + 30
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


def _wait_listening(port: int) -> None:
    """Until a socket listens on 127.0.0.1:port (read from /proc, no probe connection:
    the listener takes one peer)."""
    end = time.monotonic() + 30
    while True:
        rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
        if any(r.split()[1].endswith(f":{port:04X}") and r.split()[3] == "0A" for r in rows):
            return
        assert time.monotonic() < end, f"nothing listens on port {port}"
        time.sleep(0.05)


def check(out_a: str, out_b: str) -> None:
    print(f"A: {out_a[-200:]!r}\nB: {out_b[-400:]!r}")
    lines_b = [ANSI.sub("", ln).strip() for ln in out_b.replace("\r", "").splitlines()]
    assert any(ln.endswith("pings 2") for ln in lines_b), out_b   # both 65000-byte pings
    # (SeaBIOS may leave QEMU's first line unterminated: hence endswith)
    sent = next(ln.split()[1:3] for ln in lines_b if ln.startswith("sent "))
    assert sent[0] == str(SIZE_KIB * 1024)
    assert f"got {sent[0]} {sent[1]}" in out_a.replace("  -", ""), (out_a, out_b)


@pytest.mark.timeout(BOOT_TIMEOUT * 2 + 60)
def test_two_pyhv_vms_on_a_socket_network(debian_image: images.LinuxImage,
                                          tmp_path: Path) -> None:
    seg = tmp_path / "seg.sock"
    a = _start(pyhv_argv(f"socket=listen:{seg}", MAC_A, CMD_A))
    try:
        _wait_for(seg)
        b = _start(pyhv_argv(f"socket=connect:{seg}", MAC_B, CMD_B))
        rc_b, out_b = _wait(b)
    finally:
        rc_a, out_a = _wait(a)
    assert rc_a == 0 and rc_b == 0, (out_a, out_b)
    check(out_a, out_b)


@pytest.mark.slow
@pytest.mark.qemu
@pytest.mark.timeout(BOOT_TIMEOUT * 2 + 60)
@pytest.mark.parametrize("qemu_listens", [True, False], ids=["qemu-stream-listens",
                                                              "pyhv-listens-qemu-socket"])
def test_pyhv_and_qemu_on_a_socket_network(debian_image: images.LinuxImage,
                                           tmp_path: Path, qemu_listens: bool) -> None:
    marker = ExitMarker.fresh()
    seg = tmp_path / "seg.sock"
    if qemu_listens:       # QEMU is A (stream server), pyhv is B
        a = _start(qemu_argv(debian_image, f"stream,id=n0,server=on,addr.type=unix,"
                             f"addr.path={seg}", MAC_A, CMD_A, marker))
        try:
            _wait_for(seg)
            b = _start(pyhv_argv(f"socket=connect:{seg}", MAC_B, CMD_B))
            rc_b, out_b = _wait(b)
        finally:
            rc_a, out_a = _wait(a)
        assert marker.parse(out_a.encode()) == 0 and rc_b == 0, (out_a, out_b)
    else:                  # pyhv is A (listens on TCP), QEMU is B (-netdev socket)
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        a = _start(pyhv_argv(f"socket=listen:127.0.0.1:{port}", MAC_A, CMD_A))
        try:
            _wait_listening(port)
            b = _start(qemu_argv(debian_image, f"socket,id=n0,connect=127.0.0.1:{port}",
                                 MAC_B, CMD_B, marker))
            rc_b, out_b = _wait(b)
        finally:
            rc_a, out_a = _wait(a)
        assert rc_a == 0 and marker.parse(out_b.encode()) == 0, (out_a, out_b)
    check(out_a, out_b)


@pytest.mark.slow
@pytest.mark.timeout(BOOT_TIMEOUT * 2 + 60)
def test_two_pyhv_vms_on_a_bridge(debian_image: images.LinuxImage) -> None:
    """`--net tap=NAME` as meant for root: two persistent taps on a host bridge, one pyhv
    VM on each; the same pings (65042-byte frames through the bridge) and transfer."""
    import os
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("a bridge with taps needs root and /dev/net/tun")
    tag = os.getpid() % 10000
    br, taps = f"pyhvbr{tag}", [f"pyhvta{tag}", f"pyhvtb{tag}"]

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, timeout=10)
    try:
        ip("link", "add", br, "type", "bridge")
        for t in taps:
            ip("tuntap", "add", t, "mode", "tap")
            ip("link", "set", t, "mtu", "65521", "master", br, "up")
        ip("link", "set", br, "up")
        cmd_a = CMD_A.replace("mtu 65535", "mtu 65521")
        cmd_b = CMD_B.replace("mtu 65535", "mtu 65521")
        a = _start(pyhv_argv(f"tap={taps[0]}", MAC_A, cmd_a))
        try:
            b = _start(pyhv_argv(f"tap={taps[1]}", MAC_B, cmd_b))
            rc_b, out_b = _wait(b)
        finally:
            rc_a, out_a = _wait(a)
        assert rc_a == 0 and rc_b == 0, (out_a, out_b)
        check(out_a, out_b)
    finally:
        for t in taps:
            subprocess.run(["ip", "tuntap", "del", t, "mode", "tap"], timeout=10)
        subprocess.run(["ip", "link", "del", br], timeout=10)
