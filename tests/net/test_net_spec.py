"""`--net` and `--mac` parsing: every form, and one-line errors for bad ones."""

from __future__ import annotations

import pytest

from pyhv.errors import ConfigError
from pyhv.net.spec import format_mac, parse_mac, parse_net


@pytest.mark.parametrize("text,kind,mode,addr,remote", [
    ("user", "user", "", None, None),
    ("none", "none", "", None, None),
    ("tap=tap0", "tap", "", None, None),
    ("socket=listen:127.0.0.1:5555", "stream", "listen", ("127.0.0.1", 5555), None),
    ("socket=connect:[::1]:5555", "stream", "connect", ("::1", 5555), None),
    ("socket=connect:/tmp/vm.sock", "stream", "connect", "/tmp/vm.sock", None),
    ("socket=udp:127.0.0.1:5000@127.0.0.1:5001", "dgram", "", ("127.0.0.1", 5000),
     ("127.0.0.1", 5001)),
    ("socket=udp:./a.sock@./b.sock", "dgram", "", "./a.sock", "./b.sock"),
])
def test_net_forms(text: str, kind: str, mode: str, addr: object, remote: object) -> None:
    s = parse_net(text)
    assert (s.kind, s.mode, s.addr, s.remote) == (kind, mode, addr, remote)


@pytest.mark.parametrize("text", [
    "", "usr", "user=1", "tap", "tap=", "tap=" + "x" * 16, "tap=a/b", "socket=",
    "socket=listen:", "socket=listen:host", "socket=listen:host:0",
    "socket=listen:host:65536", "socket=connect:h:p", "socket=udp:127.0.0.1:5000",
    "socket=serve:127.0.0.1:1", "socket=connect:/" + "x" * 120,
])
def test_bad_net_is_one_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="--net"):
        parse_net(text)


def test_mac() -> None:
    assert parse_mac("52:54:00:12:34:56") == bytes.fromhex("525400123456")
    assert parse_mac("2-0-0-0-0-a") == bytes.fromhex("02000000000a")
    assert format_mac(parse_mac("52:54:00:AB:cd:ef")) == "52:54:00:ab:cd:ef"
    a, b = parse_mac(None), parse_mac(None)
    assert a[:3] == b[:3] == bytes.fromhex("525400") and not a[0] & 1


@pytest.mark.parametrize("text", ["", "52:54:00:12:34", "52:54:00:12:34:56:78",
                                  "01:00:5e:00:00:01", "00:00:00:00:00:00",
                                  "52:54:00:12:34:5g", "525400123456"])
def test_bad_mac(text: str) -> None:
    with pytest.raises(ConfigError, match="--mac"):
        parse_mac(text)
