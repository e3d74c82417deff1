"""Helpers for the network tests (imported as `netkit`): frames, waiting for frames,
free ports, QEMU as a hub."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from pyhv.net.backend import NetBackend

HAVE_QEMU = shutil.which("qemu-system-x86_64") is not None
BCAST = b"\xff" * 6
ETHERTYPE = b"\x88\xb5"            # IEEE local experimental


def frame(n: int, tag: int, src: bytes = b"\x02\0\0\0\0\x01") -> bytes:
    """An n-byte Ethernet frame (n >= 14) to the broadcast address, payload from tag."""
    return BCAST + src + ETHERTYPE + bytes((tag * 31 + i) & 0xFF for i in range(n - 14))


def wait_frame(b: NetBackend, timeout: float = 10.0) -> bytes:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        f = b.recv()
        if f is not None:
            return f
        time.sleep(0.002)
    raise AssertionError(f"{b.description}: no frame within {timeout} s ({b.stats})")


def wait_for(pred: object, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.005)
    raise AssertionError("condition not met in time")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class QemuHub:
    """qemu-system-x86_64 with no machine, whose hub 0 joins a `-netdev stream` server
    (Unix), a `-netdev socket,listen=` (TCP) and a `-netdev dgram` (UDP): whatever one
    pyhv back end sends on one of them QEMU forwards to the others."""

    def __init__(self, tmp: Path) -> None:
        self.stream_path = str(tmp / "qemu-stream.sock")
        self.socket_port = free_port()
        self.dgram_qemu = free_port(socket.SOCK_DGRAM)
        self.dgram_pyhv = free_port(socket.SOCK_DGRAM)
        argv = ["qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none",
                "-netdev", f"stream,id=s0,server=on,addr.type=unix,addr.path={self.stream_path}",
                "-netdev", f"socket,id=s1,listen=127.0.0.1:{self.socket_port}",
                "-netdev", f"dgram,id=d0,local.type=inet,local.host=127.0.0.1,"
                           f"local.port={self.dgram_qemu},remote.type=inet,"
                           f"remote.host=127.0.0.1,remote.port={self.dgram_pyhv}"]
        for i, nd in enumerate(("s0", "s1", "d0")):
            argv += ["-netdev", f"hubport,id=h{i},hubid=0,netdev={nd}"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        end = time.monotonic() + 20
        while not (os.path.exists(self.stream_path) and _bound(self.dgram_qemu)):
            if self.proc.poll() is not None or time.monotonic() > end:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                self.close()
                raise AssertionError(f"QEMU did not start: {err}")
            time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _bound(udp_port: int) -> bool:
    """QEMU has set up its last netdev (the dgram one binds this port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", udp_port))
        except OSError:
            return True
    return False


