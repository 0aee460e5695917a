"""The OpenAI wire format: request and response models for completions, chat completions and models.

One module mirrors the spec so the routes stay thin and every engine answers in the same shape. Requests are
validated strictly, as OpenAI's own API does: ``"max_tokens": "5"`` or ``"stream": "yes"`` is a 400, not a
silent coercion, and NaN/Infinity are refused by the JSON reader (``gateway.read_json``).

Unknown parameters, and which known ones are ignored
----------------------------------------------------
* A top-level key OpenAI does not define is rejected (400, "Unrecognized request argument supplied: KEY"),
  as OpenAI rejects it. ``top_k``, ``ignore_eos``, ``stop_token_ids``, ``include_stop_str_in_output`` and
  ``min_tokens`` are extensions (vLLM's names), sent by the `openai` client through ``extra_body``.
* Accepted and ignored, as OpenAI ignores or tolerates them for a text-only model: ``user``, ``metadata``,
  ``store``, ``service_tier``, ``parallel_tool_calls``, ``reasoning_effort``, ``prompt_cache_key``,
  ``safety_identifier``, ``modalities: ["text"]``, ``response_format: {"type": "text"}``, ``tool_choice:
  "none"``, empty ``tools`` / ``functions`` / ``logit_bias``, ``best_of`` equal to ``n``.
* Rejected because honouring them is not possible here (400 naming the parameter, never a silent
  difference): tools and function calls, JSON / schema response formats, ``logit_bias`` entries, audio output,
  predicted outputs, web search, image and audio content parts, ``suffix``, ``best_of`` other than ``n``.
* ``model`` may be omitted (an extension, as in vLLM): the served model answers.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# OpenAI's own bounds
MAX_SEED = 2**63 - 1
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 20


class ProtocolError(ValueError):
    """A request that is well-typed JSON but asks for something not allowed; becomes a 400 naming ``param``."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class _Request(BaseModel):
    # strict: no "5" -> 5 or "yes" -> True coercions; forbid: unknown keys are a 400, as on OpenAI's API
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# ------------------------------------------------------------------------------------------------ shared


class StreamOptions(_Request):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted and ignored (no obfuscation padding is sent)


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _SamplingFields(_Request):
    """Parameters both endpoints share."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=MAX_SEED)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # extensions (vLLM's names)
    top_k: int | None = Field(default=None, ge=-1, le=1_000_000)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    min_tokens: int | None = Field(default=None, ge=0, le=0)  # only 0: the engine has no minimum length

    @model_validator(mode="after")
    def _common_checks(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when 'stream' is enabled")
        if self.logit_bias:
            raise ValueError(
                "logit_bias: not supported by this server (send an empty object or leave it out)"
            )
        if isinstance(self.stop, list):
            for s in self.stop:
                if not s:
                    raise ValueError("stop: stop strings must not be empty")
        if self.stop == "":
            raise ValueError("stop: stop strings must not be empty")
        for i in self.stop_token_ids or []:
            if i < 0:
                raise ValueError("stop_token_ids: token ids must be >= 0")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# ------------------------------------------------------------------------------------------------ chat


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatMessage:
        if self.tool_calls or self.function_call:
            raise ValueError("tool calls are not supported by this server")
        if self.role in ("tool", "function"):
            raise ValueError(f"role {self.role!r}: tool messages are not supported by this server")
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content: a {self.role} message needs content")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=2**31)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=2**31)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # accepted and ignored / refused when they ask for what a text-only model cannot do (module docstring)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @model_validator(mode="after")
    def _chat_checks(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: only allowed when 'logprobs' is true")
        if self.tools or self.functions:
            raise ValueError("tools: tool and function calling are not supported by this server")
        if self.tool_choice not in (None, "none") or self.function_call not in (None, "none"):
            raise ValueError("tool_choice: tool and function calling are not supported by this server")
        if self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format: only {'type': 'text'} is supported by this server")
        if (self.modalities and "audio" in self.modalities) or self.audio is not None:
            raise ValueError("modalities: audio output is not supported by this server")
        if self.prediction is not None:
            raise ValueError("prediction: predicted outputs are not supported by this server")
        if self.web_search_options is not None:
            raise ValueError("web_search_options: web search is not supported by this server")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# ------------------------------------------------------------------------------------------------ completions


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1, le=2**31)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1, le=128)
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_checks(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix: insertion (suffix) is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of == n is supported by this server")
        if isinstance(self.prompt, list):
            if not self.prompt:
                raise ValueError("prompt: must not be empty")
            for p in self.prompt:
                if isinstance(p, list) and not p:
                    raise ValueError("prompt: a token-id prompt must not be empty")
                if (isinstance(p, int) and p < 0) or (isinstance(p, list) and any(i < 0 for i in p)):
                    raise ValueError("prompt: token ids must be >= 0")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# ------------------------------------------------------------------------------------------------ models


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmforge"
    max_model_len: int | None = None
    engine: str | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ------------------------------------------------------------------------------------------------ errors


class ErrorBody(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorBody
