"""Live migration between two host daemons: the source daemon's side of the talk.

`migrate(manager, vm, to, token, options)` runs in the source daemon for
POST /v1/vms/{name}/migrate, with the VM claimed (no other operation on it):

1. POST TO/v1/incoming {definition, listen_host}: the destination daemon defines the VM
   and starts `pyhv run ... --incoming tcp:LISTEN_HOST:0`; it answers the URI it listens
   on (LISTEN_HOST is the host name of TO, the address the source reached it by).
2. PUT /migrate {uri, ...} on the VM's own control API; GET /migrate until "completed"
   or "failed" (bounded by MIGRATE_TIMEOUT_S).
3. Completed: the source VM's process ends by itself (status 0); the destination marks
   its VM running when it runs there; we wait for that (bounded) and return the report.

Failure anywhere after step 1: DELETE TO/v1/incoming/NAME (the destination kills its
half-made VM and removes its definition; it would also on its own, when its process
ends or after MIGRATE_TIMEOUT_S), the source VM keeps running (pyhv.migration
guarantees it until the switch-over), an event says why, and a HostError (409 the
destination or the VM refused; 502 the destination could not be reached) goes back.

Invariant: every wait is bounded; a token is sent only to TO, never logged.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pyhv.hostd import vmproc
from pyhv.hostd.client import Client, DaemonError
from pyhv.hostd.models import Vm
from pyhv.vmclient import VmError

if TYPE_CHECKING:
    from pyhv.hostd.manager import Manager

POLL_S = 0.1
ARRIVE_TIMEOUT_S = 60.0


def _host_error(status: int, message: str) -> Exception:
    from pyhv.hostd.manager import HostError
    return HostError(status, message)


def migrate(manager: Manager, vm: Vm, to: str, token: str,
            options: dict[str, Any]) -> dict[str, Any]:
    from pyhv.hostd.manager import MIGRATE_TIMEOUT_S
    name = vm.name
    try:
        dest = Client(token, None, to)
        host = urlsplit(to).hostname or "127.0.0.1"
        answer = dest.call("POST", "/v1/incoming",
                           {"definition": vm.definition.model_dump(),
                            "listen_host": host}, timeout=ARRIVE_TIMEOUT_S)
    except DaemonError as e:
        manager.inv.event(name, "migrate-failed", f"the destination {to} refused: {e}")
        raise _host_error(409 if e.status else 502,
                          f"the destination {to} refused: {e}") from None
    uri = str(answer["uri"])
    manager.inv.event(name, "migrating", f"migrating to {to} ({uri})")
    report: dict[str, Any] = {}
    why: str | None = None
    try:
        vmproc.control(manager.state, name, "PUT", "/migrate", {"uri": uri, **options})
        deadline = time.monotonic() + MIGRATE_TIMEOUT_S
        while True:
            report = vmproc.control(manager.state, name, "GET", "/migrate")
            if report.get("status") in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:     # aborting the destination ends it
                why = f"it did not complete within {MIGRATE_TIMEOUT_S:g} s"
                break
            time.sleep(POLL_S)
        if why is None and report.get("status") != "completed":
            why = str(report.get("error") or report.get("status"))
    except VmError as e:
        why = str(e)
    if why is not None:
        with contextlib.suppress(DaemonError):
            dest.call("DELETE", f"/v1/incoming/{name}", timeout=ARRIVE_TIMEOUT_S)
        manager.inv.event(name, "migrate-failed", f"the migration to {to} failed: {why}"
                                                  f"; the VM runs on here")
        raise _host_error(409, f"the migration of {name!r} to {to} failed: {why} (the "
                               "VM runs on here; the destination removed its copy)")
    # completed: the destination runs the VM (its daemon marks it so)
    deadline = time.monotonic() + ARRIVE_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(DaemonError):
            if dest.call("GET", f"/v1/vms/{name}")["state"] == "running":
                break
        time.sleep(POLL_S)
    return report
