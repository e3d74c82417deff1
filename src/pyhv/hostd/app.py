"""The host daemon's REST API (FastAPI), behind a bearer token.

Resources (docs/api/host.openapi.json is the contract, kept equal to what this app
serves by tests/host/test_openapi.py; docs/host-daemon.md the prose):

    GET    /v1/host                      host statistics (CPUs, memory, load, VMs)
    GET    /v1/vms                       every VM: definition and state
    POST   /v1/vms                       define a VM (201)
    GET    /v1/vms/{name}                one VM
    DELETE /v1/vms/{name}                undefine a stopped VM
    POST   /v1/vms/{name}/start          start; returns once its control API answers
    POST   /v1/vms/{name}/shutdown       ACPI power button
    POST   /v1/vms/{name}/destroy        hard stop; returns once the process has ended
    POST   /v1/vms/{name}/pause|resume
    GET    /v1/vms/{name}/stats          the VM's own statistics (its control API)
    GET    /v1/vms/{name}/sched          its CPU settings and its cgroup's values
    GET    /v1/vms/{name}/snapshots      the VM's snapshots (its control API)
    POST   /v1/vms/{name}/snapshots      create one {"name": S} (201)
    POST   /v1/vms/{name}/snapshots/{s}/revert   revert to it
    DELETE /v1/vms/{name}/snapshots/{s}  delete it
    POST   /v1/vms/{name}/migrate        {"to": URL, "token": T, ...}: live migration to
                                         another daemon (pyhv.hostd.mover)
    POST   /v1/incoming                  the destination's side: define + --incoming
    DELETE /v1/incoming/{name}           abort it: the half-made VM is removed
    GET    /v1/loads?window=S            each running VM's measured CPU use and memory,
                                         the host's capacities (pyhv host plan)
    GET    /v1/events                    the event log (?vm=NAME&since=ID&limit=N)
    WS     /v1/vms/{name}/console        the serial console: binary frames both ways

Authentication: every request, whatever its path (the OpenAPI document, an unknown
path, the websocket), passes `TokenAuth` first: without `Authorization: Bearer TOKEN`
(compared in constant time) it is answered 401 and goes no further. A websocket may
offer the token as the subprotocol "bearer.TOKEN" instead (a browser cannot set its
headers). The one exception is the web console's static files (pyhv.hostd.webui:
GET /, /ui/, xterm.js and its CSS), which hold no secret and control nothing. The
routes also declare the scheme, so the OpenAPI document shows it.

Errors are `{"detail": "one line"}`: 400 malformed JSON; 422 a body or parameter of the
wrong form, or a definition the host cannot take; 404 an unknown VM; 409 an operation
the VM's state forbids (or the host's capacity); 507 the inventory could not be written
(a full disk); 500 a pyhv bug (one line, the daemon goes on).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import sqlite3
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from pyhv import __version__
from pyhv.hostd import webui
from pyhv.hostd.manager import HostError, Manager
from pyhv.hostd.models import (
    EventList,
    HostStats,
    IncomingRequest,
    MigrateRequest,
    Problem,
    SnapshotRequest,
    Vm,
    VmDefinition,
    VmList,
)

API_TITLE = "pyhv host daemon"
CONSOLE_PROTOCOL = "pyhv.console"
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "missing or wrong bearer token"},
    404: {"model": Problem, "description": "no such VM"},
    409: {"model": Problem, "description": "the VM's state or the host's capacity "
                                           "forbids it"},
}


class TokenAuth:
    """ASGI middleware: nothing passes without the bearer token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.subprotocol = f"bearer.{token}".encode()

    def _ok(self, scope: Scope) -> bool:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and \
                scope["path"] in webui.PUBLIC:
            return True                      # the web console's static files
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                return hmac.compare_digest(value, self.expected)
        if scope["type"] == "websocket":
            # a browser's websocket cannot carry Authorization: the token may come as
            # one of the offered subprotocols
            return any(hmac.compare_digest(str(p).encode(), self.subprotocol)
                       for p in scope.get("subprotocols", []))
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self._ok(scope):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": "missing or wrong bearer token (Authorization: "
                                     "Bearer TOKEN; the token is in the daemon's state "
                                     "directory)"}).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode()),
                   (b"www-authenticate", b"Bearer")]
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": 401,
                        "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008})


BEARER = HTTPBearer(auto_error=False, description="the token in the daemon's state "
                                                 "directory (DIR/token)")


