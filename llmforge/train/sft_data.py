"""SFT data: conversations → chat-template tokens + assistant loss mask → shards → packed or padded batches.

Three steps, each a pure function of its inputs:

1. **Read** JSONL (``.jsonl``, ``.jsonl.gz``) or Parquet (``.parquet``) rows. A row is either
   ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` (multi-turn) or
   ``{"prompt": str, "completion": str}`` (optionally ``"system": str``), which becomes a user turn and an
   assistant turn. Only ``role`` and ``content`` of a message reach the template.
2. **Tokenize once** (``tokenize_sft``) with the project tokenizer's chat template (``encode_chat``: the ids
   and assistant mask transformers' ``apply_chat_template`` gives) into ``llmforge.shards.v1`` shards with a
   loss mask and document boundaries (one document = one conversation), so SFT data is cached, fingerprinted
   and memory-mapped like pretraining data. The train/validation split is by conversation: either the rows
   of ``val_files``, or a seeded hash of the conversation's content below ``val_fraction`` — adding rows
   never moves other rows between splits, and a duplicated conversation lands in one split only.
3. **Batch** (``SFTBatches``, ``sft_eval_batches``): whole conversations, never a window across two.

Bad input, decided per case (a wrong file is an error that names it; a row that is merely useless is a
counted skip, reported in ``SFTDataStats.skipped`` with the first few places in ``examples``):

* errors (``StageInputError`` naming the file, and line or row, and field):
  an unsupported extension or an unreadable/corrupt file; a JSONL line that is not JSON or not an object;
  invalid UTF-8 (undecodable bytes, or an unpaired surrogate escape such as ``"\\ud800"``); a row with
  neither ``messages`` nor ``prompt``/``completion``; a message without ``role`` or ``content``; a role
  other than system/user/assistant (map e.g. ShareGPT's human/gpt first); non-string content (null, a list
  of parts, a number);
* counted skips (``SFTDataStats.skipped[reason]``): ``empty_assistant`` — an assistant turn that is empty or
  only whitespace; ``no_assistant`` — no assistant turn at all (``messages: []`` included); ``too_long`` —
  longer than ``seq_len + 1`` tokens with ``truncation="drop"``; ``truncated_no_assistant`` — with
  ``truncation="truncate"`` (the default) a long conversation keeps its first ``seq_len + 1`` tokens
  (counted in ``truncated``) unless no assistant token is left to learn.

Schema problems are errors because they are never one bad row: they mean the file is in another format and
every row would be dropped silently. Empty lines in JSONL are not rows.

Batches. A conversation of ``L`` tokens gives ``L - 1`` (input, target) pairs: inputs ``c[:-1]``, targets
``c[1:]``, weighted by the loss mask of the *target* token (every target with ``train_on_prompt``). So a
conversation fits a row of ``seq_len`` positions when ``L <= seq_len + 1`` — the same window convention as
pretraining. Every batch is a dict of int64 tensors ``[B, T]`` with ``T = seq_len``:

* ``input_ids``;
* ``labels`` already aligned: ``labels[:, t]`` is the target of ``input_ids[:, t]``; ``-100`` where there
  is no loss (prompt targets unless ``train_on_prompt``, padding);
* ``position_ids`` restarting at 0 for every conversation (0 on padding);
* ``document_ids``: the conversation's index within its row, ``-1`` on padding. The model builds a
  block-diagonal causal mask from it, so no token attends across conversations (or to/from padding).

Modes: **packed** (default) — conversations are packed into rows of ``seq_len`` positions by best-fit
decreasing within windows of ``pack_window`` conversations of a seeded per-epoch order, then the rows are
shuffled; **padded** — one conversation per row, right-padded with ``pad_id``. Both contain exactly the same
(input prefix, target, weight) triples per epoch, so they give the same loss.

Determinism and scale-out, as ``PackedBatches``: an epoch's rows are a pure function of ``(seed, epoch)``;
the loop consumes global micro-batches of ``world_size * batch_size`` rows and rank ``r`` takes the ``r``-th
block; the whole reader state is one integer, the number of global rows consumed (``cursor``). Every kept
conversation has at least one target with loss, so every row — and therefore every batch — has loss
tokens by construction (conversations in foreign shards that have none are left out and counted); a batch
without one would raise.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..console import get_logger, progress
from ..errors import StageInputError, TokenizerError
from ..shards import (
    SHARDS_FORMAT,
    ShardIndex,
    ShardWriter,
    TokenSplit,
    build_index,
    shard_dtype,
    shard_folder,
)
from ..shards import write_index as _write_index

log = get_logger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "SFTBatches",
    "SFTDataStats",
    "SFTEpochStats",
    "best_fit_decreasing",
    "conversation_from_row",
    "conversation_hash",
    "list_sft_files",
    "read_conversations",
    "sft_eval_batches",
    "tokenize_sft",
]

ROLES = ("system", "user", "assistant")
SKIP_REASONS = ("empty_assistant", "no_assistant", "too_long", "truncated_no_assistant")
SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
Truncation = Literal["truncate", "drop"]
IGNORE_INDEX = -100
_MAX_EXAMPLES = 10
_PARQUET_BATCH = 1024

Conversation = list[dict[str, str]]


# --------------------------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------------------------


@dataclass
class SFTDataStats:
    """What ``tokenize_sft`` read, kept and dropped (written into ``index.json`` under ``sft.stats``)."""

    files: int = 0
    rows_read: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    truncated: int = 0  # kept, but cut to seq_len + 1 tokens
    tokens: int = 0  # of kept conversations, after truncation
    assistant_tokens: int = 0  # tokens with loss mask 1 (before train_on_prompt)
    splits: dict[str, dict[str, int]] = field(
        default_factory=lambda: {
            s: {"conversations": 0, "tokens": 0, "assistant_tokens": 0} for s in ("train", "val")
        }
    )
    examples: list[str] = field(default_factory=list)  # "file:line: reason" of the first few skips
    seconds: float = 0.0
    up_to_date: bool = False  # the output already matched the inputs; nothing was redone

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("up_to_date")
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SFTDataStats:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "up_to_date"}
        return cls(**known)


def list_sft_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand folders (recursively, sorted) and check every file exists and has a supported extension."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
            if not found:
                raise StageInputError(f"{p}: no {', '.join('*' + s for s in SUFFIXES)} files in this folder")
            out += found
        elif not p.is_file():
            raise StageInputError(f"{p}: SFT data file not found; check the file names in the manifest")
        elif not p.name.endswith(SUFFIXES):
            raise StageInputError(
                f"{p}: unsupported SFT data file; use one of {', '.join(SUFFIXES)} (rows of `messages` or "
                "`prompt`/`completion`)"
            )
        else:
            out.append(p)
    return out


def _check_text(value: Any, where: str, name: str) -> str:
    if isinstance(value, bytes | bytearray):  # Parquet binary columns
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise StageInputError(
                f"{where}: {name} is not valid UTF-8 (byte {err.start}); re-encode the data as UTF-8"
            ) from None
    if not isinstance(value, str):
        raise StageInputError(
            f"{where}: {name} must be a string, got {type(value).__name__} "
            f"({json.dumps(value, default=str)[:60]}); flatten multi-part content to text before training"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise StageInputError(
            f"{where}: {name} is not valid UTF-8 (an unpaired surrogate {value[err.start]!r} at character "
            f"{err.start}); fix the JSON escape or the text encoding"
        ) from None
    return value


def conversation_from_row(row: Any, where: str) -> Conversation:
    """The ``[{role, content}]`` list of one row; raises ``StageInputError`` naming ``where`` and the field."""
    if not isinstance(row, Mapping):
        raise StageInputError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if row.get("messages") is not None:
        msgs = row["messages"]
        if not isinstance(msgs, list | tuple):
            raise StageInputError(
                f"{where}: field 'messages' must be a list of {{role, content}} objects, got {type(msgs).__name__}"
            )
        out: Conversation = []
        for i, m in enumerate(msgs):
            if not isinstance(m, Mapping):
                raise StageInputError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
            for key in ("role", "content"):
                if key not in m:
                    raise StageInputError(f"{where}: messages[{i}].{key} is missing")
            role = m["role"]
            if role not in ROLES:
                raise StageInputError(
                    f"{where}: messages[{i}].role {role!r} is not one of {', '.join(ROLES)}; map other role "
                    "names (e.g. ShareGPT's human/gpt) to these before training"
                )
            out.append({"role": role, "content": _check_text(m["content"], where, f"messages[{i}].content")})
        return out
    if "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            if row.get(key) is None:
                raise StageInputError(
                    f"{where}: field '{key}' is missing (a prompt/completion row needs both)"
                )
        out = []
        if row.get("system") is not None:
            out.append({"role": "system", "content": _check_text(row["system"], where, "system")})
        out.append({"role": "user", "content": _check_text(row["prompt"], where, "prompt")})
        out.append({"role": "assistant", "content": _check_text(row["completion"], where, "completion")})
        return out
    keys = ", ".join(sorted(map(str, row))[:8]) or "none"
    raise StageInputError(
        f"{where}: the row has neither 'messages' nor 'prompt'/'completion' (its fields: {keys}); rename the "
        "fields or convert the file"
    )


def skip_reason(conv: Conversation) -> str | None:
    """Why a well-formed conversation teaches nothing (``None`` if it is usable)."""
    assistant = [m for m in conv if m["role"] == "assistant"]
    if not assistant:
        return "no_assistant"
    if any(not m["content"].strip() for m in assistant):
        return "empty_assistant"
    return None


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise StageInputError(
                        f"{where}: not valid UTF-8 (byte {err.start} of the line); re-encode the file as UTF-8"
                    ) from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise StageInputError(
                        f"{where}: not valid JSON ({err.msg} at column {err.colno}); every line must be one "
                        "JSON object"
                    ) from None
                yield where, row
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise StageInputError(f"{path}: unreadable ({err}); re-write or remove the file") from None


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow comes with datatrove
        from ..errors import MissingDependencyError

        raise MissingDependencyError("pyarrow", "data", "Reading Parquet SFT data") from None
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
        cols = [c for c in ("messages", "prompt", "completion", "system") if c in names]
        if not cols:
            raise StageInputError(
                f"{path}: the Parquet file has neither a 'messages' nor 'prompt'/'completion' column "
                f"(columns: {', '.join(sorted(names)[:8]) or 'none'})"
            )
        row = 0
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=cols):
            for rec in batch.to_pylist():
                yield f"{path}: row {row}", {k: v for k, v in rec.items() if v is not None}
                row += 1
    except (OSError, pa.ArrowException) as err:
        raise StageInputError(f"{path}: unreadable Parquet file ({err}); re-write or remove it") from None


def iter_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for every row of one file; ``where`` is ``file:line`` (1-based) or ``file: row N`` (0-based)."""
    return _iter_parquet(path) if path.name.endswith(".parquet") else _iter_jsonl(path)


