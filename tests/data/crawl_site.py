"""A local HTTP site for crawler tests: threaded ``http.server`` on 127.0.0.1 with a free port.

Routes map a path to a ``Resp`` or to ``fn(n) -> Resp`` where ``n`` is how many times that path has been
requested (1 for the first request), so a test can serve "500, then 200". Every request is logged with its
path, Host and User-Agent headers and arrival time, so tests can assert what the crawler did on the wire.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Resp:
    status: int = 200
    body: bytes = b""
    content_type: str | None = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to sleep before answering (a slow page)
    stream: bool = False  # no Content-Length; body sent in chunks, then the connection closes


@dataclass
class Hit:
    path: str
    host: str
    user_agent: str
    t: float


Route = Resp | Callable[[int], Resp]


class Site:
    """Start with ``with Site(routes) as site:``; ``site.url("/a.html")`` is an absolute URL."""

    def __init__(self, routes: dict[str, Route] | None = None):
        self.routes: dict[str, Route] = dict(routes or {})
        self.hits: list[Hit] = []
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like a real server

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                path = self.path
                with site._lock:
                    site.hits.append(
                        Hit(
                            path,
                            self.headers.get("Host", ""),
                            self.headers.get("User-Agent", ""),
                            time.monotonic(),
                        )
                    )
                    site._counts[path] += 1
                    n = site._counts[path]
                route = site.routes.get(path)
                if route is None:
                    resp = Resp(404, b"<html><body>not found</body></html>")
                else:
                    resp = route(n) if callable(route) else route
                if resp.delay:
                    time.sleep(resp.delay)
                try:
                    self.send_response(resp.status)
                    if resp.content_type is not None:
                        self.send_header("Content-Type", resp.content_type)
                    for k, v in resp.headers.items():
                        self.send_header(k, v)
                    if resp.stream:
                        self.send_header("Connection", "close")
                        self.end_headers()
                        self.close_connection = True
                        for i in range(0, len(resp.body), 8192):
                            self.wfile.write(resp.body[i : i + 8192])
                            self.wfile.flush()
                    else:
                        self.send_header("Content-Length", str(len(resp.body)))
                        self.end_headers()
                        self.wfile.write(resp.body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the crawler hung up (size cap, timeout): expected

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return self.base + path

    def count(self, path: str) -> int:
        with self._lock:
            return self._counts[path]

    def paths(self) -> list[str]:
        with self._lock:
            return [h.path for h in self.hits]

    def __enter__(self) -> Site:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def page(title: str, links: list[str] = (), extra: str = "") -> bytes:  # type: ignore[assignment]
    anchors = "".join(f'<a href="{h}">{h}</a>\n' for h in links)
    return (
        f"<!DOCTYPE html><html><head><title>{title}</title></head>"
        f"<body><h1>{title}</h1><p>Some text about {title}.</p>{extra}\n{anchors}</body></html>"
    ).encode()
