"""The engine behind a server: ``AsyncEngine`` (the gateway's interface) and ``LocalEngine`` (llmforge's own).

``LocalEngine`` runs the synchronous ``Engine.step()`` loop on one background thread (torch releases the GIL
in its kernels, so the event loop stays responsive) and hands each request's events to its consumer through
an ``asyncio.Queue`` (``loop.call_soon_threadsafe``). A request's stream is an async generator: closing it —
``aclose()``, ``break`` out of ``async for``, or the consuming task being cancelled (a client that
disconnects) — aborts the request, and its slot is free at the next step. This module imports no torch at
import time, so ``from llmforge.infer import AsyncEngine`` stays cheap for the gateway and the vLLM adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..console import get_logger
from .errors import EngineError, EngineNotReady, RequestError
from .params import GenerationEvent, SamplingParams

if TYPE_CHECKING:
    from .engine import Engine

log = get_logger(__name__)


class AsyncEngine:
    """What the gateway holds. ``generate`` raises ``EngineOverloaded`` / ``ContextLengthExceeded`` /
    ``RequestError`` / ``EngineNotReady`` on the first ``__anext__`` at the latest; closing the iterator
    cancels the request."""

    model_name: str
    max_model_len: int
    tokenizer: Any  # llmforge.tokenizer.info.LoadedTokenizer

    async def start(self) -> None:
        raise NotImplementedError

    async def shutdown(self, timeout: float = 10.0) -> None:
        raise NotImplementedError

    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[GenerationEvent]:
        raise NotImplementedError

    def cancel(self, request_id: str) -> None:
        raise NotImplementedError

    @property
    def num_running(self) -> int:
        raise NotImplementedError

    @property
    def num_waiting(self) -> int:
        raise NotImplementedError

    def healthy(self) -> bool:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        return {}


class _Failure:
    """Delivered instead of an event when a step raised: the stream re-raises it as an ``EngineError``."""

    def __init__(self, error: BaseException):
        self.error = error


class LocalEngine(AsyncEngine):
    """llmforge's own engine behind the ``AsyncEngine`` interface.

    engine: a built ``Engine``, or a zero-argument callable that builds one (``start`` calls it on a worker
    thread, so a server can answer 503 while weights load).
    """

    def __init__(
        self,
        engine: Engine | Callable[[], Engine],
        *,
        model_name: str,
        tokenizer: Any = None,
        max_model_len: int | None = None,
        idle_wait: float = 0.05,
    ):
        self._factory = engine if callable(engine) and not hasattr(engine, "step") else None
        self.engine: Engine | None = None if self._factory is not None else engine  # type: ignore[assignment]
        self.model_name = model_name
        self.tokenizer = tokenizer if tokenizer is not None else getattr(self.engine, "tokenizer", None)
        self.max_model_len = max_model_len or (self.engine.max_model_len if self.engine is not None else 0)
        self._idle_wait = idle_wait
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._accepting = False
        self._failed: BaseException | None = None
        self._step_errors = 0

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        if self.engine is None:
            assert self._factory is not None
            self.engine = await asyncio.to_thread(self._factory)
            self.max_model_len = self.max_model_len or self.engine.max_model_len
            if self.tokenizer is None:
                self.tokenizer = self.engine.tokenizer
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop_forever, name="llmforge-engine", daemon=True)
        self._thread.start()
        self._accepting = True
        log.info(
            "engine %s ready (%d slots, max_model_len=%d)",
            self.model_name,
            self.engine.max_batch,
            self.max_model_len,
        )

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish for up to ``timeout`` seconds, then abort the rest
        (their streams end with ``finish_reason="abort"``) and stop the thread."""
        self._accepting = False
        if self._thread is None:
            return
        engine = self.engine
        assert engine is not None
        deadline = time.monotonic() + timeout
        while engine.has_unfinished() and time.monotonic() < deadline and self._thread.is_alive():
            await asyncio.sleep(0.01)
        if engine.has_unfinished():
            log.warning(
                "shutdown: aborting %d unfinished requests after %.1fs",
                engine.num_running + engine.num_waiting,
                timeout,
            )
            engine.abort_all("abort")
            self._wake.set()
            while engine.has_unfinished() and self._thread.is_alive():
                await asyncio.sleep(0.01)
        self._stop.set()
        self._wake.set()
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def healthy(self) -> bool:
        return (
            self._accepting and self._thread is not None and self._thread.is_alive() and self._failed is None
        )

    # -- requests -------------------------------------------------------------------------------------
    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[GenerationEvent]:
        from .engine import Request

        if not self._accepting or self.engine is None:
            raise EngineNotReady(
                f"engine {self.model_name!r} is " + ("starting" if self._thread is None else "shutting down")
            )
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already streaming", "request_id")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        finished = False
        try:
            self.engine.add_request(Request(request_id, list(prompt_token_ids), params))
            self._wake.set()
            while True:
                item = await queue.get()
                if isinstance(item, _Failure):
                    finished = True
                    raise EngineError(f"generation failed: {item.error}") from item.error
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.cancel(request_id)

    def cancel(self, request_id: str) -> None:
        if self.engine is not None:
            self.engine.abort(request_id)
            self._wake.set()

    @property
    def num_running(self) -> int:
        return self.engine.num_running if self.engine is not None else 0

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting if self.engine is not None else 0

    def stats(self) -> dict[str, Any]:
        c = dict(self.engine.counters) if self.engine is not None else {}
        c.update(num_running=self.num_running, num_waiting=self.num_waiting, step_errors=self._step_errors)
        return c

    # -- the engine thread ----------------------------------------------------------------------------
    def _loop_forever(self) -> None:
        engine = self.engine
        assert engine is not None and self._loop is not None
        while not self._stop.is_set():
            if not engine.has_unfinished():
                self._wake.wait(self._idle_wait)
                self._wake.clear()
                continue
            try:
                events = engine.step()
            except Exception as err:  # a failed step must not kill the server: fail its requests instead
                self._step_errors += 1
                log.exception("engine step failed; aborting the running requests")
                failed = engine.unfinished_ids()
                engine.abort_all("abort")
                try:
                    engine.step()  # drops the aborted sequences and frees their slots
                except Exception:  # pragma: no cover - the engine is broken beyond one request
                    self._failed = err
                self._deliver_threadsafe([(rid, _Failure(err)) for rid in failed])
                continue
            if events:
                self._deliver_threadsafe([(ev.request_id, ev) for ev in events])

    def _deliver_threadsafe(self, items: list[tuple[str, Any]]) -> None:
        # RuntimeError: the event loop is closed, nobody is listening any more
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._deliver, items)  # type: ignore[union-attr]

    def _deliver(self, items: list[tuple[str, Any]]) -> None:
        for rid, item in items:
            q = self._streams.get(rid)
            if q is not None:
                q.put_nowait(item)


