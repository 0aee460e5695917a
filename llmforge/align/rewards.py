"""Rewards for GRPO, PPO and rejection sampling: verifiable reward functions, the reward model, and their sum.

A reward function follows TRL's convention::

    fn(prompts: list, completions: list[str], **fields) -> list[float]

``prompts[i]`` is the i-th completion's prompt as the data gave it (a string for ``prompt`` rows, the message
list for ``messages`` rows), ``completions[i]`` the generated text, and every other column of the prompt file
arrives as a keyword of the same length (``answer=[...]``), so a function reads the fields it needs and
ignores the rest (``**_``). Functions are named in the manifest (``align.rewards.functions``) as a built-in
or ``module:function``, with a weight and keyword ``args``; the reward of a completion is

    r = Σ_k w_k · f_k(prompt, completion)  (+ w_rm · RM(prompt, completion) with ``reward_model: true``)

Built-ins (verifiable rewards, the DeepSeek-R1 style): ``exact_match`` (the answer a regex extracts equals a
field), ``regex`` (the completion matches a format), ``numeric`` (the extracted number is within a tolerance of
a field), ``length_penalty`` (0 up to a length, then linearly negative).

Bad rewards never reach the optimizer. The policy, per function and batch:

* the function raises, returns something that is not a list of numbers, or a list of the wrong length → its
  rewards for the *whole batch* are 0 (the other functions still count), a warning names the function, the
  error and the first record of the batch;
* a NaN or infinite value → that completion's reward from that function is 0, a warning names the record.

Every such event is counted (``RewardStats``) and the counts and first offending records land in the stage's
metrics and report, so a broken reward is visible rather than silently training on zeros.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import console
from ..errors import UserInputError

log = console.get_logger(__name__)

RewardFn = Callable[..., Sequence[float]]
#: ``(prompts_as_messages, completions) -> scores``: the reward model behind a simple callable
Scorer = Callable[[list[list[dict]], list[str]], Sequence[float]]

ANSWER_PATTERN = r"The answer is (-?\d+(?:\.\d+)?)"
NUMBER_PATTERN = r"The answer is (-?\d[\d,]*(?:\.\d+)?)"  # thousands separators allowed


# ----------------------------------------------------------------------------------------------------
# built-in verifiable rewards
# ----------------------------------------------------------------------------------------------------


def _extract(pattern: re.Pattern[str], text: str) -> str | None:
    """The first capture group (or the whole match) of the *last* match: a model that thinks aloud states its
    final answer last."""
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    return (m.group(1) if m.groups() else m.group(0)).strip()


def _field(fields: dict[str, Any], name: str, fn: str, n: int) -> list[Any]:
    if name not in fields:
        raise UserInputError(
            f"reward {fn} reads the field {name!r}, which the prompt rows do not have (they have "
            f"{sorted(fields) or 'no extra fields'}); add it to every prompt row or set args.field"
        )
    values = list(fields[name])
    if len(values) != n:
        raise UserInputError(f"reward {fn}: field {name!r} has {len(values)} values for {n} completions")
    return values


def exact_match(
    prompts: Sequence[Any],
    completions: Sequence[str],
    *,
    pattern: str = ANSWER_PATTERN,
    field: str = "answer",
    **fields: Any,
) -> list[float]:
    """1.0 when the answer ``pattern`` extracts (its first group, from the last match) equals the row's
    ``field`` as text (both stripped), else 0.0 — also when nothing matches."""
    rx = re.compile(pattern)
    refs = _field(fields, field, "exact_match", len(completions))
    out = []
    for c, ref in zip(completions, refs, strict=True):
        got = _extract(rx, c)
        out.append(1.0 if got is not None and got == str(ref).strip() else 0.0)
    return out


def regex(
    prompts: Sequence[Any],
    completions: Sequence[str],
    *,
    pattern: str,
    full: bool = True,
    **_: Any,
) -> list[float]:
    """1.0 when the completion (stripped) matches ``pattern`` — the whole text with ``full`` (a format reward),
    anywhere otherwise — else 0.0."""
    rx = re.compile(pattern, re.DOTALL)
    match = rx.fullmatch if full else rx.search
    return [1.0 if match(c.strip()) else 0.0 for c in completions]


def numeric(
    prompts: Sequence[Any],
    completions: Sequence[str],
    *,
    pattern: str = NUMBER_PATTERN,
    field: str = "answer",
    tolerance: float = 1e-6,
    relative: bool = False,
    **fields: Any,
) -> list[float]:
    """1.0 when the number ``pattern`` extracts is within ``tolerance`` of the row's ``field`` (absolute, or
    relative to |field| with ``relative``), else 0.0; unparsable numbers score 0."""
    rx = re.compile(pattern)
    refs = _field(fields, field, "numeric", len(completions))
    out = []
    for c, ref in zip(completions, refs, strict=True):
        got = _extract(rx, c)
        try:
            x, y = float(got.replace(",", "")), float(str(ref).replace(",", ""))  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            out.append(0.0)
            continue
        bound = tolerance * abs(y) if relative else tolerance
        out.append(1.0 if math.isfinite(x) and abs(x - y) <= bound else 0.0)
    return out


def length_penalty(
    prompts: Sequence[Any],
    completions: Sequence[str],
    *,
    max_chars: int = 200,
    scale: float = 1.0,
    **_: Any,
) -> list[float]:
    """0 up to ``max_chars`` characters, then ``-scale · (len - max_chars) / max_chars``: discourages rambling
    without rewarding empty answers (use it with a negative-free task reward)."""
    if max_chars <= 0:
        raise UserInputError(f"length_penalty: max_chars must be > 0 (got {max_chars})")
    return [-scale * max(0, len(c) - max_chars) / max_chars for c in completions]


BUILTINS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "regex": regex,
    "numeric": numeric,
    "length_penalty": length_penalty,
}


def load_function(name: str, where: str) -> RewardFn:
    """A built-in by name or ``module:function`` imported; errors name ``where`` (the manifest field)."""
    if name in BUILTINS:
        return BUILTINS[name]
    if ":" not in name:
        raise UserInputError(
            f"{where}: unknown reward {name!r}; use a built-in ({', '.join(BUILTINS)}) or `module:function` "
            "with the signature (prompts, completions, **fields) -> list[float]"
        )
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or the module's own import-time error
        raise UserInputError(
            f"{where}: cannot import module {module_name!r} ({type(err).__name__}: {err}); make it importable "
            "(installed, or on PYTHONPATH / beside llmforge.yaml)"
        ) from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise UserInputError(f"{where}: module {module_name!r} has no callable {attr!r}")
    return fn


# ----------------------------------------------------------------------------------------------------
# the weighted sum, with the bad-output policy
# ----------------------------------------------------------------------------------------------------


@dataclass
class RewardStats:
    """Counts of bad reward outputs and the first offending records (see the module docstring)."""

    errors: int = 0  # batches where a function raised or returned the wrong type/length
    non_finite: int = 0  # single values that were NaN/Inf
    examples: list[dict[str, Any]] = field(default_factory=list)
    max_examples: int = 5

    def record(self, kind: str, name: str, message: str, prompt: Any, completion: str) -> None:
        if kind == "error":
            self.errors += 1
        else:
            self.non_finite += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(
                {
                    "reward": name,
                    "problem": kind,
                    "message": message,
                    "prompt": prompt,
                    "completion": completion,
                }
            )

    def as_metrics(self) -> dict[str, int]:
        return {"reward_errors": self.errors, "reward_non_finite": self.non_finite}


@dataclass
class RewardBatch:
    total: list[float]  # the weighted sum per completion
    parts: dict[str, list[float]]  # each source's raw rewards (after the bad-output policy)


@dataclass
class _Source:
    name: str  # as written in the manifest, made unique (`exact_match`, `exact_match#2`)
    weight: float
    fn: Callable[[list[Any], list[str], dict[str, list[Any]]], Sequence[float]]


class Rewards:
    """The reward of a completion: the weighted sum of the manifest's functions and the reward model."""

    def __init__(self, sources: list[_Source]):
        if not sources:
            raise UserInputError(
                "align.rewards: no reward source; list reward functions under align.rewards.functions "
                "(e.g. `- name: exact_match`) or set align.rewards.reward_model: true"
            )
        self.sources = sources
        self.stats = RewardStats()

    @classmethod
    def from_config(cls, cfg, scorer: Scorer | None = None, field: str = "align.rewards") -> Rewards:
        """From a ``RewardSources`` section; ``scorer`` is the reward model (required with ``reward_model``)."""
        sources: list[_Source] = []
        seen: dict[str, int] = {}
        for i, spec in enumerate(cfg.functions):
            where = f"{field}.functions[{i}].name"
            fn = load_function(spec.name, where)
            args = dict(spec.args)
            if spec.name in BUILTINS:
                _check_builtin_args(spec.name, fn, args, f"{field}.functions[{i}].args")
            seen[spec.name] = seen.get(spec.name, 0) + 1
            label = spec.name if seen[spec.name] == 1 else f"{spec.name}#{seen[spec.name]}"
            sources.append(_Source(label, spec.weight, _bind(fn, args)))
        if cfg.reward_model:
            if scorer is None:
                raise UserInputError(
                    f"{field}.reward_model is true but no reward model is available; enable the `reward` "
                    "stage (and run it) or set it to false"
                )
            sources.append(_Source("reward_model", cfg.reward_model_weight, _bind_scorer(scorer)))
        return cls(sources)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[str], fields: dict[str, list[Any]]
    ) -> RewardBatch:
        n = len(completions)
        prompts, completions = list(prompts), list(completions)
        total = [0.0] * n
        parts: dict[str, list[float]] = {}
        for src in self.sources:
            values = self._safe(src, prompts, completions, fields)
            parts[src.name] = values
            for i, v in enumerate(values):
                total[i] += src.weight * v
        return RewardBatch(total=total, parts=parts)

    def _safe(self, src: _Source, prompts: list, completions: list[str], fields: dict) -> list[float]:
        n = len(completions)
        first = (prompts[0] if prompts else None, completions[0] if completions else "")
        try:
            raw = src.fn(prompts, completions, fields)
        except UserInputError:
            raise  # a configuration error (a missing field, bad args): stop and say what to change
        except Exception as err:
            msg = f"raised {type(err).__name__}: {err}"
            self._warn_batch(src, msg, first)
            return [0.0] * n
        try:
            values = [float(v) for v in raw]
        except (TypeError, ValueError) as err:
            self._warn_batch(src, f"returned {type(raw).__name__}, not a list of numbers ({err})", first)
            return [0.0] * n
        if len(values) != n:
            self._warn_batch(src, f"returned {len(values)} rewards for {n} completions", first)
            return [0.0] * n
        for i, v in enumerate(values):
            if not math.isfinite(v):
                self.stats.record("non_finite", src.name, f"returned {v}", prompts[i], completions[i])
                log.warning(
                    "reward %s returned %s for prompt %r / completion %r; counted as 0",
                    src.name,
                    v,
                    _short(prompts[i]),
                    _short(completions[i]),
                )
                values[i] = 0.0
        return values

    def _warn_batch(self, src: _Source, msg: str, first: tuple[Any, str]) -> None:
        self.stats.record("error", src.name, msg, first[0], first[1])
        log.warning(
            "reward %s %s on a batch (first record: prompt %r / completion %r); its rewards for this batch "
            "count as 0 (%d such batches so far)",
            src.name,
            msg,
            _short(first[0]),
            _short(first[1]),
            self.stats.errors,
        )


