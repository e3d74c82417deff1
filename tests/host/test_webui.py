"""The web console in a real headless browser (Debian's chromium, over CDP): log in with
the token, start a VM from the list, type into its serial console (xterm.js over the
daemon's websocket) and see the guest's answer, pause/resume/stop it from the page.

The guest is tests/guests/core/echo.S on emu (it answers each byte in upper case), so
what comes back is the guest's work, not the terminal's echo. Skips when chromium or
xterm.js (scripts/setup.sh installs both) is missing.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cdp import CHROMIUM, Browser
from guestbuild import GuestBuilder
from hostkit import Daemon

from pyhv.hostd.webui import xterm_dir

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                                "(scripts/setup.sh installs it)"),
    pytest.mark.skipif(xterm_dir() is None, reason="xterm.js is not installed "
                                                   "(scripts/setup.sh: npm ci)"),
]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(tmp_path / "chromium-profile")
    try:
        yield b
    finally:
        b.close()


def test_static_files_only_are_served_without_the_token(daemon: Callable[..., Daemon]
                                                        ) -> None:
    d = daemon()
    host, port = d.tcp.rsplit(":", 1)
    for path, kind in (("/ui/", "text/html"), ("/ui/xterm.js", "text/javascript"),
                       ("/ui/xterm.css", "text/css")):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        conn.close()
        assert r.status == 200 and r.getheader("content-type", "").startswith(kind)
        assert d.token.encode() not in body
    for method in ("POST", "PUT", "DELETE"):
        assert d.request(method, "/ui/", token=None)[0] == 401
    assert d.request("GET", "/ui/anything", token=None)[0] == 401
    assert d.request("GET", "/v1/host", token=None)[0] == 401


def test_web_console_in_chromium(daemon: Callable[..., Daemon], guests: GuestBuilder,
                                 browser: Browser) -> None:
    d = daemon()
    d.ok("POST", "/v1/vms", {"name": "web1", "kernel": str(guests("echo")),
                             "engine": "emu", "memory_mib": 16})
    b = browser
    b.navigate(f"http://{d.tcp}/")                       # redirects to /ui/
    assert b.eval("location.pathname") == "/ui/"
    # a wrong token is refused on the page
    b.eval("document.getElementById('token').value = 'wrong'")
    b.click("#login-btn")
    b.wait("document.getElementById('login-error').textContent.includes('Login failed')",
           "the login error")
    b.eval(f"document.getElementById('token').value = {json.dumps(d.token)}")
    b.click("#login-btn")
    b.wait("document.getElementById('state-web1')?.textContent === 'stopped'",
           "the VM list")
    b.click("#start-web1")
    b.wait("document.getElementById('state-web1')?.textContent === 'running'",
           "web1 running")
    assert d.vm("web1")["state"] == "running"

    b.click("#console-web1")
    b.wait("document.getElementById('console-status').textContent === 'connected'",
           "the console websocket")
    assert b.eval("typeof Terminal === 'function' && "
                  "!!document.querySelector('#terminal .xterm')"), "xterm.js is not in use"
    b.eval("document.querySelector('#terminal textarea').focus()")
    b.type("hello from chromium")
    b.wait("window.pyhvConsoleText.includes('HELLO FROM CHROMIUM')",
           "the guest's answer in the console")

    # the graphs: the VM's CPU from its cgroup's CPU time (the echo guest
    # polls its UART, so it uses CPU), the host's memory committed to VMs
    from pyhv import sched
    try:
        sched.detect()
        cgroups = True
    except sched.CgroupUnavailable:
        cgroups = False
    if cgroups:
        b.wait("(window.pyhvGraphs.cpu.web1 || []).length >= 2", "two CPU samples")
        assert b.eval("window.pyhvGraphs.cpu.web1.some(v => v > 0)")
        assert b.eval("document.querySelector('#cpugraph-web1 polyline')"
                      ".getAttribute('points').split(' ').length") >= 2
    assert b.eval("window.pyhvGraphs.mem.committed.at(-1)") == 16
    b.click("#snapshot-web1")
    b.wait("document.getElementById('notice').textContent.includes('created')",
           "the snapshot button's answer")
    snaps = d.ok("GET", "/v1/vms/web1/snapshots")["snapshots"]
    assert len(snaps) == 1 and snaps[0]["name"].startswith("web-")
    assert snaps[0]["name"] in b.eval("document.getElementById('notice').textContent")
    b.click("#pause-web1")
    b.wait("document.getElementById('state-web1')?.textContent === 'paused'", "paused")
    assert d.vm("web1")["state"] == "paused"
    b.click("#resume-web1")
    b.wait("document.getElementById('state-web1')?.textContent === 'running'", "resumed")
    b.click("#destroy-web1")
    b.wait("document.getElementById('state-web1')?.textContent === 'stopped'", "stopped")
    vm = d.vm("web1")
    assert vm["state"] == "stopped" and vm["last_exit"] == "destroyed"
    assert d.ok("GET", "/v1/vms/web1/sched")["cgroup"] is None   # gone before "stopped"
    b.wait("document.getElementById('console-status').textContent.startsWith('closed')",
           "the console to close with the VM")


@pytest.mark.slow
def test_a_linux_shell_in_the_web_console(daemon: Callable[..., Daemon],
                                          browser: Browser) -> None:
    """The issue's exercise: log in, start a Linux VM (Debian's kernel + pyhv's busybox
    initramfs on emu), type a command into its console in the browser, see its output."""
    import shutil

    from pyhv import images
    from pyhv.errors import HostError
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("needs Debian's apt-get and dpkg-deb to fetch the guest kernel")
    try:
        images.fetch_linux(quiet=True)
    except HostError as e:
        pytest.skip(f"cannot fetch Debian's kernel here: {e}")
    d = daemon()
    d.ok("POST", "/v1/vms", {"name": "linux1", "image": "linux", "engine": "emu",
                             "memory_mib": 128})
    b = browser
    b.navigate(f"http://{d.tcp}/ui/")
    b.eval(f"document.getElementById('token').value = {json.dumps(d.token)}")
    b.click("#login-btn")
    b.click("#start-linux1")
    b.wait("document.getElementById('state-linux1')?.textContent === 'running'",
           "linux1 running")
    b.click("#console-linux1")
    b.wait("document.getElementById('console-status').textContent === 'connected'",
           "the console websocket")
    b.eval("document.querySelector('#terminal textarea').focus()")
    # held by pyhv's input gate until Linux opens its console: nothing is lost
    b.type("echo pyhv-$((6*7))-ok")
    b.enter()
    b.wait("window.pyhvConsoleText.includes('pyhv-42-ok')", "the shell's answer",
           timeout=120)
    b.click("#destroy-linux1")
    b.wait("document.getElementById('state-linux1')?.textContent === 'stopped'", "stopped")