def resolve_device(device: str) -> str:
    """``"auto"`` → ``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """``"auto"`` → bfloat16 on a GPU that supports it, float32 elsewhere (CPU bf16 matmuls are slow on most
    CPUs and change numerics)."""
    import torch

    if dtype != "auto":
        return dtype
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def load_engine(
    model_dir: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    max_batch: int = 16,
    max_queue: int = 256,
    max_model_len: int | None = None,
    model_name: str | None = None,
    prefill_chunk: int = 256,
    max_num_batched_tokens: int | None = None,
    quantized: str = "dequantize",
) -> LocalEngine:
    """A ``LocalEngine`` over the Hugging Face checkpoint in ``model_dir`` (weights load in ``start()``).

    The tokenizer (and so the chat template, stop ids and ``max_model_len``) is read now, so a gateway can
    validate requests while the weights load. model_name defaults to the directory name.

    A GPTQ checkpoint (``quantization_config.quant_method: gptq``) loads through ``llmforge.quantize.load``:
    ``quantized="dequantize"`` turns every quantized projection into the float weight it encodes once, at load
    (float speed and memory; any device); ``"packed"`` keeps them 4-bit in memory and multiplies with torch's
    int4 CPU kernel where a layer fits it, unpacking per call elsewhere (and on CUDA).
    """
    import json

    from ..errors import CheckpointError
    from ..tokenizer.info import load_tokenizer

    d = Path(model_dir)
    config_path = d / "config.json"
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config_path}: cannot read the model config ({err})") from None
    limit = int(raw.get("max_position_embeddings", 0)) or None
    if max_model_len is not None and limit is not None and max_model_len > limit:
        raise CheckpointError(
            f"max_model_len={max_model_len} exceeds {config_path}'s max_position_embeddings={limit}; lower it"
        )
    if quantized not in ("dequantize", "packed"):
        raise ValueError(f"quantized={quantized!r}: choose 'dequantize' or 'packed'")
    tokenizer = load_tokenizer(d)
    length = max_model_len or limit or 2048
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    gptq = bool(raw.get("quantization_config")) and (
        str(raw["quantization_config"].get("quant_method", "")).lower() == "gptq"
    )

    def build() -> Engine:
        from ..model.checkpoint import load_pretrained
        from ..model.llama import torch_dtype
        from .engine import Engine

        if gptq:
            from ..quantize.load import load_model

            model = load_model(d, device=dev, dtype=torch_dtype(dt), quantized=quantized)
        else:
            model = load_pretrained(d, device=dev, dtype=dt)
        return Engine(
            model,
            tokenizer,
            max_batch=max_batch,
            max_model_len=length,
            max_queue=max_queue,
            prefill_chunk=prefill_chunk,
            max_num_batched_tokens=max_num_batched_tokens,
        )

    return LocalEngine(build, model_name=model_name or d.name, tokenizer=tokenizer, max_model_len=length)