def read_conversations(
    paths: Sequence[str | os.PathLike], stats: SFTDataStats | None = None
) -> Iterator[tuple[str, Conversation]]:
    """Every usable conversation of ``paths`` (files or folders), counting rows and skips into ``stats``."""
    stats = stats if stats is not None else SFTDataStats()
    for path in list_sft_files(paths):
        for where, row in iter_rows(path):
            stats.rows_read += 1
            conv = conversation_from_row(row, where)
            reason = skip_reason(conv)
            if reason is not None:
                stats.skip(reason, where)
                continue
            yield where, conv


def conversation_hash(conv: Conversation, seed: int) -> float:
    """A uniform number in [0, 1) from the conversation's content and the seed (stable across rows added)."""
    text = json.dumps([[m["role"], m["content"]] for m in conv], ensure_ascii=False, separators=(",", ":"))
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(int(seed)).encode())
    return int.from_bytes(h.digest(), "little") / 2.0**64


# --------------------------------------------------------------------------------------------------------
# Tokenize once into shards
# --------------------------------------------------------------------------------------------------------


def _identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"file": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _check_template(tok) -> None:
    from ..tokenizer.chat import check_template

    if not tok.info.chat_template:
        raise TokenizerError(
            f"{tok.info.path}: the tokenizer has no chat template; SFT renders conversations only with the "
            "project tokenizer's template (re-run `llmforge run tokenizer`, which writes one)"
        )
    facts = check_template(tok.info.chat_template, fast=tok.fast, variables=tok.info.template_variables())
    if not facts["generation_markers"]:
        raise TokenizerError(
            f"{tok.info.path}: the chat template has no {{% generation %}} block, so assistant tokens cannot be "
            "told from prompt tokens; use llmforge's ChatML template (remove `tokenizer.chat_template`) or add "
            "{% generation %}…{% endgeneration %} around each assistant reply"
        )


