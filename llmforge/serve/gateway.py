"""The OpenAI-compatible gateway: one FastAPI app in front of any ``AsyncEngine`` (local or vLLM).

``create_app(engine, settings)`` builds the app. The routes are thin: read and validate the body
(``protocol``), turn it into prompts and ``SamplingParams`` (``_prepare_*``), pass every prompt through the
filter chain, run one engine request per choice (``n > 1`` = independent requests, seeds ``seed + i``), and
stream or collect the events. Everything the gateway guarantees identically for both engines lives here:

* authentication (``Authorization: Bearer KEY``, constant-time compare, every route but ``/health``) and the
  body-size limit (``Content-Length`` checked before reading, the stream counted while reading) in
  ``_Guard``, an ASGI middleware that also counts every answer in ``/metrics``;
* every error through ``errors.to_api_error`` (one envelope, one status table);
* 503 until the engine has started (it starts in the background so ``/health`` can say "starting");
* a client that disconnects cancels its generations (streaming: the response's body iterator is closed;
  non-streaming: a watcher on the connection);
* the filter hook (``filters.FilterChain``) on every prompt before the engine and every chunk after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import console
from ..errors import LLMForgeError
from ..infer import GenerationEvent, SamplingParams
from . import protocol as P
from .chat_page import PAGE_ROUTES, register_chat_page
from .errors import APIError, invalid, to_api_error
from .filters import ContentFiltered, FilterChain, FilterVerdict, OutputFilter, RequestContext
from .metrics import GatewayMetrics, route_label
from .settings import GatewaySettings

log = console.get_logger(__name__)

MAX_PROMPTS = 32  # prompts in one /v1/completions request (each times n is a generation)
OPEN_ROUTES = ("/health",)


# ------------------------------------------------------------------------------------------------ state


@dataclass
class GatewayState:
    engine: Any
    settings: GatewaySettings
    filters: FilterChain
    metrics: GatewayMetrics
    model_name: str
    created: int = field(default_factory=P.now)
    status: str = "starting"  # starting | ready | failed | draining
    error: str | None = None
    start_task: asyncio.Task | None = None
    inflight: set[str] = field(default_factory=set)  # engine request ids now generating

    def cancel_all(self) -> None:
        """Cancel every running generation (the drain deadline of a shutdown)."""
        if self.inflight:
            log.warning("drain timeout: cancelling %d generation(s) still running", len(self.inflight))
        for rid in list(self.inflight):
            self.engine.cancel(rid)

    def require_ready(self) -> None:
        if self.status == "ready" and not self.engine.healthy():
            raise APIError(503, "The inference engine is not healthy.", code="engine_unhealthy")
        if self.status == "starting":
            raise APIError(
                503,
                "The model is still loading; retry shortly.",
                code="engine_starting",
                headers={"Retry-After": "5"},
            )
        if self.status == "failed":
            raise APIError(503, f"The inference engine failed to start: {self.error}", code="engine_failed")
        if self.status == "draining":
            raise APIError(503, "The server is shutting down.", code="shutting_down")


def _state(request: Request) -> GatewayState:
    return request.app.state.gateway


# ------------------------------------------------------------------------------------------------ edge


class _BodyTooLarge(Exception):
    pass


class _Guard:
    """ASGI middleware: count answers, check the API key and the body size before any route runs."""

    def __init__(self, app, gateway: GatewayState):
        self.app = app
        self.gw = gateway
        self.key = gateway.settings.api_key.encode("utf-8") if gateway.settings.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]  # what an exception escaping the app becomes

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            err = self._check(scope)
            if err is not None:
                await _send_error(counted_send, err)
                return
            await self.app(scope, self._limited(receive), counted_send)
        finally:
            self.gw.metrics.requests.labels(route_label(scope["path"]), str(status[0])).inc()

    def _check(self, scope) -> APIError | None:
        headers = dict(scope.get("headers") or [])
        if self.key is not None and not _open(scope):
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            # compare_digest on equal-type bytes takes time independent of where they differ
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                return APIError(
                    401,
                    "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return invalid("Invalid Content-Length header.", code="invalid_header")
            if n > self.gw.settings.max_body_bytes:
                return _too_large(self.gw.settings.max_body_bytes)
        return None

    def _limited(self, receive):
        limit = self.gw.settings.max_body_bytes
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge
            return message

        return limited_receive


def _open(scope) -> bool:
    """Routes served without the key: ``/health``, and reading the chat page's files (they hold no data; the
    page sends the key the user types on its own API calls)."""
    path = scope["path"]
    return path in OPEN_ROUTES or (path in PAGE_ROUTES and scope["method"] in ("GET", "HEAD"))


def _too_large(limit: int) -> APIError:
    return APIError(413, f"Request body too large: at most {limit} bytes.", code="request_too_large")


async def _send_error(send, err: APIError) -> None:
    body = err.json_bytes()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


try:  # a faster JSON encoder when installed (it is pulled in by `llmforge[serve]`)
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None


def json_bytes(obj: Any) -> bytes:
    """Compact UTF-8 JSON; a lone surrogate (from a JSON "\\ud800" escape in a request) is escaped, not a crash."""
    try:
        if _orjson is not None:
            return _orjson.dumps(obj)
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, UnicodeEncodeError):
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


class _JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json_bytes(content)


def error_response(err: APIError) -> JSONResponse:
    return _JSON(err.body(), status_code=err.status, headers=err.headers or None)


async def read_json(request: Request, model: type[P.BaseModel]) -> Any:
    """The request body parsed strictly into ``model``: bad UTF-8, bad JSON, NaN/Infinity and a non-object
    body are 400s; an oversized body a 413 (counted while reading, whatever Content-Length said)."""
    try:
        raw = await request.body()
    except _BodyTooLarge:
        raise _too_large(_state(request).settings.max_body_bytes) from None
    except ClientDisconnect:  # nobody will read the answer; 499 (nginx's "client closed") keeps it out of 5xx
        raise APIError(499, "Client closed the request.", code="client_closed") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise invalid(f"The request body is not valid UTF-8 (byte {e.start}).", code="invalid_json") from None

    def refuse(constant: str):
        raise ValueError(f"{constant} is not valid JSON")

    try:
        data = json.loads(text, parse_constant=refuse)
    except (ValueError, RecursionError) as e:
        raise invalid(f"The request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_json")
    if "\\ud" in text or "\\uD" in text:  # only escapes can smuggle in an unpaired UTF-16 surrogate
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise invalid("The request body contains an unpaired UTF-16 surrogate (\\ud800-\\udfff).",
                          code="invalid_json") from None  # fmt: skip
    return model.model_validate(data)


# ------------------------------------------------------------------------------------------------ app


def create_app(
    engine: Any, settings: GatewaySettings | None = None, *, filters: FilterChain | None = None
) -> FastAPI:
    """The gateway over ``engine`` (an ``AsyncEngine``; started in the background, shut down with the app)."""
    settings = settings or GatewaySettings()
    gw = GatewayState(
        engine=engine,
        settings=settings,
        filters=filters or FilterChain(),
        metrics=GatewayMetrics(engine),
        model_name=settings.served_model_name or engine.model_name,
    )
    gw.filters.bind(gw.metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        gw.start_task = asyncio.create_task(_start_engine(gw))
        try:
            yield
        finally:
            gw.status = "draining" if gw.status == "ready" else gw.status
            if gw.start_task is not None and not gw.start_task.done():
                gw.start_task.cancel()
            with contextlib.suppress(Exception):
                await engine.shutdown(timeout=settings.shutdown_timeout_s)
            with contextlib.suppress(Exception):
                await gw.filters.aclose()  # e.g. a classifier filter's HTTP client

    app = FastAPI(
        title="llmforge gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.gateway = gw
    app.add_middleware(_Guard, gateway=gw)

    async def _known_error(request: Request, exc: Exception):
        return error_response(to_api_error(exc))

    # the expected failures are answered by the exception middleware; `Exception` (a bug) reaches starlette's
    # server-error middleware, which answers with our handler and then re-raises so the traceback is logged
    for known in (LLMForgeError, ValueError, ContentFiltered):
        app.add_exception_handler(known, _known_error)
    app.add_exception_handler(Exception, _known_error)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error_response(APIError(404, f"Unknown route {request.url.path}.", code="unknown_url"))
        if exc.status_code == 405:
            return error_response(
                APIError(
                    405,
                    f"Method {request.method} not allowed on {request.url.path}.",
                    code="method_not_allowed",
                )
            )
        return error_response(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(invalid(str(exc)))

    @app.get("/health")
    async def health():
        ok = gw.status == "ready" and engine.healthy()
        body = {"status": "ok" if ok else gw.status, "model": gw.model_name, "engine": settings.engine_name}
        if gw.error:
            body["error"] = gw.error
        return _JSON(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(gw.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return P.ModelList(data=[_card(gw)]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != gw.model_name:
            raise APIError(
                404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found"
            )
        return _card(gw).model_dump()

    register_chat_page(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request, P.ChatCompletionRequest)
        gw.require_ready()
        job = await _prepare_chat(gw, body)
        return await _respond(gw, request, job)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request, P.CompletionRequest)
        gw.require_ready()
        job = await _prepare_completion(gw, body)
        return await _respond(gw, request, job)

    return app


def _card(gw: GatewayState) -> P.ModelCard:
    return P.ModelCard(
        id=gw.model_name,
        created=gw.created,
        max_model_len=gw.engine.max_model_len,
        engine=gw.settings.engine_name,
    )


async def _start_engine(gw: GatewayState) -> None:
    try:
        await gw.engine.start()
    except asyncio.CancelledError:
        raise
    except Exception as e:  # reported by /health and the server runner, never raised into the event loop
        gw.status, gw.error = "failed", str(e) or type(e).__name__
        log.error("the inference engine failed to start: %s", gw.error)
        return
    gw.status = "ready"
    log.info("engine ready: %s (%s)", gw.model_name, gw.settings.engine_name)


# ------------------------------------------------------------------------------------------------ requests


@dataclass
class _Generation:
    """One engine request: a choice of the answer."""

    index: int
    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams
    prefix: str = ""  # echoed prompt text (completions with echo)


@dataclass
class _Job:
    kind: str  # "chat" | "completions"
    id: str
    model: str
    stream: bool
    include_usage: bool
    generations: list[_Generation]
    ctx: RequestContext
    prompt_tokens: int  # each prompt once, as OpenAI counts n > 1
    t0: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=P.now)


def _check_model(gw: GatewayState, model: str | None) -> str:
    if model is not None and model != gw.model_name:
        raise invalid(
            f"The model '{model}' does not exist; this server serves '{gw.model_name}' (GET /v1/models).",
            param="model",
            code="model_not_found",
        )
    return gw.model_name


def _sampling(
    gw: GatewayState, body: P._SamplingFields, max_tokens: int, logprobs: int | None
) -> SamplingParams:
    s = gw.settings
    stop = body.stop_list()
    if len(stop) > s.max_stop:
        raise invalid(f"At most {s.max_stop} stop sequences are allowed (got {len(stop)}).", param="stop")
    vocab = gw.engine.tokenizer.info.vocab_size
    for i in body.stop_token_ids or []:
        if i >= vocab:
            raise invalid(
                f"stop_token_ids: {i} is not a token id (vocabulary size {vocab}).", param="stop_token_ids"
            )
    top_k = body.top_k or 0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if top_k < 0 else top_k,
        seed=body.seed,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        stop=stop,
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        include_stop_str_in_output=body.include_stop_str_in_output,
    )


def _fit_max_tokens(
    gw: GatewayState,
    prompt_len: int,
    requested: int | None,
    default: int | None,
    param: str,
    prompt_param: str,
) -> int:
    """``max_tokens`` for a prompt: requested (checked against the server's limit and the context), or the
    default clamped to what fits. A prompt that alone fills the context is ``context_length_exceeded``."""
    limit = gw.settings.max_tokens
    ctx_len = gw.engine.max_model_len
    if requested is not None and requested > limit:
        raise invalid(f"max_tokens is at most {limit} on this server (got {requested}).", param=param)
    room = ctx_len - prompt_len
    if room < 1:
        raise invalid(
            f"This model's maximum context length is {ctx_len} tokens. However, your prompt is {prompt_len} "
            "tokens, leaving no room for a completion. Please reduce the length of the prompt.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if requested is not None:
        if requested > room:
            raise invalid(
                f"This model's maximum context length is {ctx_len} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the completion). "
                "Please reduce the prompt or the completion length.",
                param=param,
                code="context_length_exceeded",
            )
        return requested
    return max(1, min(limit, room, default if default is not None else limit))


def _check_n(gw: GatewayState, n: int, n_prompts: int = 1) -> None:
    if n > gw.settings.max_n:
        raise invalid(f"n is at most {gw.settings.max_n} on this server (got {n}).", param="n")
    if n_prompts > MAX_PROMPTS:
        raise invalid(f"At most {MAX_PROMPTS} prompts per request (got {n_prompts}).", param="prompt")


def _check_logprobs(gw: GatewayState, wanted: bool) -> None:
    """Log-probs carry each raw token: with output filters they would show what a filter redacted or cut."""
    if wanted and gw.filters.filters_output:
        raise invalid(
            "logprobs are not available on this server: its output safety filters would be bypassed by the raw "
            "tokens they carry.",
            param="logprobs",
        )


def _seeded(params: SamplingParams, i: int) -> SamplingParams:
    if params.seed is None or i == 0:
        return params
    from dataclasses import replace

    return replace(params, seed=(params.seed + i) % (2**63))


async def _prepare_chat(gw: GatewayState, body: P.ChatCompletionRequest) -> _Job:
    model = _check_model(gw, body.model)
    _check_n(gw, body.n)
    _check_logprobs(gw, body.num_logprobs() is not None)
    rid = P.new_id("chatcmpl")
    ctx = RequestContext(request_id=rid, endpoint="chat", model=model, user=body.user)
    texts = await gw.filters.check_input(ctx, [m.text() for m in body.messages])
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": t}
        for m, t in zip(body.messages, texts, strict=True)
    ]
    tok = gw.engine.tokenizer
    try:
        rendered = tok.render(messages, add_generation_prompt=True)
    except Exception as e:  # a template's raise_exception() or a conversation it cannot render
        raise invalid(f"The chat template cannot render these messages: {e}", param="messages") from None
    ids = tok.encode(rendered)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = _fit_max_tokens(gw, len(ids), body.requested_max_tokens(), None, param, "messages")
    params = _validated(_sampling(gw, body, max_tokens, body.num_logprobs()))
    gens = [_Generation(i, 0, ids, _seeded(params, i)) for i in range(body.n)]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return _Job("chat", rid, model, body.stream, include_usage, gens, ctx, len(ids))


async def _prepare_completion(gw: GatewayState, body: P.CompletionRequest) -> _Job:
    model = _check_model(gw, body.model)
    prompts = body.prompts()
    _check_n(gw, body.n, len(prompts))
    _check_logprobs(gw, body.logprobs is not None)
    if body.echo and body.logprobs is not None:
        raise invalid("echo with logprobs (prompt log-probs) is not supported by this server.", param="echo")
    rid = P.new_id("cmpl")
    ctx = RequestContext(request_id=rid, endpoint="completions", model=model, user=body.user)
    tok = gw.engine.tokenizer
    vocab = tok.info.vocab_size
    texts: list[str] = []
    for p in prompts:
        if isinstance(p, list):
            bad = next((i for i in p if i >= vocab), None)
            if bad is not None:
                raise invalid(f"prompt: {bad} is not a token id (vocabulary size {vocab}).", param="prompt")
            texts.append(tok.decode(p))
        else:
            texts.append(p)
    filtered = await gw.filters.check_input(ctx, texts)
    gens: list[_Generation] = []
    total_prompt = 0
    for pi, (p, before, after) in enumerate(zip(prompts, texts, filtered, strict=True)):
        ids = p if isinstance(p, list) and after == before else tok.encode(after)
        if not ids:
            raise invalid("prompt: a prompt must have at least one token.", param="prompt")
        total_prompt += len(ids)
        requested = body.max_tokens if "max_tokens" in body.model_fields_set else None
        max_tokens = _fit_max_tokens(gw, len(ids), requested, 16, "max_tokens", "prompt")
        params = _validated(_sampling(gw, body, max_tokens, body.logprobs))
        for i in range(body.n):
            gens.append(_Generation(pi * body.n + i, pi, ids, _seeded(params, i), after if body.echo else ""))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return _Job("completions", rid, model, body.stream, include_usage, gens, ctx, total_prompt)


def _validated(params: SamplingParams) -> SamplingParams:
    try:
        return params.validate()
    except ValueError as e:
        msg = e.args[0] if e.args else str(e)
        param = e.args[1] if len(e.args) > 1 else None
        raise invalid(str(msg), param=param) from None


# ------------------------------------------------------------------------------------------------ running


@dataclass
class _Piece:
    """A filtered part of one choice's output, ready to send."""

    index: int
    text: str
    logprobs: list[Any] | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


_FINISH = {"stop": "stop", "length": "length"}


async def _choice_stream(gw: GatewayState, job: _Job, g: _Generation) -> AsyncIterator[_Piece]:
    """One engine request through the output filter, with TTFT / inter-token latency recorded."""
    engine = gw.engine
    rid = f"{job.id}-{g.index}"
    filt: OutputFilter = gw.filters.output(job.ctx, g.index)
    stream = engine.generate(g.prompt_ids, g.params, rid)
    gw.inflight.add(rid)
    m = gw.metrics
    last: float | None = None
    done = False
    cut = False  # an output filter ended the choice while the engine was still generating
    try:
        async for ev in stream:
            ev: GenerationEvent
            n_new = len(ev.token_ids)
            if n_new:
                t = time.perf_counter()
                if last is None:
                    m.ttft.observe(t - job.t0)
                else:
                    for _ in range(n_new):
                        m.itl.observe((t - last) / n_new)
                last = t
            verdict = await filt.push(ev.text) if ev.text else FilterVerdict("")
            finish = None
            if verdict.blocked:
                finish = "content_filter"
                cut = ev.finish_reason is None
            elif ev.finish_reason is not None:
                if ev.finish_reason not in _FINISH:
                    raise APIError(
                        503,
                        f"The generation was {ev.finish_reason} by the engine (is the server shutting down?).",
                        code="generation_aborted",
                    )
                tail = await filt.finish()
                verdict = FilterVerdict(verdict.text + tail.text, tail.blocked)
                finish = "content_filter" if tail.blocked else _FINISH[ev.finish_reason]
            if finish is not None:
                done = True
                m.finished.labels(finish).inc()
                m.completion_tokens.inc(ev.completion_tokens)
            yield _Piece(g.index, verdict.text, ev.logprobs, finish, ev.prompt_tokens, ev.completion_tokens)
            if done:
                return
        if not done:
            raise APIError(
                503, "The engine ended the generation without a finish reason.", code="engine_error"
            )
    finally:
        gw.inflight.discard(rid)
        if not done or cut:
            engine.cancel(rid)
        await stream.aclose()


async def _first_then(first: _Piece, rest: AsyncIterator[_Piece]) -> AsyncIterator[_Piece]:
    yield first
    async for p in rest:
        yield p


async def _start(gw: GatewayState, job: _Job) -> list[AsyncIterator[_Piece]]:
    """Start every choice and wait for its first piece, so that a full queue or a context error is an HTTP
    error before any byte of a streamed answer is sent."""
    streams = [_choice_stream(gw, job, g) for g in job.generations]
    try:
        firsts = await asyncio.gather(*(s.__anext__() for s in streams), return_exceptions=True)
    except BaseException:  # cancelled (the client left while queued): release every choice
        for s in streams:
            with contextlib.suppress(BaseException):
                await s.aclose()
        raise
    failed = next((f for f in firsts if isinstance(f, BaseException)), None)
    if failed is not None:
        for s in streams:
            with contextlib.suppress(BaseException):
                await s.aclose()
        if isinstance(failed, StopAsyncIteration):
            raise APIError(503, "The engine produced no output.", code="engine_error")
        raise failed
    return [_first_then(f, s) for f, s in zip(firsts, streams, strict=True)]


async def _merge(streams: list[AsyncIterator[_Piece]]) -> AsyncIterator[_Piece]:
    """The pieces of several choices in the order they come; closing this closes (cancels) them all."""
    if len(streams) == 1:
        try:
            async for p in streams[0]:
                yield p
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(s):
        try:
            async for p in s:
                await queue.put(p)
            await queue.put(end)
        except BaseException as e:
            await queue.put(e)
            raise

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is end:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _respond(gw: GatewayState, request: Request, job: _Job):
    gw.metrics.in_flight.inc()
    gw.metrics.prompt_tokens.inc(job.prompt_tokens)
    try:
        # a client that leaves while its request waits for a slot must not keep the slot reserved
        streams = await _until_disconnect(request, _start(gw, job))
    except BaseException:
        gw.metrics.in_flight.dec()
        raise
    if job.stream:
        ended = False

        async def cleanup() -> None:
            # runs whether or not the body was ever iterated: a client that leaves before the first byte
            # must still release the generations primed by _start
            nonlocal ended
            for s in streams:
                await s.aclose()
            if not ended:
                ended = True
                gw.metrics.in_flight.dec()
                gw.metrics.e2e.observe(time.perf_counter() - job.t0)

        return _SSE(
            _sse_body(gw, job, streams),
            cleanup,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        collected = await _until_disconnect(request, _collect(job, _merge(streams)))
    finally:
        gw.metrics.in_flight.dec()
        gw.metrics.e2e.observe(time.perf_counter() - job.t0)
    return _JSON(collected)


async def _until_disconnect(request: Request, work) -> Any:
    """Run ``work``; if the client goes away first, cancel it (which cancels its engine requests)."""
    task = asyncio.ensure_future(work)

    async def watch():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise APIError(499, "Client closed the request.", code="client_closed")  # never seen by anyone
    return task.result()


class _SSE(StreamingResponse):
    """A streaming response that always closes its body iterator (cancelling the engine requests behind
    it) when the client disconnects, instead of leaving it suspended for the garbage collector."""

    def __init__(self, content, cleanup, **kw):
        super().__init__(content, **kw)
        self.cleanup = cleanup

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[union-attr]
                await self.cleanup()


def _sse(obj: Any) -> bytes:
    return b"data: " + json_bytes(obj) + b"\n\n"


async def _sse_body(
    gw: GatewayState, job: _Job, streams: list[AsyncIterator[_Piece]]
) -> AsyncIterator[bytes]:
    usage_null = {"usage": None} if job.include_usage else {}
    completion_tokens: dict[int, int] = {}
    offsets = {g.index: len(g.prefix) for g in job.generations}  # completions' logprobs text_offset
    merged = _merge(streams)
    try:
        if job.kind == "chat":
            for g in job.generations:  # the role comes first, as OpenAI sends it
                yield _sse(
                    _chat_chunk(job, g.index, {"role": "assistant", "content": ""}, None, None) | usage_null
                )
        else:
            for g in job.generations:
                if g.prefix:
                    yield _sse(_completion_chunk(job, g.index, g.prefix, None, None) | usage_null)
        async for p in merged:
            completion_tokens[p.index] = p.completion_tokens
            if not p.text and p.finish_reason is None and not p.logprobs:
                continue
            if job.kind == "chat":
                lp = _chat_logprobs(p.logprobs) if p.logprobs is not None else None
                delta = {"content": p.text} if p.text else {}
                if p.text or lp is not None:
                    yield _sse(_chat_chunk(job, p.index, delta, lp, None) | usage_null)
                if p.finish_reason is not None:
                    yield _sse(_chat_chunk(job, p.index, {}, None, p.finish_reason) | usage_null)
            else:
                lp = _completion_logprobs(p.logprobs, offsets[p.index]) if p.logprobs is not None else None
                offsets[p.index] += len(p.text)
                yield _sse(_completion_chunk(job, p.index, p.text, lp, p.finish_reason) | usage_null)
        if job.include_usage:
            usage = P.Usage.of(job.prompt_tokens, sum(completion_tokens.values())).model_dump()
            head = _chat_chunk if job.kind == "chat" else _completion_chunk
            chunk = head(job, 0, {} if job.kind == "chat" else "", None, None)
            chunk["choices"] = []
            chunk["usage"] = usage
            yield _sse(chunk)
    except Exception as e:  # after the 200 is sent an error can only travel as an event
        err = to_api_error(e)
        yield _sse(err.body())
    finally:
        await merged.aclose()
    yield b"data: [DONE]\n\n"


def _chat_chunk(job: _Job, index: int, delta: dict, logprobs: dict | None, finish: str | None) -> dict:
    return {
        "id": job.id,
        "object": "chat.completion.chunk",
        "created": job.created,
        "model": job.model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
    }


def _completion_chunk(job: _Job, index: int, text: str, logprobs: dict | None, finish: str | None) -> dict:
    return {
        "id": job.id,
        "object": "text_completion",
        "created": job.created,
        "model": job.model,
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
    }


def _chat_logprobs(items: list[Any] | None) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    content = [
        entry(t.token, t.logprob) | {"top_logprobs": [entry(s, lp) for _, s, lp in t.top]}
        for t in items or []
    ]
    return {"content": content, "refusal": None}


def _completion_logprobs(items: list[Any] | None, offset: int) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for t in items or []:
        tokens.append(t.token)
        lps.append(t.logprob)
        top: dict[str, float] = {}
        for _, s, lp in t.top:
            top.setdefault(s, lp)
        tops.append(top)
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


async def _collect(job: _Job, merged: AsyncIterator[_Piece]) -> dict:
    texts = {g.index: [g.prefix] if g.prefix else [] for g in job.generations}
    lps: dict[int, list[Any]] = {g.index: [] for g in job.generations}
    finish: dict[int, str | None] = {}
    completion: dict[int, int] = {}
    async for p in merged:
        texts[p.index].append(p.text)
        if p.logprobs:
            lps[p.index].extend(p.logprobs)
        if p.finish_reason is not None:
            finish[p.index] = p.finish_reason
        completion[p.index] = p.completion_tokens
    usage = P.Usage.of(job.prompt_tokens, sum(completion.values()))
    want_lp = any(g.params.logprobs is not None for g in job.generations)
    if job.kind == "chat":
        choices = [
            P.ChatChoice(
                index=g.index,
                message=P.AssistantMessage(content="".join(texts[g.index])),
                logprobs=P.ChatLogprobs.model_validate(_chat_logprobs(lps[g.index])) if want_lp else None,
                finish_reason=finish.get(g.index),
            )
            for g in job.generations
        ]
        out = P.ChatCompletion(id=job.id, created=job.created, model=job.model, choices=choices, usage=usage)
    else:
        choices = [
            P.CompletionChoice(
                index=g.index,
                text="".join(texts[g.index]),
                logprobs=P.CompletionLogprobs.model_validate(
                    _completion_logprobs(lps[g.index], len(g.prefix))
                )
                if want_lp
                else None,
                finish_reason=finish.get(g.index),
            )
            for g in job.generations
        ]
        out = P.Completion(id=job.id, created=job.created, model=job.model, choices=choices, usage=usage)
    return out.model_dump()


__all__ = ["GatewayState", "create_app", "error_response", "read_json"]
