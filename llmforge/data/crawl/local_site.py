"""``crawl.local_site``: crawl a folder of HTML files as if it were a web site, with no internet.

The folder (HTML pages, a ``robots.txt``, anything else a site holds) is served by a threaded ``http.server`` on
a free port of 127.0.0.1 for the duration of the crawl, and the real crawler runs against it: robots.txt,
links, scope, redirects (a folder asked for without its ``/``), 404s and the WARC writer all do what they do on
the web.

**Addresses.** The crawler never sees the port. Every URL of the site is ``http://site.localhost/<path>``
(``.localhost`` is reserved for loopback by RFC 6761, so the name can never point at somebody else's server),
and an httpx transport mounted for that one host sends its requests to the loopback port, ``Host:
site.localhost`` included. So seeds, the crawl state's scope key, the fetch log and the WARC records name the
same URLs on every run, whichever port the server got: resuming a killed crawl, near-duplicate detection across
runs and the stage cache all keep working. Links to other hosts are ordinary off-domain links (not followed
unless ``crawl.allowed_domains`` says so); seeds that are absolute URLs are fetched from the web as usual.

**Reproducible bytes.** The server sends a fixed ``Date`` (``SITE_DATE``) and no ``Last-Modified`` (a checkout's
mtimes are arbitrary), and the WARC writer, for pages of this host, records ``SITE_DATE`` as the capture time and
derives record IDs from the record's content (``warc.WarcSink(reproducible=True)``). With one request in flight
on this host (``LOCAL_CONCURRENCY``), the crawl order is fixed too, so crawling the same folder twice writes
byte-identical WARC files: a crawl re-run that finds the site unchanged leaves the data stage cached. The fetch
log keeps the real times.
"""

from __future__ import annotations

import contextlib
import hashlib
import mimetypes
import os
import posixpath
import threading
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from ...errors import UserInputError

LOCAL_HOST = "site.localhost"
LOCAL_BASE = f"http://{LOCAL_HOST}"
# Capture time recorded for local-site pages (WARC-Date and the HTTP Date header): 2026-01-01T00:00:00Z.
SITE_DATE = 1_767_225_600.0
# Requests in flight to the local site. One keeps the crawl order, and so the WARC bytes, reproducible; a
# loopback request takes about a millisecond, so a 50-page site still crawls in well under a second.
LOCAL_CONCURRENCY = 1

_TYPES = {".html": "text/html; charset=utf-8", ".htm": "text/html; charset=utf-8", ".txt": "text/plain"}


def site_url(path: str) -> str:
    """``/docs/a.html`` or ``docs/a.html`` → ``http://site.localhost/docs/a.html``."""
    return LOCAL_BASE + "/" + path.lstrip("/")


def is_local(url: str) -> bool:
    return (urlsplit(url).hostname or "") == LOCAL_HOST


def check_site_dir(path: Path, field: str = "crawl.local_site") -> Path:
    """The resolved site folder, or a ``UserInputError`` naming ``field`` when it is unusable."""
    path = Path(path)
    if not path.is_dir():
        raise UserInputError(
            f"{field}: {path} is not a folder. Point it at a folder of HTML files (with an index.html and, "
            "optionally, a robots.txt), relative to the project."
        )
    return path.resolve()


def site_digest(root: Path) -> str:
    """SHA-256 over the site's files (relative names and bytes): part of the crawl's scope key, so an edited
    site is crawled afresh rather than resumed."""
    h = hashlib.sha256()
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            p = Path(dirpath) / name
            h.update(p.relative_to(root).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).hexdigest().encode() + b"\n")
    return h.hexdigest()[:16]


class _Handler(BaseHTTPRequestHandler):
    """GET/HEAD of files under the site root; ``/dir`` → 301 ``/dir/``; ``/dir/`` → ``/dir/index.html``."""

    protocol_version = "HTTP/1.1"  # keep-alive: the crawler reuses one connection
    # Headers and body go out as separate writes; without TCP_NODELAY, Nagle + delayed ACK add ~40 ms to each.
    disable_nagle_algorithm = True
    server_version = "llmforge-local-site"
    sys_version = ""
    root: Path  # set on the per-server subclass

    def log_message(self, *args: Any) -> None:  # the crawler's fetch log records every request
        pass

    def date_time_string(self, timestamp: float | None = None) -> str:
        return formatdate(SITE_DATE, usegmt=True)

    def _target(self) -> tuple[Path | None, str]:
        raw = urlsplit(self.path).path
        parts = [p for p in posixpath.normpath(unquote(raw)).split("/") if p not in ("", ".", "..")]
        target = self.root.joinpath(*parts)
        try:
            resolved = target.resolve()
        except OSError:
            return None, raw
        if resolved != self.root and self.root not in resolved.parents:
            return None, raw  # a symlink leading out of the site: not served
        if any(p.startswith(".") for p in parts):
            return None, raw  # hidden files (.git, .DS_Store) are not part of the site
        return resolved, raw

    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        target, raw = self._target()
        try:
            if target is not None and target.is_dir():
                if not raw.endswith("/"):
                    self._send(301, b"", "text/html; charset=utf-8", {"Location": raw + "/"})
                    return
                target = target / "index.html"
            if target is None or not target.is_file():
                self._send(404, b"<html><body><h1>Not found</h1></body></html>", "text/html; charset=utf-8")
                return
            ctype = _TYPES.get(target.suffix.lower()) or mimetypes.guess_type(target.name)[0]
            self._send(200, target.read_bytes(), ctype or "application/octet-stream")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the crawler hung up (size cap, timeout)

    do_HEAD = do_GET


class LocalSite:
    """``with LocalSite(folder) as site:`` serves ``folder`` on ``127.0.0.1:site.port`` until the block ends."""

    def __init__(self, root: Path):
        self.root = check_site_dir(root)
        handler = type("LocalSiteHandler", (_Handler,), {"root": self.root})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        # A short poll interval: shutdown() waits for the serving loop to notice, once per interval.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="llmforge-local-site",
            daemon=True,
        )

    def __enter__(self) -> LocalSite:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def transport(self) -> LoopbackTransport:
        return LoopbackTransport(self.port)


class LoopbackTransport(httpx.AsyncBaseTransport):
    """Sends requests for ``http://site.localhost/...`` to ``127.0.0.1:port``; the request keeps its Host header.

    httpx sets the response's ``request`` back to the original one, so the crawler (and its WARC records) only
    ever see ``site.localhost`` URLs.
    """

    def __init__(self, port: int):
        self.port = port
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url.copy_with(scheme="http", host="127.0.0.1", port=self.port)
        routed = httpx.Request(
            request.method, url, headers=request.headers, stream=request.stream, extensions=request.extensions
        )
        return await self._inner.handle_async_request(routed)

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self._inner.aclose()