def build_app(manager: Manager, token: str) -> FastAPI:
    def authorized(cred: Annotated[HTTPAuthorizationCredentials | None,
                                   Depends(BEARER)]) -> None:
        # TokenAuth has already refused a wrong token; this declares the scheme
        # (OpenAPI) and checks again, so a route never runs unauthenticated
        if cred is None or not hmac.compare_digest(cred.credentials.encode(),
                                                   token.encode()):
            raise HostError(401, "missing or wrong bearer token")

    app = FastAPI(title=API_TITLE, version=__version__,
                  description="Manage the VMs of one host: definitions, lifecycle, "
                              "consoles, events, host statistics.",
                  docs_url=None, redoc_url=None)
    # the HTTP routes declare and check the bearer scheme; the websocket is checked by
    # TokenAuth alone (it may carry the token as a subprotocol, which HTTPBearer does
    # not read)
    api = APIRouter(dependencies=[Depends(authorized)])
    app.add_middleware(TokenAuth, token=token)
    app.router.routes.extend(webui.routes())

    @app.exception_handler(HostError)
    async def host_error(_r: Request, e: HostError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse({"detail": e.message}, status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_r: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            ctx: dict[str, Any] = next((err.get("ctx", {}) for err in errors
                                    if err.get("type") == "json_invalid"), {})
            return JSONResponse({"detail": f"malformed JSON body: "
                                           f"{ctx.get('error', 'not JSON')}"},
                                status_code=400)
        if any(err.get("loc") == ("body",) and err.get("type") in
               ("model_attributes_type", "dict_type") for err in errors):
            return JSONResponse({"detail": "the body must be a JSON object (Content-Type: "
                                           "application/json)"}, status_code=400)
        parts = []
        for err in errors:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    @app.exception_handler(sqlite3.Error)
    async def inventory_error(_r: Request, e: sqlite3.Error) -> JSONResponse:
        # nothing was changed: the transaction rolled back, and a VM process spawned
        # for the operation was killed first (Manager._record_or_kill)
        return JSONResponse({"detail": f"the inventory could not be written: {e} (is "
                                       f"the file system of {manager.state.path} full? "
                                       "nothing was changed)"},
                            status_code=507)

    @app.exception_handler(Exception)
    async def internal(_r: Request, e: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"internal error in pyhv: {type(e).__name__}: {e}"},
                            status_code=500)

    # ------------------------------------------------------------------ resources

    @api.get("/v1/host", response_model=HostStats, responses=ERRORS, tags=["host"])
    def host() -> HostStats:
        return manager.host_stats()

    @api.get("/v1/loads", responses=ERRORS, tags=["host"])
    def loads(window: Annotated[float, Query(gt=0, le=60)] = 5.0) -> dict[str, Any]:
        return manager.loads(window)

    @api.get("/v1/vms", response_model=VmList, responses=ERRORS, tags=["vms"])
    def list_vms() -> VmList:
        return VmList(vms=manager.list_vms())

    @api.post("/v1/vms", response_model=Vm, status_code=201, tags=["vms"],
              responses={**ERRORS, 422: {"model": Problem, "description":
                                         "a malformed definition, or one this host "
                                         "cannot take"},
                         400: {"model": Problem, "description": "malformed JSON"}})
    def define(d: VmDefinition) -> Vm:
        return manager.define(d)

    @api.get("/v1/vms/{name}", response_model=Vm, responses=ERRORS, tags=["vms"])
    def get_vm(name: str) -> Vm:
        return manager.get(name)

    @api.delete("/v1/vms/{name}", status_code=204, responses=ERRORS, tags=["vms"])
    def undefine(name: str) -> None:
        manager.undefine(name)

    @api.post("/v1/vms/{name}/start", response_model=Vm, responses={
        **ERRORS, 422: {"model": Problem, "description": "pyhv run refused the "
                                                         "definition"}}, tags=["lifecycle"])
    def start(name: str) -> Vm:
        return manager.start(name)

    @api.post("/v1/vms/{name}/shutdown", response_model=Vm, responses=ERRORS,
              tags=["lifecycle"])
    def shutdown(name: str) -> Vm:
        return manager.shutdown(name)

    @api.post("/v1/vms/{name}/destroy", response_model=Vm, responses=ERRORS,
              tags=["lifecycle"])
    def destroy(name: str) -> Vm:
        return manager.destroy(name)

    @api.post("/v1/vms/{name}/pause", response_model=Vm, responses=ERRORS,
              tags=["lifecycle"])
    def pause(name: str) -> Vm:
        return manager.set_paused(name, True)

    @api.post("/v1/vms/{name}/resume", response_model=Vm, responses=ERRORS,
              tags=["lifecycle"])
    def resume(name: str) -> Vm:
        return manager.set_paused(name, False)

    @api.get("/v1/vms/{name}/stats", responses=ERRORS, tags=["vms"])
    def stats(name: str) -> dict[str, Any]:
        return manager.stats(name)

    @api.get("/v1/vms/{name}/sched", responses=ERRORS, tags=["vms"])
    def sched_info(name: str) -> dict[str, Any]:
        return manager.sched_info(name)

    @api.get("/v1/vms/{name}/snapshots", responses=ERRORS, tags=["snapshots"])
    def snapshots(name: str) -> dict[str, Any]:
        return manager.snapshots(name)

    @api.post("/v1/vms/{name}/snapshots", status_code=201, responses=ERRORS,
              tags=["snapshots"])
    def snapshot_create(name: str, body: SnapshotRequest) -> dict[str, Any]:
        return manager.snapshot(name, "create", body.name)

    @api.post("/v1/vms/{name}/snapshots/{snap}/revert", responses=ERRORS,
              tags=["snapshots"])
    def snapshot_revert(name: str, snap: str) -> dict[str, Any]:
        return manager.snapshot(name, "revert", snap)

    @api.delete("/v1/vms/{name}/snapshots/{snap}", responses=ERRORS, tags=["snapshots"])
    def snapshot_delete(name: str, snap: str) -> dict[str, Any]:
        return manager.snapshot(name, "delete", snap)

    @api.post("/v1/vms/{name}/migrate", responses={
        **ERRORS, 502: {"model": Problem, "description": "the destination daemon "
                                                         "could not be reached"}},
        tags=["migration"])
    def migrate(name: str, body: MigrateRequest) -> dict[str, Any]:
        return manager.migrate(name, body.to.rstrip("/"), body.token, body.options())

    @api.post("/v1/incoming", responses={
        **ERRORS, 422: {"model": Problem, "description": "a definition this host "
                                                         "cannot take"}},
        tags=["migration"])
    def incoming(body: IncomingRequest) -> dict[str, Any]:
        return manager.incoming(body.definition, body.listen_host)

    @api.delete("/v1/incoming/{name}", status_code=204, responses=ERRORS,
                tags=["migration"])
    def abort_incoming(name: str) -> None:
        manager.abort_incoming(name)

    @api.get("/v1/events", response_model=EventList, responses=ERRORS, tags=["events"])
    def events(vm: str | None = None, since: Annotated[int, Query(ge=0)] = 0,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> EventList:
        return EventList(events=manager.events(vm, since, limit))

    @app.websocket("/v1/vms/{name}/console")
    async def console(ws: WebSocket, name: str) -> None:
        await console_bridge(manager, ws, name)

    app.include_router(api)

    return app


async def console_bridge(manager: Manager, ws: WebSocket, name: str) -> None:
    """Relay the VM's console socket and the websocket both ways until either closes.
    A VM that is not running is an accepted connection closed at once with code 4404
    (no such VM) or 4409 (not running) and the reason."""
    try:
        path = manager.console_path(name)
        reader, writer = await asyncio.open_unix_connection(str(path))
    except HostError as e:
        await ws.accept()
        await ws.close(code=4404 if e.status == 404 else 4409, reason=e.message[:120])
        return
    except OSError as e:
        await ws.accept()
        await ws.close(code=1011, reason=f"cannot reach the VM's console: "
                                         f"{e.strerror or e}"[:120])
        return
    offered = ws.scope.get("subprotocols", [])
    await ws.accept(subprotocol=CONSOLE_PROTOCOL if CONSOLE_PROTOCOL in offered else None)

    async def vm_to_ws() -> None:
        while data := await reader.read(4096):
            await ws.send_bytes(data)

    async def ws_to_vm() -> None:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            data = msg.get("bytes") or (msg.get("text") or "").encode()
            if data:
                writer.write(data)
                await writer.drain()

    tasks = [asyncio.create_task(vm_to_ws()), asyncio.create_task(ws_to_vm())]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await ws.close(code=1000, reason="the VM's console closed")
