"""Running the gateway: in the foreground with graceful SIGTERM (``serve_forever``) or in a background thread
on a free loopback port (``BackgroundServer``: the deploy check, tests, benchmarks).

Shutdown, in both: stop accepting connections, let in-flight requests finish for ``shutdown_timeout_s``,
cancel what is left (cancelling a request's task closes its engine stream, which frees its slot), then shut the
engine down. uvicorn does the first three; ``GracefulServer`` marks the gateway as draining (new requests on
open keep-alive connections get 503) and, unlike plain uvicorn, does not re-raise the signal afterwards, so a
drained server exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .. import console
from ..errors import LLMForgeError, StageError

log = console.get_logger(__name__)

KEEP_ALIVE_S = 75.0  # idle keep-alive connections are closed after this (nginx's default)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free on ``host`` now (a race with other processes is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _uvicorn():
    from ..errors import require

    return require("uvicorn", extra="serve", purpose="Serving")


def make_server(app, host: str, port: int, *, shutdown_timeout_s: float, log_level: str = "warning"):
    uvicorn = _uvicorn()

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            gw = getattr(app.state, "gateway", None)
            if gw is not None and gw.status == "ready":
                gw.status = "draining"
            if not self.should_exit:
                log.info("shutting down: finishing in-flight requests (up to %gs)", shutdown_timeout_s)
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: Any = None) -> None:
            # uvicorn waits for open connections; at the drain deadline we cancel the generations still
            # running, so each of their responses ends cleanly (an error event and [DONE], or a 503) instead
            # of being cut off mid-chunk. uvicorn's own task cancellation is only the backstop.
            gw = getattr(app.state, "gateway", None)
            if gw is not None and gw.status == "ready":
                gw.status = "draining"
            timer = None
            if gw is not None:
                timer = asyncio.get_running_loop().call_later(shutdown_timeout_s, gw.cancel_all)
            try:
                await super().shutdown(sockets)
            finally:
                if timer is not None:
                    timer.cancel()

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises a captured SIGTERM once it has shut down, which would kill the process with
            # -15 after a clean drain; handle the signals here and return normally instead.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=shutdown_timeout_s + 5.0,
        # longer than clients keep idle connections (httpx: 5 s): when both sides time out at the same 5 s,
        # a client reusing a connection the server is closing gets a reset (seen under load in the benchmark)
        timeout_keep_alive=KEEP_ALIVE_S,
        lifespan="on",
    )
    return GracefulServer(config)


def _run(coro, server) -> Any:
    """Run ``coro`` on the event loop uvicorn would pick (uvloop when installed: `uvicorn[standard]`)."""
    with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
        return runner.run(coro)


def serve_forever(
    app,
    host: str,
    port: int,
    *,
    shutdown_timeout_s: float = 30.0,
    startup_timeout_s: float = 600.0,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM / Ctrl-C, then drain. Raises ``StageError`` if the engine fails to start."""
    server = make_server(app, host, port, shutdown_timeout_s=shutdown_timeout_s, log_level="warning")
    gw = app.state.gateway

    async def main() -> None:
        watcher = asyncio.ensure_future(_watch_start(server, gw, startup_timeout_s, on_ready))
        try:
            await server.serve()
        finally:
            watcher.cancel()

    try:
        _run(main(), server)
    except OSError as e:
        raise StageError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port") from None
    if gw.status == "failed":
        raise StageError(f"the inference engine failed to start: {gw.error}")
    if not server.started:
        raise StageError(f"the gateway could not start on {host}:{port} (see the log above)")


async def _watch_start(server, gw, timeout: float, on_ready: Callable[[], None] | None) -> None:
    t0 = time.monotonic()
    while gw.status == "starting":
        if time.monotonic() - t0 > timeout:
            gw.status, gw.error = "failed", f"not ready after {timeout:g}s (serve.startup_timeout_s)"
            break
        await asyncio.sleep(0.05)
    if gw.status == "failed":
        server.should_exit = True
        return
    while not server.started:
        await asyncio.sleep(0.01)
    if on_ready is not None:
        on_ready()


class BackgroundServer:
    """The gateway on ``host:port`` (a free loopback port by default) in a daemon thread.

    ``with BackgroundServer(app) as srv: openai.OpenAI(base_url=srv.url + "/v1")``; entering waits until
    the engine is ready (or raises with the reason it is not), leaving stops and drains it.
    """

    def __init__(
        self,
        app,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        shutdown_timeout_s: float = 5.0,
        startup_timeout_s: float = 600.0,
        wait_ready: bool = True,
    ):
        self.app = app
        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout_s = startup_timeout_s
        self.wait_ready = wait_ready
        self.server = make_server(app, self.host, self.port, shutdown_timeout_s=shutdown_timeout_s)
        self.thread = threading.Thread(target=self._run, name=f"gateway:{self.port}", daemon=True)
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def gateway(self):
        return self.app.state.gateway

    def _run(self) -> None:
        try:
            _run(self.server.serve(), self.server)
        except BaseException as e:
            self.error = e

    def start(self) -> BackgroundServer:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if self.error is not None or not self.thread.is_alive():
                raise StageError(f"the gateway did not start on {self.url}: {self.error}")
            if time.monotonic() - t0 > 30:
                raise StageError(f"the gateway did not start listening on {self.url} within 30 s")
            time.sleep(0.01)
        if self.wait_ready:
            while self.gateway.status == "starting":
                if time.monotonic() - t0 > self.startup_timeout_s:
                    self.stop()
                    raise StageError(f"the engine was not ready after {self.startup_timeout_s:g}s")
                time.sleep(0.02)
            if self.gateway.status == "failed":
                err = self.gateway.error
                self.stop()
                raise StageError(f"the inference engine failed to start: {err}")
        return self

    def stop(self, timeout: float = 60.0) -> None:
        if self.gateway.status == "ready":
            self.gateway.status = "draining"
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


__all__ = ["BackgroundServer", "LLMForgeError", "free_port", "make_server", "serve_forever"]
