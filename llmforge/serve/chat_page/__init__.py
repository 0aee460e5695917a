"""The chat page at ``/``: a browser client for the gateway's own OpenAI API, served by the gateway itself.

Three static files (``index.html``, ``chat.js``, ``chat.css``) shipped as package data: plain HTML and vanilla
JavaScript, no framework, no build step and nothing fetched from another origin, so the page works on an
air-gapped server exactly as it does in the tests. The page is only a client: it calls ``GET /v1/models`` and
``POST /v1/chat/completions`` (``stream: true``, read with ``fetch`` + ``ReadableStream``) with the API key the
user typed, so it gets exactly the auth, limits and safety filtering every other client gets. That is why the
page's own routes are open (``PAGE_ROUTES``, exempt from the key check): they hold no data, only code.

Every answer carries a strict Content-Security-Policy: scripts, styles and connections only from the gateway
itself, no inline script, so a model output that somehow became markup could still not run (the page also
only ever writes model text through ``textContent``).
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

# route -> (file in this package, media type)
_ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "/chat.css": ("chat.css", "text/css; charset=utf-8"),
}
PAGE_ROUTES: tuple[str, ...] = tuple(_ASSETS)

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # revalidate every load, so an upgraded gateway never runs last version's script against its new API
    "Cache-Control": "no-cache",
}


@cache
def asset(name: str) -> bytes:
    """The bytes of one of the page's files (read once per process)."""
    return resources.files(__name__).joinpath(name).read_bytes()


def register_chat_page(app: FastAPI) -> None:
    """Add ``/`` (the page) and its script and stylesheet to ``app`` (GET and HEAD)."""
    for route, (name, media_type) in _ASSETS.items():
        app.add_api_route(route, _handler(name, media_type), methods=["GET", "HEAD"], include_in_schema=False)


def _handler(name: str, media_type: str):
    """A route function for one file (a closure, not default arguments: FastAPI would read those as query
    parameters and let ``/?name=chat.js`` pick the file)."""
    from fastapi.responses import Response

    async def serve() -> Response:
        return Response(asset(name), media_type=media_type, headers=_HEADERS)

    return serve


__all__ = ["CSP", "PAGE_ROUTES", "asset", "register_chat_page"]