class _SplitSink:
    """Holds back the last training conversation so a validation split can always get one (see below)."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int, stats: SFTDataStats):
        self.writers = {
            s: ShardWriter(folder, s, dtype, max_tokens=shard_tokens, loss_mask=True)
            for s in ("train", "val")
        }
        self.stats = stats
        self.pending: tuple[np.ndarray, np.ndarray] | None = None

    def _write(self, split: str, ids: np.ndarray, mask: np.ndarray) -> None:
        self.writers[split].add(ids, np.array([ids.size], dtype=np.int64), mask)
        s = self.stats.splits[split]
        s["conversations"] += 1
        s["tokens"] += int(ids.size)
        s["assistant_tokens"] += int(mask.sum())

    def add(self, split: str, ids: np.ndarray, mask: np.ndarray) -> None:
        if split == "val":
            self._write("val", ids, mask)
            return
        if self.pending is not None:
            self._write("train", *self.pending)
        self.pending = (ids, mask)

    def finish(self, want_val: bool) -> dict[str, Any]:
        if self.pending is not None:
            # A tiny set may hash no conversation into validation; then the last training conversation is
            # moved over (deterministically) rather than leaving validation empty.
            move = want_val and self.stats.splits["val"]["conversations"] == 0
            move = move and self.stats.splits["train"]["conversations"] >= 1
            self._write("val" if move else "train", *self.pending)
            self.pending = None
        return {s: w.finish() for s, w in self.writers.items()}


def tokenize_sft(
    files: Sequence[str | os.PathLike],
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    seq_len: int,
    truncation: Truncation = "truncate",
    val_fraction: float = 0.05,
    val_files: Sequence[str | os.PathLike] = (),
    seed: int = 0,
    shard_tokens: int = 100_000_000,
) -> SFTDataStats:
    """Render, tokenize and mask every conversation of ``files`` into shards in ``out_dir`` (atomically).

    ``seq_len`` is the training context: a conversation may have up to ``seq_len + 1`` tokens (see the
    module docstring); longer ones follow ``truncation``. The validation split is the rows of ``val_files``
    when given (then ``val_fraction`` is not used), else a seeded ``val_fraction`` of conversations by
    content hash. If ``out_dir`` already holds shards of the same inputs and settings, nothing is redone
    (``stats.up_to_date``); otherwise ``out_dir`` is replaced as a whole, atomically. Raises ``StageInputError`` for bad input (see the table above) and when no
    conversation is left to train on.
    """
    from ..tokenizer.info import load_tokenizer

    if seq_len < 1:
        raise StageInputError(f"seq_len must be >= 1, got {seq_len}")
    if truncation not in ("truncate", "drop"):
        raise StageInputError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
    if not 0 <= val_fraction < 1:
        raise StageInputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    t0 = time.monotonic()
    out_dir = Path(out_dir)
    train_paths = list_sft_files(files)
    val_paths = list_sft_files(val_files) if val_files else []
    if not train_paths:
        raise StageInputError("no SFT data files given; name them in the manifest")
    both = sorted({p.resolve() for p in train_paths} & {p.resolve() for p in val_paths})
    if both:
        raise StageInputError(
            f"{both[0]}: listed both as training data and as a validation file; a file belongs to one split"
        )
    tok = load_tokenizer(tokenizer_dir)
    _check_template(tok)
    info = tok.info
    dtype = shard_dtype(info.vocab_size)
    settings = {
        "format": SHARDS_FORMAT,
        "tokenizer_sha256": info.sha256,
        "chat_template": hashlib.sha256(info.chat_template.encode("utf-8")).hexdigest(),
        "seq_len": seq_len,
        "truncation": truncation,
        "val_fraction": 0.0 if val_paths else val_fraction,
        "seed": seed,
        "shard_tokens": shard_tokens,
    }
    fp_obj = {
        **settings,
        "files": [_identity(p) for p in train_paths],
        "val": [_identity(p) for p in val_paths],
    }
    fingerprint = hashlib.sha256(json.dumps(fp_obj, sort_keys=True).encode()).hexdigest()
    try:
        existing = ShardIndex.load(out_dir) if (out_dir / "index.json").exists() else None
    except StageInputError:
        existing = None
    if existing is not None and existing.fingerprint == fingerprint and "sft" in existing.raw:
        log.info("%s: SFT shards are up to date with the data and tokenizer; nothing to do", out_dir)
        stats = SFTDataStats.from_dict(existing.raw["sft"]["stats"])
        stats.up_to_date, stats.seconds = True, time.monotonic() - t0
        return stats

    stats = SFTDataStats(files=len(train_paths) + len(val_paths))
    max_len = seq_len + 1
    with shard_folder(out_dir) as tmp, progress("tokenize SFT data", unit="rows") as bar:
        sink = _SplitSink(tmp, dtype, shard_tokens, stats)
        reported = 0
        sources = [(p, False) for p in train_paths] + [(p, True) for p in val_paths]
        for path, is_val_file in sources:
            for where, conv in read_conversations([path], stats):
                if stats.rows_read - reported >= 1024:
                    bar.advance(stats.rows_read - reported, tokens=stats.tokens)
                    reported = stats.rows_read
                ids_l, mask_l = tok.encode_chat(conv)
                ids, mask = np.asarray(ids_l, dtype=np.int64), np.asarray(mask_l, dtype=np.uint8)
                if ids.size > max_len:
                    if truncation == "drop":
                        stats.skip("too_long", where)
                        continue
                    ids, mask = ids[:max_len], mask[:max_len]
                    if not mask[1:].any():
                        stats.skip("truncated_no_assistant", where)
                        continue
                    stats.truncated += 1
                elif not mask[1:].any():  # cannot happen with a checked template; never train on nothing
                    stats.skip("no_assistant", where)
                    continue
                if val_paths:
                    split = "val" if is_val_file else "train"
                else:
                    split = "val" if conversation_hash(conv, seed) < val_fraction else "train"
                sink.add(split, ids, mask)
                stats.kept += 1
                stats.tokens += int(ids.size)
                stats.assistant_tokens += int(mask.sum())
        bar.advance(stats.rows_read - reported, tokens=stats.tokens)
        splits = sink.finish(want_val=val_fraction > 0 and not val_paths)
        if stats.splits["train"]["conversations"] == 0:
            reasons = ", ".join(f"{k} {v}" for k, v in stats.skipped.items() if v) or "none skipped"
            raise StageInputError(
                f"{', '.join(map(str, train_paths))}: no conversation to train on ({stats.rows_read} rows read; "
                f"skipped: {reasons}; {stats.splits['val']['conversations']} went to validation). "
                + (f"First skips: {'; '.join(stats.examples[:3])}" if stats.examples else "")
            )
        stats.seconds = time.monotonic() - t0
        index = build_index(
            dtype=dtype,
            vocab_size=info.vocab_size,
            eos_id=info.eos_id,
            bos_id=info.bos_id,
            pad_id=info.pad_id,
            splits=splits,
            loss_mask=True,
            tokenizer_sha256=info.sha256,
            fingerprint=fingerprint,
            extra={
                "sft": {
                    **{k: settings[k] for k in ("seq_len", "truncation", "val_fraction", "seed")},
                    "files": [str(p) for p in train_paths],
                    "val_files": [str(p) for p in val_paths],
                    "stats": stats.to_dict(),
                }
            },
        )
        _write_index(tmp, index)
    if stats.num_skipped:
        log.warning(
            "SFT data: skipped %d of %d rows (%s); first: %s",
            stats.num_skipped,
            stats.rows_read,
            ", ".join(f"{k} {v}" for k, v in stats.skipped.items() if v),
            "; ".join(stats.examples[:3]),
        )
    log.info(
        "SFT data: %d conversations (%d train, %d val), %s tokens, %s assistant tokens, %d truncated, in %.1fs",
        stats.kept,
        stats.splits["train"]["conversations"],
        stats.splits["val"]["conversations"],
        f"{stats.tokens:,}",
        f"{stats.assistant_tokens:,}",
        stats.truncated,
        stats.seconds,
    )
    return stats


# --------------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------------


def best_fit_decreasing(sizes: np.ndarray, capacity: int) -> list[list[int]]:
    """Pack items (indices into ``sizes``) into bins of ``capacity``: largest first, each into the fullest
    bin it fits (ties: the earliest). Deterministic; fill is within a few percent of optimal in practice."""
    order = np.argsort(-np.asarray(sizes), kind="stable")
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin index)
    bins: list[list[int]] = []
    for k in order.tolist():
        s = int(sizes[k])
        j = bisect.bisect_left(free, (s, -1))
        if j == len(free):
            bins.append([k])
            if capacity - s > 0:
                bisect.insort(free, (capacity - s, len(bins) - 1))
        else:
            rem, b = free.pop(j)
            bins[b].append(k)
            if rem - s > 0:
                bisect.insort(free, (rem - s, b))
    return bins


@dataclass(frozen=True)
class SFTEpochStats:
    """One epoch of batches: how many rows, and how full they are (what packing buys)."""

    rows: int
    conversations: int
    tokens: int  # input positions holding a conversation token
    loss_tokens: int  # positions whose label is not -100
    seq_len: int

    @property
    def fill(self) -> float:
        """Fraction of the ``rows x seq_len`` positions that hold data rather than padding."""
        return self.tokens / (self.rows * self.seq_len) if self.rows else 0.0


class _Rows:
    """The rows of each epoch (lists of conversation indices) and the tensors of one row."""

    def __init__(
        self,
        split: TokenSplit,
        *,
        seq_len: int,
        packing: bool,
        shuffle: bool,
        seed: int,
        pad_id: int,
        train_on_prompt: bool,
        pack_window: int,
        name: str,
    ):
        if seq_len < 1 or pack_window < 1:
            raise StageInputError("seq_len and pack_window must be >= 1")
        if not split.has_mask and not train_on_prompt:
            split.read_mask(0, 0)  # raises the clear "no loss mask" error
        self.split, self.seq_len, self.packing, self.shuffle, self.seed = (
            split,
            seq_len,
            packing,
            shuffle,
            seed,
        )
        self.pad_id, self.train_on_prompt, self.pack_window = pad_id, train_on_prompt, pack_window
        starts = split.document_starts()
        lengths = split.document_lengths()
        too_long = np.flatnonzero(lengths > seq_len + 1)
        if too_long.size:
            i = int(too_long[0])
            raise StageInputError(
                f"{split.where}: conversation {i} has {int(lengths[i])} tokens but rows of seq_len {seq_len} "
                f"hold at most {seq_len + 1}; re-tokenize the SFT data with this seq_len (`tokenize_sft`)"
            )
        targets = self._loss_targets(starts, lengths)
        keep = targets > 0
        self.num_unusable = int((~keep).sum())
        if self.num_unusable:
            log.warning(
                "%s: %d conversations have no token to train on; left out", split.where, self.num_unusable
            )
        self.starts, self.lengths, self.targets = starts[keep], lengths[keep], targets[keep]
        if self.starts.size == 0:
            raise StageInputError(
                f"the {name} split ({split.where}) has no conversation with a token to train on"
            )
        self._cache: dict[int, list[np.ndarray]] = {}

    def _loss_targets(self, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Per conversation: how many of its targets ``c[1:]`` carry loss."""
        if self.train_on_prompt:
            return lengths - 1
        out = np.zeros(starts.size, dtype=np.int64)
        offsets = self.split.offsets
        file_of = np.searchsorted(offsets, starts, side="right") - 1
        for f, m in enumerate(self.split.masks):
            sel = np.flatnonzero(file_of == f)
            if not sel.size:
                continue
            local = starts[sel] - int(offsets[f])
            sums = np.add.reduceat(np.asarray(m), local, dtype=np.int64)  # mask[start:next_start]
            out[sel] = sums - np.asarray(m[local], dtype=np.int64)  # minus the first token (never a target)
        return out

    @property
    def num_conversations(self) -> int:
        return int(self.starts.size)

    def rows(self, epoch: int) -> list[np.ndarray]:
        got = self._cache.get(epoch)
        if got is not None:
            return got
        n = self.num_conversations
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        if not self.packing:
            rows = [order[i : i + 1] for i in range(n)]
        else:
            slots = self.lengths - 1
            rows = []
            for w in range(0, n, self.pack_window):
                chunk = order[w : w + self.pack_window]
                rows += [chunk[np.asarray(b)] for b in best_fit_decreasing(slots[chunk], self.seq_len)]
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch, 1]).permutation(len(rows))
                rows = [rows[i] for i in perm]
        if len(self._cache) >= 2:  # a global batch spans at most two epochs at a time
            self._cache.pop(min(self._cache))
        self._cache[epoch] = rows
        return rows

    def build(self, convs: np.ndarray) -> dict[str, np.ndarray]:
        T = self.seq_len
        inp = np.full(T, self.pad_id, dtype=np.int64)
        lab = np.full(T, IGNORE_INDEX, dtype=np.int64)
        pos = np.zeros(T, dtype=np.int64)
        doc = np.full(T, -1, dtype=np.int64)
        p = 0
        for k, c in enumerate(convs.tolist()):
            start, length = int(self.starts[c]), int(self.lengths[c])
            toks = self.split.read(start, length)
            n = length - 1
            inp[p : p + n] = toks[:-1]
            if self.train_on_prompt:
                lab[p : p + n] = toks[1:]
            else:
                m = self.split.read_mask(start + 1, n).astype(bool)
                lab[p : p + n] = np.where(m, toks[1:], IGNORE_INDEX)
            pos[p : p + n] = np.arange(n)
            doc[p : p + n] = k
            p += n
        return {"input_ids": inp, "labels": lab, "position_ids": pos, "document_ids": doc}

    def epoch_stats(self, epoch: int) -> SFTEpochStats:
        rows = self.rows(epoch)
        return SFTEpochStats(
            rows=len(rows),
            conversations=self.num_conversations,
            tokens=int((self.lengths - 1).sum()),
            loss_tokens=int(self.targets.sum()),
            seq_len=self.seq_len,
        )


