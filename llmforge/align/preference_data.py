"""Preference data: ``(prompt, chosen, rejected)`` rows → chat-template tokens → padded pair batches.

Shared by the reward model (``reward.py``) and the DPO family (``dpo.py``), so both read, render, split and
reject the same rows the same way.

Rows (JSONL ``.jsonl``/``.jsonl.gz`` or Parquet, read by ``sft_data.iter_rows``):

* the prompt is ``prompt`` (a string, which becomes one user turn; ``system`` adds a system turn) or
  ``messages`` (a conversation prefix, any roles, usually ending with a user turn);
* ``chosen`` and ``rejected`` are the two responses: strings (one assistant reply each) or message lists
  (a continuation, e.g. several assistant/user turns; only its assistant turns are scored);
* an optional number ``margin`` (how much better chosen is; read by the reward loss with ``reward.margin``).

Both sequences are the prompt followed by the response, rendered with the project tokenizer's chat template
(``LoadedTokenizer.encode_chat``: the ids and assistant mask transformers' ``apply_chat_template`` gives).
The response tokens are the assistant-mask tokens after the rendered prompt (its generation prompt
included), so an assistant turn inside the prompt is context, never a target.

Bad input, as in SFT: a wrong file or a row in another format is an error naming the file, line and field
(``StageInputError``) — it is never one bad row, so dropping rows would hide it. A row that is well formed
but useless is a counted skip, reported in ``PreferenceStats`` with the offending record (``file:line``, the
reason and the start of the row) and logged:

* ``identical`` — chosen == rejected: the pair carries no preference (its loss gradient is exactly zero for
  DPO and pushes a reward model nowhere);
* ``empty_response`` — a response, or an assistant turn of it, that is empty or whitespace;
* ``no_response_tokens`` — a response message list without an assistant turn;
* ``too_long`` — prompt + response longer than ``max_len`` tokens (the context of the run). Silently
  truncating a pair can cut away exactly the tokens where chosen and rejected differ, so it is dropped.

The train/validation split is by pair: a seeded hash of the pair's content below ``val_fraction`` goes to
validation, so adding rows never moves other rows between splits.

Batches (``collate``) hold the chosen sequences of the ``B`` pairs in rows ``0..B-1`` and the rejected ones in
rows ``B..2B-1`` (one forward pass for both), right-padded to the longest row. Right padding with a causal
model needs no attention mask: a real token never attends to a later (padding) position. Or packed: the 2B
sequences share rows, kept apart by ``document_ids`` (``dpo.packing``; the same log-probs without computing
padding).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..console import get_logger
from ..errors import StageInputError
from ..train.sft_data import ROLES, _check_text, iter_rows, list_sft_files

log = get_logger(__name__)

IGNORE_INDEX = -100
SKIP_REASONS = ("identical", "empty_response", "no_response_tokens", "too_long")
_MAX_EXAMPLES = 10

Messages = list[dict[str, str]]


@dataclass
class PreferenceStats:
    """What reading a preference set kept and dropped, with the first offending records."""

    rows_read: int = 0
    kept: int = 0
    train: int = 0
    val: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    examples: list[str] = field(default_factory=list)  # "file:line: reason: {row…}"

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, where: str, row: Any) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < _MAX_EXAMPLES:
            text = json.dumps(row, ensure_ascii=False, default=str)
            self.examples.append(f"{where}: {reason}: {text[:160]}{'…' if len(text) > 160 else ''}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_read": self.rows_read,
            "kept": self.kept,
            "train": self.train,
            "val": self.val,
            "skipped": dict(self.skipped),
            "examples": list(self.examples),
        }

    def describe(self) -> str:
        skips = ", ".join(f"{n} {k}" for k, n in self.skipped.items() if n) or "none skipped"
        return f"{self.kept:,} pairs ({self.train:,} train, {self.val:,} val; {skips})"


@dataclass
class PreferenceRow:
    """One parsed row: the prompt messages and the two responses as message lists."""

    where: str
    prompt: Messages
    chosen: Messages
    rejected: Messages
    margin: float = 0.0


@dataclass
class Pair:
    """A tokenized pair: the full sequences (prompt + response) and their response masks."""

    where: str
    prompt: Messages
    chosen_ids: list[int]
    chosen_mask: list[int]
    rejected_ids: list[int]
    rejected_mask: list[int]
    margin: float = 0.0
    # reference log-probs of the responses, filled by dpo.precompute_reference (summed over response tokens)
    ref_chosen: float | None = None
    ref_rejected: float | None = None


# ------------------------------------------------------------------------------------------------------
# rows
# ------------------------------------------------------------------------------------------------------


def _messages(value: Any, where: str, name: str) -> Messages:
    if not isinstance(value, list | tuple):
        raise StageInputError(
            f"{where}: field '{name}' must be a string or a list of {{role, content}} objects, got "
            f"{type(value).__name__}"
        )
    out: Messages = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise StageInputError(f"{where}: {name}[{i}] must be an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in m:
                raise StageInputError(f"{where}: {name}[{i}].{key} is missing")
        if m["role"] not in ROLES:
            raise StageInputError(
                f"{where}: {name}[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}; map other role "
                "names to these first"
            )
        out.append({"role": m["role"], "content": _check_text(m["content"], where, f"{name}[{i}].content")})
    return out


def _response(value: Any, where: str, name: str) -> Messages:
    if value is None:
        raise StageInputError(
            f"{where}: field '{name}' is missing (a preference row needs chosen and rejected)"
        )
    if isinstance(value, str | bytes | bytearray):
        return [{"role": "assistant", "content": _check_text(value, where, name)}]
    return _messages(value, where, name)


def prompt_messages(row: Mapping[str, Any], where: str) -> Messages:
    """The prompt of a row: ``messages`` (a conversation prefix) or ``prompt`` (+ optional ``system``)."""
    if row.get("messages") is not None:
        return _messages(row["messages"], where, "messages")
    if row.get("prompt") is not None:
        out: Messages = []
        if row.get("system") is not None:
            out.append({"role": "system", "content": _check_text(row["system"], where, "system")})
        p = row["prompt"]
        if isinstance(p, list | tuple):  # a conversational prompt under `prompt` (TRL's format)
            return out + _messages(p, where, "prompt")
        out.append({"role": "user", "content": _check_text(p, where, "prompt")})
        return out
    keys = ", ".join(sorted(map(str, row))[:8]) or "none"
    raise StageInputError(
        f"{where}: the row has neither 'prompt' nor 'messages' (its fields: {keys}); a preference row needs a "
        "prompt and `chosen`/`rejected` responses"
    )


def row_from_record(row: Any, where: str) -> PreferenceRow:
    """Parse one record; raises ``StageInputError`` naming ``where`` and the field for a malformed row."""
    if not isinstance(row, Mapping):
        raise StageInputError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    prompt = prompt_messages(row, where)
    chosen = _response(row.get("chosen"), where, "chosen")
    rejected = _response(row.get("rejected"), where, "rejected")
    margin = row.get("margin", 0.0)
    if margin is None:
        margin = 0.0
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not math.isfinite(margin):
        raise StageInputError(f"{where}: field 'margin' must be a finite number, got {margin!r}")
    return PreferenceRow(where, prompt, chosen, rejected, float(margin))


def skip_reason(row: PreferenceRow) -> str | None:
    """Why a well-formed row teaches nothing (``None`` if it is usable); the token-length check is later."""
    for resp in (row.chosen, row.rejected):
        turns = [m for m in resp if m["role"] == "assistant"]
        if not turns:
            return "no_response_tokens"
        if any(not m["content"].strip() for m in turns):
            return "empty_response"
    if row.chosen == row.rejected:
        return "identical"
    return None


def read_rows(
    paths: Sequence[str | os.PathLike], stats: PreferenceStats | None = None
) -> Iterator[tuple[PreferenceRow, Any]]:
    """Every usable row of ``paths`` (files or folders), with its raw record; skips are counted in ``stats``."""
    stats = stats if stats is not None else PreferenceStats()
    for path in list_sft_files(paths):
        for where, raw in iter_rows(path):
            stats.rows_read += 1
            row = row_from_record(raw, where)
            reason = skip_reason(row)
            if reason is not None:
                stats.skip(reason, where, raw)
                continue
            yield row, raw


def pair_hash(row: PreferenceRow, seed: int) -> float:
    """A uniform number in [0, 1) from the pair's content and the seed (the split rule)."""
    key = [[[m["role"], m["content"]] for m in part] for part in (row.prompt, row.chosen, row.rejected)]
    text = json.dumps(key, ensure_ascii=False, separators=(",", ":"))
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(int(seed)).encode())
    return int.from_bytes(h.digest(), "little") / 2.0**64


