"""The control API of a running VM: HTTP/JSON on a UNIX socket, in Firecracker's style.

Resources (docs/api/vm.openapi.json is the contract; docs/api.md the prose):

    GET  /machine    the VM: name, engine, cpus, memory, state, uptime, devices, pid
    PUT  /state      {"state": "paused" | "running"}: pause / resume
    PUT  /actions    {"action": "shutdown" | "stop"}: ACPI power button / hard stop
    GET  /stats      exits, guest time, timers, the engine's counters
    PUT  /migrate    {"uri": "tcp:HOST:PORT", ...}: start a live migration
    GET  /migrate    its progress, then its report
    GET  /snapshots  the VM's snapshots (name, parent, created, current)
    PUT  /snapshot/create|revert|delete  {"name": NAME}
    GET  /snapshot/progress   how far a running create has got
    GET  /balloon    the virtio-balloon: target, actual, the guest's view, host RSS
    PUT  /balloon    {"target": "64M"}: how much guest RAM the host takes back

Design: the standard library's HTTP request handler on a threading UNIX stream server,
served from a daemon thread of the VM process; the handler only parses, routes and
encodes: every operation is a method of `pyhv.vmcontrol.VmControl`. `ROUTES` maps a path
to {method: handler}, so later resources (snapshots, migration) are one entry each.

Errors: every failure is a JSON body `{"fault_message": "..."}` with a 4xx/5xx status
(Firecracker's shape), never a traceback or an HTML page: 400 malformed JSON, a body that
is not an object, a missing or wrong field; 404 an unknown path; 405 a method the path
does not take (with `Allow`); 411 a PUT without Content-Length; 413 a body over
MAX_BODY; 409 an operation the VM's state forbids; 503 while the VM restarts or after
it stopped; 500 a pyhv bug in an operation (one line; the run goes on).

Invariants: the socket is created with mode 0600 (umask while binding, then chmod); a
client that stalls is dropped after CLIENT_TIMEOUT_S; `close()` stops serving and
removes the socket file.
"""

from __future__ import annotations

import contextlib
import json
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from pyhv import privatesock
from pyhv.errors import ConfigError
from pyhv.vmcontrol import ControlError, VmControl

MAX_BODY = 64 * 1024
CLIENT_TIMEOUT_S = 5.0

Handler = Callable[[VmControl, dict[str, Any] | None], dict[str, Any]]


def _body_field(body: dict[str, Any] | None, name: str) -> str:
    if body is None:
        raise ControlError(400, f"this request needs a JSON body with {name!r}")
    value = body.get(name)
    if not isinstance(value, str):
        raise ControlError(400, f"the body needs {name!r} as a string")
    extra = sorted(set(body) - {name})
    if extra:
        raise ControlError(400, f"unknown field(s) in the body: {', '.join(extra)}")
    return value


ROUTES: dict[str, dict[str, Handler]] = {
    "/machine": {"GET": lambda c, _b: c.info()},
    "/state": {"GET": lambda c, _b: {"state": c.state()},
               "PUT": lambda c, b: c.set_state(_body_field(b, "state"))},
    "/actions": {"PUT": lambda c, b: c.action(_body_field(b, "action"))},
    "/stats": {"GET": lambda c, _b: c.stats()},
    "/migrate": {"GET": lambda c, _b: c.migration(), "PUT": lambda c, b: c.migrate(b)},
    "/snapshots": {"GET": lambda c, _b: c.snapshots()},
    "/snapshot/create": {"PUT": lambda c, b: c.snapshot_create(_body_field(b, "name"))},
    "/snapshot/revert": {"PUT": lambda c, b: c.snapshot_revert(_body_field(b, "name"))},
    "/snapshot/delete": {"PUT": lambda c, b: c.snapshot_delete(_body_field(b, "name"))},
    "/snapshot/progress": {"GET": lambda c, _b: c.snapshot_progress()},
    "/balloon": {"GET": lambda c, _b: c.balloon(),
                 "PUT": lambda c, b: c.set_balloon(_body_field(b, "target"))},
}
BODY_METHODS = ("PUT", "POST", "PATCH")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    control: VmControl


