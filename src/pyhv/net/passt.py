"""`--net user`: unprivileged user-mode networking through passt.

passt (Debian package `passt`, the back end of libvirt and podman) is a user-mode
network stack that speaks, on a stream socket, the frames of QEMU's stream netdev (a
4-byte big-endian length, then the frame). It answers the guest's DHCP, NDP and DHCPv6,
forwards DNS, turns the guest's TCP/UDP/ICMP into the host's own sockets, and maps the
gateway address to the host itself, so a guest reaches a service listening on the host's
127.0.0.1:PORT at <gateway>:PORT (passt's default; `--no-map-gw` turns it off).

pyhv starts passt itself: it makes a connected socketpair, hands one end to passt with
`--fd` (no socket file, no path to race on), keeps the other as a StreamBackend, and runs
passt in the foreground as its child (`-f`, `-1`: passt exits when the connection
closes). close() closes the socket, then terminates passt (SIGTERM, then SIGKILL after
PASST_STOP_S) and reaps it, so no passt outlives the run. passt's messages go to a log
file in a private temporary directory; if passt exits early its last lines become the
error message.

Addresses (passt's defaults): the guest gets the host's own address, netmask and
gateway of the interface with the default route, and the host's DNS servers; the MAC
pyhv's NIC uses is the one passt learns from the guest's first frame.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time

from pyhv.errors import HostError
from pyhv.net.stream import StreamBackend

PASST = "passt"
PASST_STOP_S = 2.0
PASST_START_CHECK_S = 0.05      # how long start() waits to see passt fail at once


def passt_path() -> str | None:
    return shutil.which(PASST) or (
        "/usr/bin/passt" if os.access("/usr/bin/passt", os.X_OK) else None)


class PasstBackend(StreamBackend):
    kind = "user"

    def __init__(self, extra_args: list[str] | None = None) -> None:
        exe = passt_path()
        if exe is None:
            raise HostError("--net user needs passt (Debian package passt: "
                            "apt-get install passt)")
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        super().__init__("adopt", sock=mine)
        self.description = "user (passt)"
        self._theirs: socket.socket | None = theirs
        self._exe = exe
        self._extra = list(extra_args or [])
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: str | None = None

    def _opened(self) -> None:
        assert self._theirs is not None
        self._tmp = tempfile.TemporaryDirectory(prefix="pyhv-passt-")
        self.log_path = os.path.join(self._tmp.name, "passt.log")
        fd = self._theirs.fileno()
        argv = [self._exe, "-f", "-q", "-1", "--fd", str(fd), *self._extra]
        try:
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=log, pass_fds=(fd,),
                                             start_new_session=True)
        except OSError as e:
            raise HostError(f"--net user: cannot start passt: {e.strerror or e}") from None
        self._theirs.close()
        self._theirs = None
        time.sleep(PASST_START_CHECK_S)
        if self.proc.poll() is not None:
            why = self.passt_log()
            raise HostError(f"--net user: passt exited at once (status "
                            f"{self.proc.returncode}){': ' + why if why else ''}")
        super()._opened()

    def passt_log(self, lines: int = 3) -> str:
        """The last lines passt printed (without the syslog noise), for messages."""
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                text = f.read()[-4096:].decode("utf-8", "replace")
        except OSError:
            return ""
        keep = [ln.strip() for ln in text.splitlines()
                if ln.strip() and "to syslog" not in ln]
        return "; ".join(keep[-lines:])

    def _release(self) -> None:
        super()._release()
        if self._theirs is not None:
            self._theirs.close()
            self._theirs = None
        p = self.proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(OSError):
                p.terminate()
            try:
                p.wait(PASST_STOP_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    p.kill()
                p.wait(PASST_STOP_S)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