# ------------------------------------------------------------------------------------------------------
# tokenization
# ------------------------------------------------------------------------------------------------------


def encode_response(tokenizer, prompt: Messages, response: Messages) -> tuple[list[int], list[int]]:
    """Ids of ``prompt + response`` rendered with the chat template, and the mask of the response's
    assistant tokens (prompt tokens, including any assistant turn of the prompt, are 0)."""
    ids, mask = tokenizer.encode_chat(prompt + response)
    prompt_ids, _ = tokenizer.encode_chat(prompt, add_generation_prompt=True)
    # the shared prefix; a BPE merge across the prompt/response boundary shortens it by a token at most
    n = 0
    for a, b in zip(prompt_ids, ids, strict=False):
        if a != b:
            break
        n += 1
    return ids, [0] * n + list(mask[n:])


def tokenize_pairs(
    files: Sequence[str | os.PathLike],
    tokenizer,
    *,
    max_len: int,
    val_fraction: float,
    seed: int,
    stats: PreferenceStats | None = None,
) -> tuple[list[Pair], list[Pair], PreferenceStats]:
    """Read, check, tokenize and split a preference set: ``(train, val, stats)`` (see the module docstring).

    Raises ``StageInputError`` when no usable pair is left, with the counts and first offending records.
    """
    stats = stats if stats is not None else PreferenceStats()
    train: list[Pair] = []
    val: list[Pair] = []
    for row, raw in read_rows(files, stats):
        c_ids, c_mask = encode_response(tokenizer, row.prompt, row.chosen)
        r_ids, r_mask = encode_response(tokenizer, row.prompt, row.rejected)
        if max(len(c_ids), len(r_ids)) > max_len:
            stats.skip("too_long", row.where, raw)
            continue
        if not any(c_mask) or not any(r_mask):  # an assistant turn the template did not mark
            stats.skip("no_response_tokens", row.where, raw)
            continue
        pair = Pair(row.where, row.prompt, c_ids, c_mask, r_ids, r_mask, row.margin)
        (val if val_fraction > 0 and pair_hash(row, seed) < val_fraction else train).append(pair)
    stats.kept, stats.train, stats.val = len(train) + len(val), len(train), len(val)
    if stats.num_skipped:
        log.warning(
            "preference data: skipped %d of %d rows (%s); first: %s",
            stats.num_skipped,
            stats.rows_read,
            ", ".join(f"{n} {k}" for k, n in stats.skipped.items() if n),
            "; ".join(stats.examples[:3]),
        )
    if not train:
        detail = "; ".join(stats.examples[:3])
        raise StageInputError(
            f"no usable training pairs in {', '.join(map(str, files))} ({stats.rows_read} rows read, "
            f"{stats.num_skipped} skipped, {stats.val} held out for validation)"
            + (f"; first skipped: {detail}" if detail else "")
            + ". Fix the rows, raise seq_len for too_long pairs, or lower val_fraction"
        )
    return train, val, stats