_PAD_MULTIPLE = 64  # trimmed batch lengths are multiples of this: few distinct shapes for compile and CUDA


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack rows into a batch, cut after the last real token of the longest row (rounded up to a multiple
    of 64): padding past it would only cost compute, and with one conversation per row that is often half."""
    seq_len = len(rows[0]["document_ids"])
    used = max(int(np.flatnonzero(r["document_ids"] >= 0)[-1]) + 1 for r in rows)
    T = min(seq_len, -(-used // _PAD_MULTIPLE) * _PAD_MULTIPLE)
    batch = {k: torch.from_numpy(np.stack([r[k][:T] for r in rows])) for k in rows[0]}
    if not bool((batch["labels"] != IGNORE_INDEX).any()):
        raise StageInputError(
            "an SFT batch has no token to train on (all labels are -100); the shards are corrupt"
        )
    return batch


class SFTBatches:
    """Endless, resumable iterator of this rank's SFT micro-batches (see the module docstring).

    ``packing=True`` packs conversations into rows; ``packing=False`` pads one conversation per row.
    ``state_dict()`` / ``load_state_dict()`` carry the global row cursor.
    """

    def __init__(
        self,
        split: TokenSplit,
        *,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        packing: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        pad_id: int = 0,
        train_on_prompt: bool = False,
        pack_window: int = 2048,
        name: str = "train",
    ):
        if not 0 <= rank < world_size or batch_size < 1:
            raise StageInputError(
                f"need batch_size >= 1 and 0 <= rank < world_size (got {batch_size}, {rank}, {world_size})"
            )
        self._rows = _Rows(
            split,
            seq_len=seq_len,
            packing=packing,
            shuffle=shuffle,
            seed=seed,
            pad_id=pad_id,
            train_on_prompt=train_on_prompt,
            pack_window=pack_window,
            name=name,
        )
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.packing, self.shuffle, self.seed = packing, shuffle, seed
        first = len(self._rows.rows(0))
        if first < batch_size * world_size:
            raise StageInputError(
                f"the {name} split has {self._rows.num_conversations} conversations, which make {first} rows of "
                f"{seq_len} tokens{' when packed' if packing else ''}, but one micro-batch of {world_size} x "
                f"{batch_size} rows needs {batch_size * world_size}; add data or lower the batch size"
            )
        self.cursor = 0  # global rows consumed
        self._bases = [0]  # first global row of each epoch computed so far

    @property
    def num_conversations(self) -> int:
        return self._rows.num_conversations

    @property
    def num_unusable(self) -> int:
        """Conversations in the shards with no token to train on, left out."""
        return self._rows.num_unusable

    def epoch_stats(self, epoch: int = 0) -> SFTEpochStats:
        """Rows, tokens, loss tokens and fill fraction of one epoch."""
        return self._rows.epoch_stats(epoch)

    def _locate(self, g: int) -> tuple[int, int]:
        while len(self._bases) < 2 or self._bases[-1] <= g:
            self._bases.append(self._bases[-1] + len(self._rows.rows(len(self._bases) - 1)))
        e = bisect.bisect_right(self._bases, g) - 1
        return e, g - self._bases[e]

    @property
    def epoch(self) -> int:
        return self._locate(self.cursor)[0]

    def __iter__(self) -> SFTBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        first = self.cursor + self.rank * self.batch_size
        rows = []
        for g in range(first, first + self.batch_size):
            e, i = self._locate(g)
            rows.append(self._rows.build(self._rows.rows(e)[i]))
        self.cursor += self.batch_size * self.world_size
        return _stack(rows)

    def state_dict(self) -> dict[str, Any]:
        return {
            "cursor": self.cursor,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "packing": self.packing,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("seq_len", "packing"):
            if key in state and state[key] != getattr(self, key):
                raise StageInputError(
                    f"cannot resume SFT data: the checkpoint was made with {key}={state[key]!r}, this run has "
                    f"{getattr(self, key)!r}; keep the setting or start fresh (`resume: false`)"
                )
        self.cursor = int(state["cursor"])


def sft_eval_batches(
    split: TokenSplit,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    rank: int = 0,
    world_size: int = 1,
    packing: bool = True,
    pad_id: int = 0,
    train_on_prompt: bool = False,
    pack_window: int = 2048,
) -> list[dict[str, torch.Tensor]]:
    """The fixed validation batches of this rank: the first ``num_batches`` global micro-batches in corpus order.

    Never wraps around (no conversation counted twice); fewer batches when the split is small, an empty list
    when it cannot fill one global micro-batch.
    """
    rows_src = _Rows(
        split,
        seq_len=seq_len,
        packing=packing,
        shuffle=False,
        seed=0,
        pad_id=pad_id,
        train_on_prompt=train_on_prompt,
        pack_window=pack_window,
        name="val",
    )
    rows = rows_src.rows(0)
    per_global = batch_size * world_size
    out = []
    for b in range(min(num_batches, len(rows) // per_global)):
        first = b * per_global + rank * batch_size
        out.append(_stack([rows_src.build(rows[first + j]) for j in range(batch_size)]))
    return out
