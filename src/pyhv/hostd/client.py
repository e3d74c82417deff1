"""The host daemon's client, for `pyhv vm ...`: HTTP/JSON over its UNIX socket or TCP.

Finding the daemon: `--url http://HOST:PORT` (TCP) or `--socket PATH`, else the state
directory's daemon.json (written by the running daemon) or DIR/api.sock; the token from
`--token-file`, else DIR/token (refused when others can read it). Every call has a
timeout; a daemon that is not running, an answer that is not JSON, an HTTP error: one
`DaemonError` line (the daemon's `detail`), never a traceback.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pyhv.errors import PyhvError
from pyhv.hostd.statedir import StateDir, read_token
from pyhv.unixhttp import UnixHTTPConnection

TIMEOUT_S = 120.0


class DaemonError(PyhvError):
    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class Client:
    def __init__(self, token: str, socket_path: Path | None = None,
                 url: str | None = None) -> None:
        self.token = token
        self.socket_path = socket_path
        self.url = url
        if url is not None:
            u = urlsplit(url)
            if u.scheme != "http" or not u.hostname:
                raise DaemonError(f"--url {url!r}: expected http://HOST:PORT")
            self._host, self._port = u.hostname, u.port or 80

    @classmethod
    def find(cls, state_dir: Path | None, socket_path: Path | None, url: str | None,
             token_file: Path | None) -> Client:
        from pyhv.hostd.statedir import default_dir
        state = StateDir(state_dir or default_dir())
        token = read_token(token_file or state.token_file)
        if url is None and socket_path is None:
            try:
                info = json.loads(state.info_file.read_text())
                socket_path = Path(info["socket"])
            except (OSError, ValueError, KeyError, TypeError):
                socket_path = state.socket
        return cls(token, socket_path, url)

    @property
    def where(self) -> str:
        return self.url or str(self.socket_path)

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.url is not None:
            return http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        assert self.socket_path is not None
        return UnixHTTPConnection(self.socket_path, timeout)

    def call(self, method: str, path: str, body: object = None,
             timeout: float = TIMEOUT_S) -> Any:
        conn = self._connection(timeout)
        headers = {"Authorization": f"Bearer {self.token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (FileNotFoundError, ConnectionRefusedError):
                raise DaemonError(f"no pyhv host daemon at {self.where} (is `pyhv host "
                                  "serve` running?)") from None
            except TimeoutError:
                raise DaemonError(f"the daemon at {self.where} did not answer within "
                                  f"{timeout:g} s") from None
            except OSError as e:
                raise DaemonError(f"cannot talk to the daemon at {self.where}: "
                                  f"{e.strerror or e}") from None
            except http.client.HTTPException as e:
                raise DaemonError(f"the daemon at {self.where} sent a bad answer: {e}"
                                  ) from None
        finally:
            conn.close()
        if resp.status == 204:
            return None
        try:
            obj = json.loads(raw)
        except ValueError:
            raise DaemonError(f"the daemon sent a non-JSON answer ({resp.status})",
                              resp.status) from None
        if not 200 <= resp.status < 300:
            detail = obj.get("detail") if isinstance(obj, dict) else None
            raise DaemonError(str(detail or f"HTTP {resp.status}"), resp.status)
        return obj

    def websocket(self, path: str) -> Any:
        """A connected `websockets` sync client on `path` (the console)."""
        from websockets.exceptions import InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect, unix_connect
        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            if self.url is not None:
                return connect(f"ws://{self._host}:{self._port}{path}",
                               additional_headers=headers, open_timeout=30,
                               max_size=None)
            return unix_connect(str(self.socket_path), f"ws://localhost{path}",
                                additional_headers=headers, open_timeout=30,
                                max_size=None)
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonError(f"no pyhv host daemon at {self.where}") from None
        except InvalidStatus as e:
            raise DaemonError(f"the daemon refused the console: HTTP "
                              f"{e.response.status_code}") from None
        except (InvalidHandshake, OSError, TimeoutError) as e:
            raise DaemonError(f"cannot open the console: {e}") from None