# ------------------------------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------------------------------


def collate(pairs: Sequence[Pair], pad_id: int, pack_len: int | None = None) -> dict[str, torch.Tensor]:
    """A pair batch (see the module docstring) as int64/float32 tensors.

    Padded (``pack_len=None``): one sequence per row, chosen rows then rejected rows, right-padded with
    ``pad_id`` to the longest.

    * ``input_ids`` [2B, T];
    * ``labels`` [2B, T], aligned: ``labels[:, t]`` = ``input_ids[:, t + 1]`` where that token is a response
      token, else -100 (what ``model(..., output="logprobs")`` reads);
    * ``last`` [2B]: index of each row's last real token (where a reward model reads its score);
    * ``margin`` [B]; ``ref_logps`` [2B] when every pair has precomputed reference log-probs.

    Packed (``pack_len``: the row capacity, at least the longest sequence): the 2B sequences are packed into
    as few rows as best-fit decreasing finds, rows padded to the fullest one; ``document_ids`` [R, T] (the
    sequence's slot in its row, -1 on padding) keeps attention and positions within each sequence, and
    ``sequence`` [R, T] names the sequence (0..2B-1, chosen then rejected; -1 on padding) each token belongs
    to. The same log-probs as padded, without computing the padding (a third of the positions of typical
    preference batches); whether that is faster depends on the attention kernel (on CPU, the per-sequence
    attention of packed rows measured slower than padding, so DPO pads by default).
    """
    seqs = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    masks = [p.chosen_mask for p in pairs] + [p.rejected_mask for p in pairs]
    targets = []
    for s, m in zip(seqs, masks, strict=True):
        a = np.asarray(s, dtype=np.int64)
        t = np.full(len(s), IGNORE_INDEX, dtype=np.int64)
        t[:-1] = np.where(np.asarray(m[1:], dtype=bool), a[1:], IGNORE_INDEX)
        targets.append((a, t))
    batch: dict[str, torch.Tensor] = {
        "margin": torch.tensor([p.margin for p in pairs], dtype=torch.float32),
        "last": torch.tensor([len(s) - 1 for s in seqs], dtype=torch.int64),
    }
    if pack_len is None:
        T = max(len(s) for s in seqs)
        ids = np.full((len(seqs), T), pad_id, dtype=np.int64)
        labels = np.full((len(seqs), T), IGNORE_INDEX, dtype=np.int64)
        for i, (a, t) in enumerate(targets):
            ids[i, : len(a)], labels[i, : len(a)] = a, t
        batch["input_ids"], batch["labels"] = torch.from_numpy(ids), torch.from_numpy(labels)
    else:
        from ..train.sft_data import best_fit_decreasing

        sizes = np.asarray([len(s) for s in seqs])
        rows = best_fit_decreasing(sizes, max(int(pack_len), int(sizes.max())))
        T = max(int(sizes[r].sum()) for r in rows)
        shape = (len(rows), T)
        ids = np.full(shape, pad_id, dtype=np.int64)
        labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
        doc = np.full(shape, -1, dtype=np.int64)
        seq = np.full(shape, -1, dtype=np.int64)
        for r, members in enumerate(rows):
            pos = 0
            for slot, k in enumerate(sorted(members)):
                a, t = targets[k]
                ids[r, pos : pos + len(a)], labels[r, pos : pos + len(a)] = a, t
                doc[r, pos : pos + len(a)], seq[r, pos : pos + len(a)] = slot, k
                pos += len(a)
        batch.update(
            input_ids=torch.from_numpy(ids),
            labels=torch.from_numpy(labels),
            document_ids=torch.from_numpy(doc),
            sequence=torch.from_numpy(seq),
        )
    if all(p.ref_chosen is not None and p.ref_rejected is not None for p in pairs):
        ref = [p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs]
        batch["ref_logps"] = torch.tensor(ref, dtype=torch.float32)
    return batch


