"""Calibration sequences and held-out evaluation windows, from the project's own data.

* ``data``: ``calibration_samples`` disjoint windows of ``calibration_seq_len`` tokens, drawn at random (seeded)
  from the **train** split of the tokenizer stage's token shards — the data stage's corpus as pretraining
  saw it, documents packed with their EOS, the way GPTQ's reference code samples C4. Perplexity is measured
  on the **val** split, which the tokenizer stage holds out of everything (tokenizer training included), so
  calibration never sees an evaluation token.
* ``sft``: conversations of ``sft.data`` rendered with the model's own chat template (the format the model
  will answer in), cut to ``calibration_seq_len``.

Both return plain token-id lists plus a description (source, counts, a hash of the ids) for lineage.

Held-out evaluation follows the same source by default (``quantize.eval_on: auto``): the val split of the
shards (``eval_windows``), or, for ``sft``, conversations from the *other end* of the same seeded shuffle that
calibration draws from (``sft_eval_windows``), so the two never share a conversation and a chat model is
scored on the text it answers, not on web pages it was fine-tuned away from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StageInputError


@dataclass
class Calibration:
    sequences: list[list[int]]
    info: dict[str, Any] = field(default_factory=dict)


def ids_sha256(seqs: list[list[int]]) -> str:
    h = hashlib.sha256()
    for s in seqs:
        h.update(np.asarray(s, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def from_shards(shards: Path, samples: int, seq_len: int, seed: int) -> Calibration:
    """Disjoint random windows of the train split (see the module docstring)."""
    from ..shards import ShardIndex

    split = ShardIndex.load(shards).open("train")
    n = len(split)
    windows = n // seq_len
    if windows < samples:
        raise StageInputError(
            f"quantize.calibration_samples: {samples} sequences of {seq_len} tokens asked, but the train split "
            f"of {shards} holds {n} tokens ({windows} windows); lower quantize.calibration_samples or "
            "quantize.calibration_seq_len, or give the data stage more text"
        )
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(windows, size=samples, replace=False)) * seq_len
    seqs = [split.read(int(s), seq_len).astype(np.int64).tolist() for s in starts]
    info = {
        "source": "data",
        "path": str(shards),
        "split": "train",
        "samples": samples,
        "seq_len": seq_len,
        "tokens": samples * seq_len,
        "seed": seed,
        "ids_sha256": ids_sha256(seqs),
    }
    return Calibration(seqs, info)


def from_sft(
    paths: list[Path], tokenizer_dir: Path, samples: int, seq_len: int, seed: int, min_tokens: int = 8
) -> Calibration:
    """The first ``samples`` conversations in a seeded shuffle of ``paths``, rendered with the chat template."""
    from ..tokenizer.info import load_tokenizer
    from ..train.sft_data import read_conversations

    if not paths:
        raise StageInputError(
            "quantize.calibration: sft needs conversations; set sft.data (JSONL/Parquet of `messages`) or use "
            "calibration: data"
        )
    tok = load_tokenizer(tokenizer_dir)
    if not tok.info.chat_template:
        raise StageInputError(
            f"{tokenizer_dir}: the model has no chat template; calibration: sft renders conversations with it"
        )
    convs = [conv for _where, conv in read_conversations(paths)]
    order = np.random.default_rng(seed).permutation(len(convs))  # sft_eval_windows reads it from the end
    seqs: list[list[int]] = []
    for i in order:
        ids, _mask = tok.encode_chat(convs[int(i)])
        if len(ids) >= min_tokens:
            seqs.append(list(ids[:seq_len]))
        if len(seqs) == samples:
            break
    if len(seqs) < samples:
        raise StageInputError(
            f"quantize.calibration_samples: {samples} conversations asked, but {', '.join(map(str, paths))} "
            f"hold only {len(seqs)} usable ones (of {len(convs)}, at least {min_tokens} tokens each); lower "
            "quantize.calibration_samples or use calibration: data"
        )
    info = {
        "source": "sft",
        "path": [str(p) for p in paths],
        "samples": samples,
        "seq_len": seq_len,
        "tokens": sum(len(s) for s in seqs),
        "seed": seed,
        "ids_sha256": ids_sha256(seqs),
    }
    return Calibration(seqs, info)


def eval_windows(shards: Path, max_tokens: int, seq_len: int) -> list[np.ndarray]:
    """Consecutive ``seq_len + 1``-token windows (inputs + shifted targets) of the val split, up to ``max_tokens``."""
    from ..shards import ShardIndex

    index = ShardIndex.load(shards)
    if index.num_tokens("val") == 0:
        raise StageInputError(
            f"{shards}: the val split is empty, nothing held out to measure perplexity on; set the tokenizer "
            "stage's val_fraction above 0 and re-run it"
        )
    split = index.open("val")
    n = min(len(split), max_tokens + 1)
    if n < seq_len + 1:
        seq_len = n - 1
    if seq_len < 2:
        raise StageInputError(
            f"{shards}: the val split holds {len(split)} tokens, too few to measure perplexity; raise the "
            "tokenizer stage's val_fraction"
        )
    return [split.read(s, seq_len + 1).astype(np.int64) for s in range(0, n - seq_len, seq_len)]


def sft_eval_windows(
    paths: list[Path], tokenizer_dir: Path, max_tokens: int, seq_len: int, seed: int, reserved: int
) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, Any]]:
    """(windows, masks, info): consecutive ``seq_len + 1``-token windows of rendered conversations taken from the
    end of the seeded shuffle ``from_sft`` draws calibration from (its first ``reserved`` conversations are never
    used here), and per window which targets are the assistant's (what a chat model is scored on)."""
    from ..tokenizer.info import load_tokenizer
    from ..train.sft_data import read_conversations

    if not paths:
        raise StageInputError(
            "quantize.eval_on: sft needs conversations; set sft.data (JSONL/Parquet of `messages`) or use "
            "eval_on: data"
        )
    tok = load_tokenizer(tokenizer_dir)
    convs = [conv for _where, conv in read_conversations(paths)]
    order = np.random.default_rng(seed).permutation(len(convs))
    stream: list[int] = []
    mask: list[int] = []
    used = 0
    for i in order[::-1][: max(len(convs) - reserved, 0)]:
        ids, m = tok.encode_chat(convs[int(i)])
        stream.extend(ids)
        mask.extend(m)
        used += 1
        if sum(mask) > max_tokens and len(stream) > seq_len:
            break
    n = len(stream)
    seq_len = min(seq_len, n - 1)
    if seq_len < 2 or not any(mask):
        raise StageInputError(
            f"quantize.eval_on: sft: {', '.join(map(str, paths))} hold no conversations beyond the "
            f"{reserved} used for calibration; add conversations, lower quantize.calibration_samples, or use "
            "eval_on: data"
        )
    ids_arr, mask_arr = np.asarray(stream, dtype=np.int64), np.asarray(mask, dtype=bool)
    starts = range(0, n - seq_len, seq_len)
    windows = [ids_arr[s : s + seq_len + 1] for s in starts]
    masks = [mask_arr[s + 1 : s + seq_len + 1] for s in starts]
    info = {
        "source": "sft",
        "conversations": used,
        "scored": "assistant tokens",
        "tokens": int(sum(int(m.sum()) for m in masks)),
    }
    return windows, masks, info
