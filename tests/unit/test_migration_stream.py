"""The migration stream's pieces without a guest: record framing and checksums
(pyhv.migration.stream), the header check (header.py), PAGES records (pages.py)."""

from __future__ import annotations

import socket
import struct
import zlib

import pytest

from pyhv.memory import PAGE_SIZE, GuestMemory
from pyhv.migration import header
from pyhv.migration.pages import PageReader, apply_record
from pyhv.migration.stream import (
    HELLO,
    PAGES,
    STATE,
    Channel,
    MigrationError,
    encode,
)
from pyhv.migration.uri import parse


def pair() -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    return Channel(a, "a"), Channel(b, "b")


def test_records_go_through_whole() -> None:
    a, b = pair()
    a.send_json(HELLO, {"x": 1})
    a.send(PAGES, b"\1" * 1000)
    assert b.recv_json((HELLO,)) == (HELLO, {"x": 1})
    assert b.recv() == (PAGES, b"\1" * 1000)
    assert b.received == a.sent


@pytest.mark.parametrize("at", range(0, 16 + 16))
def test_every_flipped_byte_of_a_record_is_refused(at: int) -> None:
    data = bytearray(encode(STATE, b'{"vmstate": 1, "pad": "0123"}'))
    data[at] ^= 0x40
    a, b = pair()
    a.sock.sendall(bytes(data))
    a.close()
    with pytest.raises(MigrationError, match="corrupt|closed|record"):
        b.recv()


def test_a_cut_record_is_refused() -> None:
    data = encode(PAGES, b"x" * 100)
    a, b = pair()
    a.sock.sendall(data[:50])
    a.close()
    with pytest.raises(MigrationError, match="closed the connection"):
        b.recv()


def test_an_oversized_length_is_refused_before_reading_it() -> None:
    a, b = pair()
    head = struct.pack("<B3xI", PAGES, 1 << 30)
    a.sock.sendall(head + struct.pack("<II", zlib.crc32(head), 0))
    with pytest.raises(MigrationError, match="at most"):
        b.recv()


def ours() -> dict[str, object]:
    return {"magic": header.MAGIC, "stream": 1, "pyhv": "0.1.0", "engine": "emu",
            "cpu": "unicorn (emu)",
            "machine": {"cpus": 1, "mem_size": 16 << 20, "ram": [[0, 16 << 20]],
                        "devices": ["pic", "pit"]}}


@pytest.mark.parametrize("change, words", [
    ({"magic": "qemu"}, "bad magic"),
    ({"stream": 2}, "stream version"),
    ({"pyhv": "0.2.0"}, "same release"),
    ({"engine": "kvm"}, "engine"),
    ({"cpu": "Intel(R) Xeon(R) Other"}, "CPU model"),
    ({"machine": {"cpus": 2, "mem_size": 16 << 20, "ram": [[0, 16 << 20]],
                  "devices": ["pic", "pit"]}}, "vCPUs"),
    ({"machine": {"cpus": 1, "mem_size": 16 << 20, "ram": [[0, 16 << 20]],
                  "devices": ["pic"]}}, "device set"),
])
def test_the_header_check_names_what_differs(change: dict[str, object], words: str) -> None:
    assert header.check(ours(), ours()) is None
    why = header.check(ours(), {**ours(), **change})
    assert why is not None and words in why


def test_pages_zero_markers_and_bounds() -> None:
    src = GuestMemory.with_layout([(0, 8 * PAGE_SIZE)])
    dst = GuestMemory.with_layout([(0, 8 * PAGE_SIZE)])
    try:
        src.write(3 * PAGE_SIZE, b"hello")
        dst.write(5 * PAGE_SIZE, b"stale")          # a zero page must clear it
        reader = PageReader(src)
        (payload, n, zeros), = reader.pack(reader.frames())
        assert (n, zeros) == (8, 7)
        assert len(payload) == 4 + 8 * 8 + PAGE_SIZE       # one data page
        assert apply_record(PageReader(dst), payload) == 8
        assert dst.read(0, 8 * PAGE_SIZE) == src.read(0, 8 * PAGE_SIZE)
        bad = bytearray(payload)
        struct.pack_into("<Q", bad, 4, 99 << 1 | 1)         # a frame outside RAM
        dst.write(5 * PAGE_SIZE, b"keep")
        with pytest.raises(MigrationError, match="outside RAM"):
            apply_record(PageReader(dst), bytes(bad))
        assert dst.read(5 * PAGE_SIZE, 4) == b"keep"      # nothing written
        with pytest.raises(MigrationError, match="does not hold"):
            apply_record(PageReader(dst), payload[:-1])
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("text", ["udp:1.2.3.4:5", "tcp:host", "tcp::5", "tcp:h:99999",
                                  "tcp:[::1:5"])
def test_bad_addresses_are_refused(text: str) -> None:
    from pyhv.errors import ConfigError
    with pytest.raises(ConfigError):
        parse(text)


def test_addresses() -> None:
    assert parse("tcp:127.0.0.1:4444") == ("127.0.0.1", 4444)
    assert parse("tcp:[::1]:0") == ("::1", 0)


def test_the_openapi_file_lists_every_route_and_method() -> None:
    import json
    from pathlib import Path

    from pyhv.vmapi import ROUTES
    doc = json.loads((Path(__file__).resolve().parents[2] / "docs" / "api" /
                      "vm.openapi.json").read_text())
    assert {p: sorted(m.upper() for m in ms) for p, ms in doc["paths"].items()} == \
        {p: sorted(ms) for p, ms in ROUTES.items()}


@pytest.mark.parametrize("at", range(4, 12))
def test_a_damaged_length_or_header_checksum_is_refused_without_waiting(at: int) -> None:
    """The peer sends nothing more: the refusal must not wait for the payload."""
    data = bytearray(encode(PAGES, b"x" * 100))
    data[at] ^= 0x01
    a, b = pair()
    a.sock.sendall(bytes(data))          # the connection stays open
    with pytest.raises(MigrationError, match="bad record header"):
        b.recv()
