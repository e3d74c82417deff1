"""`--net tap=NAME`: a host tap device (root, or a tap owned by the user), e.g. on a bridge.

The tap is opened through /dev/net/tun with TUNSETIFF (IFF_TAP | IFF_NO_PI): one read(2)
is one whole frame, one write(2) sends one, no extra header. A tap that does not exist
is created by the kernel for this process (root needed) and vanishes when pyhv closes
it; a persistent tap (`ip tuntap add NAME mode tap user U`) is attached to. pyhv does
not configure the host side: bring the tap up and put it on a bridge yourself (docs/net.md
shows the commands).

Transmit: a non-blocking write; a full tap queue drops the frame (as a NIC's wire would).
Receive: one frame per read, into a buffer one byte larger than max_frame, so an
oversize frame (the tap's MTU was raised past 65535) is recognised and dropped whole.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct

from pyhv.errors import HostError
from pyhv.net.backend import Buffer, NetBackend
from pyhv.net.framing import MAX_FRAME, MIN_FRAME

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16


def check_tap_name(name: str) -> None:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw or raw.isspace():
        raise HostError(f"--net tap={name!r}: not a valid interface name "
                        f"(1 to {IFNAMSIZ - 1} bytes, no '/')")


class TapBackend(NetBackend):
    kind = "tap"

    def __init__(self, name: str, *, max_frame: int = MAX_FRAME) -> None:
        check_tap_name(name)
        super().__init__(f"tap {name}", max_frame=max_frame)
        self.name = name
        self._fd = -1
        self._dead = False
        self._rbuf = bytearray(max_frame + 1)

    def _opened(self) -> None:
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise HostError(f"--net tap={self.name}: cannot open {TUN_DEVICE}: "
                            f"{e.strerror or e}") from None
        ifr = struct.pack("16sH22x", self.name.encode(), IFF_TAP | IFF_NO_PI)
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as e:
            os.close(fd)
            hint = " (creating or attaching a tap needs root or a tap owned by you)" \
                if e.errno in (1, 13) else ""
            raise HostError(f"--net tap={self.name}: TUNSETIFF failed: "
                            f"{e.strerror or e}{hint}") from None
        self._fd = fd
        self._set_link(True)

    def _send(self, frame: Buffer) -> bool:
        if self._fd < 0:
            return False
        try:
            return os.write(self._fd, frame) == len(frame)
        except OSError:
            return False           # EAGAIN (queue full), EIO (the tap is down), ...

    def _poll_set(self) -> list[tuple[int, int]]:
        if self._fd < 0 or self._dead:
            return []
        return [(self._fd, select.POLLIN if self._want_rx() else 0)]

    def _ready(self, fd: int, events: int) -> None:
        view = memoryview(self._rbuf)
        for _ in range(64):
            try:
                n = os.readv(self._fd, [view])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._dead = True              # stop polling it; send() still tries
                self._set_link(False, e.strerror or str(e))
                return
            if n > self.max_frame:
                self.stats.rx_oversize += 1
            elif n < MIN_FRAME:
                self.stats.rx_runts += 1
            else:
                self._deliver(bytes(view[:n]))
            if not self.rx_room():
                return

    def _release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