def _check_builtin_args(name: str, fn: RewardFn, args: dict, where: str) -> None:
    import inspect

    params = inspect.signature(fn).parameters
    allowed = {p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise UserInputError(f"{where}: {name} has no argument {unknown[0]!r}; it takes {sorted(allowed)}")
    missing = [p for p in allowed if params[p].default is inspect.Parameter.empty and p not in args]
    if missing:
        raise UserInputError(f"{where}: {name} needs {missing[0]!r} (e.g. args: {{{missing[0]}: ...}})")
    if "pattern" in args:
        try:
            re.compile(args["pattern"])
        except re.error as err:
            raise UserInputError(f"{where}.pattern: not a valid regular expression ({err})") from None


def _bind(fn: RewardFn, args: dict):
    def call(prompts, completions, fields):
        return fn(prompts, completions, **{**fields, **args})

    return call


def _bind_scorer(scorer: Scorer):
    def call(prompts, completions, fields):
        return scorer([_as_messages(p) for p in prompts], completions)

    return call


def _as_messages(prompt: Any) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _short(x: Any, n: int = 120) -> str:
    s = x if isinstance(x, str) else repr(x)
    return s if len(s) <= n else s[: n - 1] + "…"


def reward_model_scorer(model_dir, *, device="cpu", batch_size: int = 16) -> Scorer:
    """The `reward` stage's model as a ``Scorer``: prompt messages + completion → its scalar score.

    Scoring itself is ``llmforge.align.reward.score`` (the reward model's own module renders the
    conversation with the chat template exactly as it was trained).
    """
    from . import reward as rm  # engineer P's module

    model, tokenizer = rm.load_reward_model(model_dir, device=device)

    def score(prompts: list[list[dict]], completions: list[str]) -> list[float]:
        return list(rm.score(model, tokenizer, prompts, completions, batch_size=batch_size))

    return score