class _RequestHandler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "pyhv"
    sys_version = ""
    protocol_version = "HTTP/1.0"
    timeout = CLIENT_TIMEOUT_S

    # every method goes through one place, so an unknown path or method is a JSON error
    def do_GET(self) -> None:       # noqa: N802 - http.server's naming
        self._dispatch("GET")

    def do_PUT(self) -> None:       # noqa: N802
        self._dispatch("PUT")

    def do_POST(self) -> None:      # noqa: N802
        self._dispatch("POST")

    def do_PATCH(self) -> None:     # noqa: N802
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:    # noqa: N802
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        try:
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            methods = ROUTES.get(path)
            if methods is None:
                raise ControlError(404, f"no resource {path!r} (resources: "
                                        f"{', '.join(sorted(ROUTES))})")
            handler = methods.get(method)
            if handler is None:
                self._json(405, {"fault_message": f"{path} does not take {method} (it "
                                                  f"takes {', '.join(sorted(methods))})"},
                           allow=", ".join(sorted(methods)))
                return
            body = self._body() if method in BODY_METHODS else None
            self._json(200, handler(self.server.control, body))
        except ControlError as e:
            self._json(e.status, {"fault_message": e.message})
        except Exception as e:  # noqa: BLE001 - a pyhv bug: one line, the VM goes on
            self._json(500, {"fault_message": f"internal error in pyhv: "
                                              f"{type(e).__name__}: {e}"})

    def _body(self) -> dict[str, Any] | None:
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            raise ControlError(411, "a PUT needs a Content-Length header")
        try:
            length = int(length_text)
        except ValueError:
            raise ControlError(400, f"bad Content-Length {length_text!r}") from None
        if length < 0:
            raise ControlError(400, f"bad Content-Length {length_text!r}")
        if length > MAX_BODY:
            raise ControlError(413, f"the body is {length} bytes; at most {MAX_BODY}")
        raw = self.rfile.read(length) if length else b""
        if len(raw) < length:
            raise ControlError(400, "the body ended before Content-Length bytes")
        if not raw.strip():
            return None
        try:
            value = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ControlError(400, f"malformed JSON body: {e}") from None
        if not isinstance(value, dict):
            raise ControlError(400, "the body must be a JSON object")
        return value

    def _json(self, status: int, obj: dict[str, Any], allow: str | None = None) -> None:
        data = (json.dumps(obj) + "\n").encode()
        # http.server answers an HTTP/0.9 request (or a garbled request line) with a bare
        # body; every answer here has a status line and headers
        self.request_version = self.protocol_version
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if allow is not None:
            self.send_header("Allow", allow)
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, an unknown method) as
        JSON too."""
        self.close_connection = True
        text = message or self.responses.get(code, ("error",))[0]
        with contextlib.suppress(OSError):
            self._json(code, {"fault_message": text})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass                       # the console is the guest's; no access log on it

    def address_string(self) -> str:
        return "unix"


class ApiServer:
    """The control socket of one VM, served from a daemon thread."""

    def __init__(self, path: Path, control: VmControl) -> None:
        self.path = path
        privatesock.check_length(path, "API socket")
        if path.exists() or path.is_symlink():
            raise ConfigError(f"--api-sock {path}: the path exists (remove it, or use "
                              "--name, which cleans up stale sockets)")
        self._server = _Server(str(path), _RequestHandler, bind_and_activate=False)
        privatesock.bind(path, "API socket", self._server.server_bind,
                         self._server.server_activate, self._server.server_close)
        self._server.control = control
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name="pyhv-api", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2.0)
        with contextlib.suppress(OSError):
            self.path.unlink()
