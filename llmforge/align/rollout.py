"""Prompts in, scored completions out: what GRPO, PPO and rejection sampling share.

* ``read_prompts`` — JSONL/Parquet rows with ``prompt`` (a string) or ``messages`` (a chat; a trailing
  assistant turn is the reference answer, kept as the field ``reference``), plus any other columns, which reward
  functions receive as keyword fields (``answer``). Errors name ``file:line``.
* ``sample`` — ``n`` completions per prompt from llmforge's inference engine (``llmforge.infer.Engine``:
  continuous batching over per-sequence KV slots, a per-request seed so a rollout is reproducible whatever
  else is in the batch). The engine is built once over the *training* model and reused: it reads the
  weights at every forward, so each rollout samples from the current policy without a copy.
* ``collate`` — samples → right-padded ``input_ids`` and aligned ``labels`` (the completion tokens, the
  stop token included so the policy learns to stop; prompt and padding are -100), and the completion mask.
* ``token_logprobs`` — per-token log-probs of the sampled tokens recomputed by a model
  (``model(ids, labels=..., output="logprobs")``, never materialising [B, T, V]). The ratio of GRPO/PPO is
  taken against these, computed by the training model itself, not against the engine's sampling log-probs,
  so numerical differences between the two code paths never bias the update.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import console
from ..errors import StageInputError, UserInputError

log = console.get_logger(__name__)

IGNORE_INDEX = -100


@dataclass
class PromptRecord:
    """One prompt: what reward functions see (``prompt``: the row's string or messages), the chat to render
    (``messages``), the extra columns (``fields``) and where it came from (``where``: ``file:line``)."""

    prompt: Any
    messages: list[dict]
    fields: dict[str, Any]
    where: str


def read_prompts(paths: Sequence[str | os.PathLike], field: str) -> list[PromptRecord]:
    """Every prompt row of ``paths`` (files or folders of JSONL/Parquet); ``field`` names the manifest knob."""
    from ..train.sft_data import conversation_from_row, iter_rows, list_sft_files

    if not paths:
        raise UserInputError(
            f"{field}: no prompt files; list JSONL or Parquet files whose rows have `prompt` (a string) or "
            "`messages` (a chat), plus the fields your reward functions read (e.g. `answer`)"
        )
    records: list[PromptRecord] = []
    for path in list_sft_files(list(paths)):
        for where, row in iter_rows(path):
            if not isinstance(row, dict):
                raise StageInputError(
                    f"{where}: a prompt row must be a JSON object, got {type(row).__name__}"
                )
            extra = {k: v for k, v in row.items() if k not in ("prompt", "messages")}
            if isinstance(row.get("prompt"), str):
                if not row["prompt"].strip():
                    raise StageInputError(f"{where}: `prompt` is empty; remove the row or give it a prompt")
                records.append(
                    PromptRecord(row["prompt"], [{"role": "user", "content": row["prompt"]}], extra, where)
                )
            elif row.get("messages") is not None:
                msgs = list(conversation_from_row({"messages": row["messages"]}, where))
                if msgs and msgs[-1]["role"] == "assistant":
                    extra.setdefault("reference", msgs[-1]["content"])
                    msgs = msgs[:-1]
                if not msgs or msgs[-1]["role"] != "user":
                    raise StageInputError(
                        f"{where}: `messages` must end with a user turn (or a user turn and its reference "
                        "answer) to be a prompt"
                    )
                records.append(PromptRecord(msgs, msgs, extra, where))
            else:
                raise StageInputError(
                    f"{where}: a prompt row needs `prompt` (a string) or `messages`; it has {sorted(row)}"
                )
    if not records:
        raise StageInputError(f"{field}: the prompt files hold no rows")
    return records


def split_held_out(records: list[PromptRecord], n_eval: int, seed: int) -> tuple[list, list]:
    """(train, held-out): the held-out prompts are those with the smallest seeded hash of their text, so the
    split is stable when rows are appended or reordered, and never trained on."""
    if n_eval <= 0:
        return records, []
    n_eval = min(n_eval, len(records) // 2)

    def key(r: PromptRecord) -> str:
        return hashlib.sha256(f"{seed}:{r.messages!r}".encode()).hexdigest()

    held = set(id(r) for r in sorted(records, key=key)[:n_eval])
    return [r for r in records if id(r) not in held], [r for r in records if id(r) in held]


def fields_of(records: Sequence[PromptRecord]) -> dict[str, list[Any]]:
    """The extra columns as keyword lists aligned with ``records`` (a column a row lacks is None)."""
    names = sorted({k for r in records for k in r.fields})
    return {k: [r.fields.get(k) for r in records] for k in names}


@dataclass
class Sample:
    """One completion of one prompt."""

    prompt_index: int  # into the records passed to ``sample``
    prompt_ids: list[int]
    completion_ids: list[int]  # with the stop token when the model stopped
    text: str  # the completion's text, without the stop token
    finish_reason: str


@dataclass
class SamplingStats:
    prompts: int = 0
    too_long: int = 0
    examples: list[str] = field(default_factory=list)


class Sampler:
    """Completions from the engine over a live model (see the module docstring)."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int, max_batch: int = 64):
        from ..infer.engine import Engine

        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.max_model_len = int(model.config.max_position_embeddings)
        self.engine = Engine(model, tokenizer, max_batch=max_batch, max_model_len=self.max_model_len)
        self.stats = SamplingStats()
        self._encoded: dict[int, list[int] | None] = {}

    def encode(self, record: PromptRecord) -> list[int] | None:
        """The rendered prompt ids, or None (counted, with its ``where``) when prompt + completion can't fit."""
        key = id(record)
        if key not in self._encoded:
            ids = self.tokenizer.encode_chat(record.messages, add_generation_prompt=True)[0]
            if len(ids) + self.max_new_tokens > self.max_model_len:
                self.stats.too_long += 1
                if len(self.stats.examples) < 5:
                    self.stats.examples.append(record.where)
                log.warning(
                    "%s: prompt of %d tokens + max_new_tokens %d exceeds the model's context (%d); skipped",
                    record.where,
                    len(ids),
                    self.max_new_tokens,
                    self.max_model_len,
                )
                ids = None
            self._encoded[key] = ids
        return self._encoded[key]

    def sample(
        self,
        records: Sequence[PromptRecord],
        n: int,
        *,
        temperature: float,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[Sample]:
        """``n`` completions of every record that fits (``n`` consecutive samples per prompt, in order).

        ``temperature=0`` is greedy. Request ``j`` of prompt ``i`` gets the seed ``seed * 1_000_003 + i * n +
        j``: the same call gives the same samples, whatever the engine batches them with.
        """
        from ..infer.engine import Request
        from ..infer.params import SamplingParams

        reqs, owners = [], []
        for i, rec in enumerate(records):
            ids = self.encode(rec)
            if ids is None:
                continue
            self.stats.prompts += 1
            for j in range(n):
                params = SamplingParams(
                    max_tokens=self.max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    seed=None if temperature == 0 else (seed * 1_000_003 + i * n + j) % (2**63),
                )
                reqs.append(Request(f"r{i}-{j}", ids, params))
                owners.append(i)
        outs = self.engine.run(reqs)
        return [
            Sample(i, list(o.prompt_token_ids), list(o.token_ids), o.text.strip(), o.finish_reason)
            for i, o in zip(owners, outs, strict=True)
        ]


def collate(samples: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` [N, T] and aligned ``labels`` (the completion tokens; -100 elsewhere).

    ``labels[:, t]`` is the token that follows ``input_ids[:, t]`` (llmforge's model does not shift), so the
    completion's k-th token is the label at position ``len(prompt) - 1 + k``; the last token is never an
    input (it predicts nothing we train on), so rows have ``len(prompt) + len(completion) - 1`` inputs.
    Right padding needs no attention mask: causal attention never looks forward into the padding.
    """
    lengths = [len(s.prompt_ids) + len(s.completion_ids) - 1 for s in samples]
    T = max(max(lengths), 1)
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), IGNORE_INDEX, dtype=torch.long)
    for b, s in enumerate(samples):
        seq = s.prompt_ids + s.completion_ids
        n = lengths[b]
        ids[b, :n] = torch.tensor(seq[:n])
        p = len(s.prompt_ids)
        if s.completion_ids:
            labels[b, p - 1 : n] = torch.tensor(s.completion_ids)
    return {"input_ids": ids, "labels": labels}


def micro_batches(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """Row slices of ``batch`` of at most ``size`` rows, each trimmed to its longest row (less padding)."""
    n = batch["input_ids"].shape[0]
    out = []
    for start in range(0, n, size):
        part = {k: v[start : start + size] for k, v in batch.items()}
        real = (part["labels"] != IGNORE_INDEX).any(0)
        width = int(real.nonzero().max()) + 1 if real.any() else 1
        out.append({k: (v[:, :width] if v.dim() == 2 else v) for k, v in part.items()})
    return out


@torch.no_grad()
def token_logprobs(model, batch: dict[str, torch.Tensor], *, micro_batch: int, device) -> torch.Tensor:
    """log π(sampled token) [N, T] for every label of ``batch`` (0 at -100), in micro-batches, no gradient."""
    ids, labels = batch["input_ids"], batch["labels"]
    out = torch.zeros(ids.shape, dtype=torch.float32)
    for start in range(0, ids.shape[0], micro_batch):
        sl = slice(start, start + micro_batch)
        lp = model(ids[sl].to(device), labels=labels[sl].to(device), output="logprobs")
        out[sl] = lp.float().cpu()
    return out


def completion_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (batch["labels"] != IGNORE_INDEX).sum(-1)


def rel(p: Path, root: Path) -> str:
    try:
        return os.path.relpath(p, root)
    except ValueError:
        return str(p)
