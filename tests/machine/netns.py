"""Two "hosts" on one machine for the migration tests: network namespaces joined by a
veth pair (docs/migration.md, "Two hosts on one machine").

`NetnsPair()` creates namespaces pyhvm<id>a and pyhvm<id>b, a veth pair between them
(veth<id>a in a with 10.211.<n>.1/24, veth<id>b in b with 10.211.<n>.2/24), brings the
links and loopbacks up, and `close()` deletes both namespaces (which deletes the pair).
`exec_prefix(side)` is the `ip netns exec NS` prefix for a command. `unavailable()` says
why it cannot be done here (not root, no `ip`, the kernel refuses), for a skip reason.
Every `ip` call has a timeout.
"""

from __future__ import annotations

import os
import shutil
import subprocess

IP_TIMEOUT_S = 20


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True,
                          timeout=IP_TIMEOUT_S, check=False)


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"pyhvprobe{os.getpid()}"
    r = _ip("netns", "add", probe)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


class NetnsPair:
    def __init__(self) -> None:
        n = os.getpid() % 250 + 1
        tag = f"{os.getpid() % 100000}"
        self.ns = {"a": f"pyhvm{tag}a", "b": f"pyhvm{tag}b"}
        self.dev = {"a": f"veth{tag}a", "b": f"veth{tag}b"}
        self.addr = {"a": f"10.211.{n}.1", "b": f"10.211.{n}.2"}
        self._made: list[str] = []
        try:
            for side in "ab":
                self._run("netns", "add", self.ns[side])
                self._made.append(self.ns[side])
            self._run("link", "add", self.dev["a"], "type", "veth", "peer", "name",
                      self.dev["b"])
            for side in "ab":
                self._run("link", "set", self.dev[side], "netns", self.ns[side])
                self._run("-n", self.ns[side], "addr", "add", f"{self.addr[side]}/24",
                          "dev", self.dev[side])
                self._run("-n", self.ns[side], "link", "set", self.dev[side], "up")
                self._run("-n", self.ns[side], "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def _run(self, *args: str) -> None:
        r = _ip(*args)
        if r.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")

    def exec_prefix(self, side: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[side]]

    def rx_bytes(self, side: str) -> int:
        path = f"/sys/class/net/{self.dev[side]}/statistics/rx_bytes"
        r = subprocess.run([*self.exec_prefix(side), "cat", path], capture_output=True,
                           text=True, timeout=IP_TIMEOUT_S, check=True)
        return int(r.stdout)

    def close(self) -> None:
        for ns in self._made:
            _ip("netns", "del", ns)
        self._made = []
