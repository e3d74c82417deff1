"""A client of a VM's control API (pyhv.vmapi): HTTP/JSON over its UNIX socket.

`call(sock, method, path, body)` returns the decoded JSON of a 2xx answer and raises
`VmError` (a PyhvError, so the CLI prints one `pyhv:` line) for anything else: the API's
own `fault_message`, a socket nobody listens on (the VM died), a timeout.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

from pyhv.errors import PyhvError
from pyhv.unixhttp import UnixHTTPConnection

TIMEOUT_S = 15.0     # the longest operation, pause, waits up to 10 s for a safe point


class VmError(PyhvError):
    pass


def call(sock: Path, method: str, path: str, body: dict[str, Any] | None = None,
         timeout: float = TIMEOUT_S) -> dict[str, Any]:
    conn = UnixHTTPConnection(sock, timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {} if data is None else {"Content-Type": "application/json"}
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (ConnectionRefusedError, FileNotFoundError):
            raise VmError(f"the VM at {sock} is not running (nothing listens on its "
                          "socket)") from None
        except TimeoutError:
            raise VmError(f"the VM at {sock} did not answer within {timeout:g} s") from None
        except OSError as e:
            raise VmError(f"cannot talk to the VM at {sock}: {e.strerror or e}") from None
        except http.client.HTTPException as e:
            raise VmError(f"the VM at {sock} sent a bad answer: {e}") from None
    finally:
        conn.close()
    try:
        obj = json.loads(raw)
    except ValueError:
        raise VmError(f"the VM at {sock} sent a non-JSON answer ({resp.status})") from None
    if not 200 <= resp.status < 300:
        msg = obj.get("fault_message") if isinstance(obj, dict) else None
        raise VmError(str(msg or f"HTTP {resp.status}"))
    if not isinstance(obj, dict):
        raise VmError(f"the VM at {sock} sent an unexpected answer")
    return obj
