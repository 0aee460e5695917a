"""What a request asks for and what its stream yields: plain values, no torch (the gateway imports them).

``SamplingParams`` mirrors the OpenAI/vLLM knobs one request may set; ``GenerationEvent`` is one step of a
request's stream (newly released text, the tokens behind it, their log-probs, and at the end a finish reason).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import RequestError

# OpenAI's documented ranges (penalties in [-2, 2], at most 20 top log-probs).
MAX_PENALTY = 2.0
MAX_LOGPROBS = 20

FINISH_REASONS = ("stop", "length", "cancelled", "abort")


@dataclass
class SamplingParams:
    """One request's sampling. ``validate()`` raises ``RequestError(message, param)`` (a ``ValueError``).

    Processing order on each step's logits, as in vLLM: frequency/presence penalties (over the tokens this
    request generated so far), then greedy argmax when ``temperature == 0``, else division by the temperature,
    top-k, top-p, and a draw from the request's own generator.
    """

    max_tokens: int = 16  # new tokens at most; finish_reason "length" when reached
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 (or -1) = off
    seed: int | None = None  # a per-request generator: same seed, same output, whatever else runs
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence of a token already generated
    stop: list[str] = field(default_factory=list)  # stop strings (held back while they may still match)
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the tokenizer's stop ids
    ignore_eos: bool = False  # do not stop at the tokenizer's / model's EOS ids (stop_token_ids still stop)
    logprobs: int | None = None  # None = off; k >= 0 = chosen token's log-prob + k top alternatives
    include_stop_str_in_output: bool = False  # keep the matched stop string at the end of the text

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    def validate(self) -> SamplingParams:
        """Check every field's type and range; return self. Raises ``RequestError(msg, param)``."""

        def number(name: str, value: object) -> float:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise RequestError(f"{name} must be a finite number (got {value!r})", name)
            return float(value)

        def integer(name: str, value: object) -> int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise RequestError(f"{name} must be an integer (got {value!r})", name)
            return value

        if integer("max_tokens", self.max_tokens) < 1:
            raise RequestError(f"max_tokens must be >= 1 (got {self.max_tokens})", "max_tokens")
        if number("temperature", self.temperature) < 0:
            raise RequestError(f"temperature must be >= 0 (got {self.temperature})", "temperature")
        if not 0 < number("top_p", self.top_p) <= 1:
            raise RequestError(f"top_p must be in (0, 1] (got {self.top_p})", "top_p")
        if integer("top_k", self.top_k) < -1:
            raise RequestError(f"top_k must be >= 1, or 0 / -1 for off (got {self.top_k})", "top_k")
        if self.seed is not None:
            integer("seed", self.seed)
        for name in ("presence_penalty", "frequency_penalty"):
            if abs(number(name, getattr(self, name))) > MAX_PENALTY:
                raise RequestError(
                    f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}] (got {getattr(self, name)})", name
                )
        if not isinstance(self.stop, list | tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError(f"stop must be a list of non-empty strings (got {self.stop!r})", "stop")
        if not isinstance(self.stop_token_ids, list | tuple) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise RequestError(
                f"stop_token_ids must be a list of token ids >= 0 (got {self.stop_token_ids!r})",
                "stop_token_ids",
            )
        if self.logprobs is not None and not 0 <= integer("logprobs", self.logprobs) <= MAX_LOGPROBS:
            raise RequestError(f"logprobs must be in [0, {MAX_LOGPROBS}] (got {self.logprobs})", "logprobs")
        return self


@dataclass
class TokenLogprob:
    """One generated token's raw model log-probability and the ``k`` most likely alternatives.

    Raw means ``log_softmax`` of the model's logits before penalties, temperature and top-k/top-p (what
    OpenAI returns and vLLM's default ``raw_logprobs`` mode), so the numbers do not depend on sampling knobs.
    """

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]  # (id, text, logprob), most likely first


@dataclass
class GenerationEvent:
    """What a request's stream yields after each engine step that produced tokens for it (and once at the end).

    finish_reason: None while running; then "stop" (EOS, a stop id, a stop string or a stop criterion),
    "length" (max_tokens or the context is full), "cancelled" (``abort``/``cancel``) or "abort" (engine
    shutdown or failure). Concatenating every event's ``text`` gives the whole completion.
    """

    request_id: str
    text: str  # newly released text (may be "" when a stop string or half a character is held back)
    token_ids: list[int]  # the tokens that produced it
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
