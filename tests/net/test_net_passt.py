"""`--net user`: the passt back end against a real passt process.

pyhv starts passt on a socketpair, speaks its stream protocol, and gets ARP and DHCP
answers from it; close() leaves no passt behind. (A guest's DHCP and HTTP through passt:
tests/net/test_net_guest.py.)
"""

from __future__ import annotations

import os
import socket
import struct

import pytest
from netkit import wait_frame

from pyhv.net.passt import PasstBackend, passt_path

pytestmark = pytest.mark.skipif(passt_path() is None,
                                reason="passt is not installed (Debian package passt)")
MAC = bytes.fromhex("525400aabbcc")


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def dhcp_discover(xid: int) -> bytes:
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000,
                        bytes(4), bytes(4), bytes(4), bytes(4), MAC, b"", b"")
    bootp += b"\x63\x82\x53\x63" + b"\x35\x01\x01" + b"\x37\x03\x01\x03\x06" + b"\xff"
    udp = struct.pack("!HHHH", 68, 67, 8 + len(bootp), 0) + bootp
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     bytes(4), b"\xff" * 4)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return b"\xff" * 6 + MAC + b"\x08\x00" + ip + udp


def _options(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    i = 0
    while i < len(data) and data[i] != 255:
        if data[i] == 0:
            i += 1
            continue
        out[data[i]] = data[i + 2:i + 2 + data[i + 1]]
        i += 2 + data[i + 1]
    return out


def test_passt_answers_arp_and_dhcp() -> None:
    b = PasstBackend()
    try:
        b.start()
        assert b.proc is not None and b.proc.poll() is None
        b.send(b"\xff" * 6 + MAC + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
               + MAC + bytes(4) + bytes(6) + socket.inet_aton("192.0.2.1"))
        b.send(dhcp_discover(0x1234ABCD))
        offer = None
        for _ in range(10):
            f = wait_frame(b)
            if f[12:14] == b"\x08\x00" and f[23] == 17 and f[36:38] == b"\x00\x44":
                offer = f
                break
        assert offer is not None, "no DHCP answer from passt"
        bootp = offer[42:]
        assert bootp[0] == 2 and struct.unpack("!I", bootp[4:8])[0] == 0x1234ABCD
        assert bootp[28:34] == MAC
        yiaddr = socket.inet_ntoa(bootp[16:20])
        assert yiaddr != "0.0.0.0"
        assert bootp[236:240] == b"\x63\x82\x53\x63"
        opts = _options(bootp[240:])
        assert opts[53] == b"\x02"                      # DHCPOFFER
        assert len(opts[1]) == 4 and len(opts[3]) == 4  # a netmask and a router
    finally:
        b.close()
    assert b.proc.returncode is not None               # reaped: no passt left running


def test_passt_is_stopped_even_if_never_started() -> None:
    b = PasstBackend()
    b.close()
    assert b.proc is None


def test_passt_exiting_at_once_is_a_clear_error() -> None:
    from pyhv.errors import HostError
    b = PasstBackend(extra_args=["--no-such-option"])
    with pytest.raises(HostError, match="passt exited at once"):
        b.start()
    b.close()
    assert not any(os.path.exists(p) for p in [b.log_path or "/nonexistent"])
