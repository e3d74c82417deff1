"""`--net tap=NAME` against a real tap device: the host side is an AF_PACKET socket on
the tap (root and /dev/net/tun needed; skipped otherwise, with the reason)."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest
from netkit import frame, wait_frame

from pyhv.errors import HostError
from pyhv.net.tap import TapBackend

ETH_P_ALL = 0x0003


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "creating a tap needs root"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun on this host"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")


def _ours(b: TapBackend, ethertype: bytes) -> bytes:
    """The next frame of ours (the kernel sends its own IPv6 frames on a new link)."""
    while True:
        f = wait_frame(b)
        if f[12:14] == ethertype:
            return f


def test_tap_frames_both_ways() -> None:
    name = f"pyhvt{os.getpid() % 100000}"
    b = TapBackend(name)
    b.start()
    try:
        subprocess.run(["ip", "link", "set", name, "mtu", "65521", "up"], check=True,
                       timeout=10)
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                           socket.htons(ETH_P_ALL)) as host:
            host.bind((name, 0))
            host.settimeout(5)
            for n in (60, 1514, 9014, 65535):          # the tap's largest MTU (65521) + header
                f = frame(n, n)
                host.send(f)
                assert _ours(b, f[12:14]) == f          # host -> guest side
                g = frame(n, n + 1, src=b"\x02\0\0\0\0\x02")
                assert b.send(g)
                end = time.monotonic() + 5
                while True:                            # skip the kernel's own frames
                    got, addr = host.recvfrom(70000)
                    if got[12:14] == g[12:14] and addr[2] != socket.PACKET_OUTGOING:
                        break
                    assert time.monotonic() < end
                assert got == g                        # guest side -> host
    finally:
        b.close()
    r = subprocess.run(["ip", "link", "show", name], capture_output=True, timeout=10)
    assert r.returncode != 0                            # the non-persistent tap is gone


def test_bad_tap_name_is_refused() -> None:
    with pytest.raises(HostError, match="not a valid interface name"):
        TapBackend("x" * 16)
