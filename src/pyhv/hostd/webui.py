"""The web console's files: the page (hostd/web/index.html) and xterm.js, served by the
daemon at /ui/ (and / redirects there).

The page is the only thing the daemon serves without the token, with xterm.js and its
CSS (PUBLIC, GET/HEAD only): they are static, hold no secret and control nothing; the
page asks the user for the token and sends it with every API call, and as a websocket
subprotocol ("bearer.TOKEN") for the console, since a browser cannot set headers on a
websocket.

xterm.js comes from the npm package @xterm/xterm (hostd/web/package.json and its lock
file; scripts/setup.sh runs `npm ci` there), or from $PYHV_XTERM_DIR (a directory with
lib/xterm.js and css/xterm.css). Debian bookworm's libjs-xterm (3.8.1) ships only a
288-byte CommonJS stub as xterm.js, which no browser can run, so it is not used.
Without xterm.js the page falls back to a plain-text console.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Mount, Route

WEB_DIR = Path(__file__).resolve().parent / "web"
PUBLIC = frozenset({"/", "/ui", "/ui/", "/ui/xterm.js", "/ui/xterm.css"})


def xterm_dir() -> Path | None:
    for d in (os.environ.get("PYHV_XTERM_DIR"), WEB_DIR / "node_modules/@xterm/xterm"):
        if d and (Path(d) / "lib" / "xterm.js").is_file():
            return Path(d)
    return None


async def _index(_r: Request) -> Response:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html")


def _asset(rel: str, media_type: str) -> Route:
    async def serve(_r: Request) -> Response:
        d = xterm_dir()
        if d is None:
            return Response("xterm.js is not installed (scripts/setup.sh: npm ci in "
                            "src/pyhv/hostd/web)\n", status_code=404,
                            media_type="text/plain")
        return FileResponse(d / rel, media_type=media_type)
    return Route("/" + Path(rel).name, serve, methods=["GET", "HEAD"])


async def _to_ui(_r: Request) -> Response:
    return RedirectResponse("/ui/")


def routes() -> list[Route | Mount]:
    """Starlette routes (outside FastAPI's dependencies and the OpenAPI document)."""
    return [
        Route("/", _to_ui, methods=["GET", "HEAD"]),
        Mount("/ui", routes=[
            Route("/", _index, methods=["GET", "HEAD"]),
            _asset("lib/xterm.js", "text/javascript"),
            _asset("css/xterm.css", "text/css"),
        ]),
    ]