class PairBatches:
    """Endless seeded batches of ``batch_size`` pairs for this rank; a ``BatchSource`` for the core.

    Each epoch visits the pairs in a permutation that is a pure function of ``(seed, epoch)``; a global
    micro-batch is ``world_size * batch_size`` consecutive pairs of it and rank ``r`` takes the ``r``-th block,
    so the whole reader state is one integer (global pairs consumed) and resume is exact. The tail of an
    epoch shorter than a global batch is dropped (every micro-batch has ``batch_size`` pairs).
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        *,
        batch_size: int,
        pad_id: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pack_len: int | None = None,
    ):
        per_step = batch_size * world_size
        if len(pairs) < per_step:
            raise StageInputError(
                f"{len(pairs)} training pairs are fewer than one batch ({batch_size} pairs x {world_size} "
                "process(es)); lower batch_size or add pairs"
            )
        self.pairs = list(pairs)
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed
        self.rank, self.world_size, self.pack_len = rank, world_size, pack_len
        self.per_epoch = len(self.pairs) // per_step
        self.cursor = 0  # global micro-batches consumed

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))

    def __iter__(self) -> PairBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        epoch, k = divmod(self.cursor, self.per_epoch)
        order = self._order(epoch)
        start = (k * self.world_size + self.rank) * self.batch_size
        self.cursor += 1
        return collate(
            [self.pairs[i] for i in order[start : start + self.batch_size]], self.pad_id, self.pack_len
        )

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "pairs": len(self.pairs), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("pairs") != len(self.pairs):
            raise StageInputError(
                f"the checkpoint was written with {state.get('pairs')} training pairs, the data now has "
                f"{len(self.pairs)}; set resume: false to start over on the new data"
            )
        self.cursor = int(state["cursor"])


def eval_batches(
    pairs: Sequence[Pair],
    *,
    batch_size: int,
    pad_id: int,
    rank: int = 0,
    world_size: int = 1,
    limit: int | None = None,
    pack_len: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """This rank's validation batches, in file order (every pair once; ``limit`` caps the batches)."""
    mine = list(pairs)[rank::world_size]
    out = [collate(mine[i : i + batch_size], pad_id, pack_len) for i in range(0, len(mine), batch_size)]
    return out[:limit] if limit is not None else out


def resolve_files(ctx, paths: Sequence[str], field: str) -> list[Path]:
    if not paths:
        raise StageInputError(
            f"{field}: no preference data; list JSONL or Parquet files with `prompt` (or `messages`), "
            "`chosen` and `rejected` fields"
        )
    return list_sft_files([ctx.resolve(p) for p in paths])
