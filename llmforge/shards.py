"""The token-shard format ``llmforge.shards.v1``: its one definition, its one writer and its reader.

Every stage that turns text into training tokens writes this format (the tokenizer stage for pretraining
documents, the SFT stage for rendered conversations) and every training objective memory-maps it, so the
layout lives here and nowhere else. A shards folder holds::

    index.json                  the schema below
    <split>_NNNNN.bin           flat little-endian uint16/uint32 token ids (uint16 when the vocab fits)
    <split>_NNNNN.docs.npy      int64 start offset of every document inside that .bin (document boundaries)
    <split>_NNNNN.mask.bin      optional: one uint8 per token, 1 = the token is trained on (a loss mask)

``index.json``::

    {"format": "llmforge.shards.v1", "dtype": "uint16" | "uint32", "vocab_size": V,
     "bos_id": b, "eos_id": e, "pad_id": p, "tokenizer_sha256": "...", "loss_mask": false,
     "splits": {"train": {"num_tokens": N, "num_documents": D,
                          "files": [{"name": "train_00000.bin", "num_tokens": n, "num_documents": d,
                                     "docs": "train_00000.docs.npy", "mask": "train_00000.mask.bin"}]},
                "val": {...}},
     "fingerprint": "...", ...}

What a "document" is depends on the writer: a pretraining document is its tokens followed by ``eos_id``; an
SFT document is one conversation exactly as the chat template renders it (no EOS added). A shard file is cut
only at document boundaries, so no document spans two files.

Compatibility: the loss mask and the per-file ``docs``/``mask`` names were added without changing the
version, because a reader that ignores them still reads the tokens correctly. Shards written before then
(by the tokenizer stage) are read as they are: their ``.docs.npy`` files are found by name; folders that have
no boundary files can still be packed for pretraining, and asking them for boundaries is a clear error that
says to re-run the tokenizer stage.

This module imports only numpy (no torch, no tokenizers), so the tokenizer stage and training both import it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StageInputError
from .utils.atomic import atomic_dir, write_json

SHARDS_FORMAT = "llmforge.shards.v1"
SPLITS = ("train", "val")
DTYPES: dict[str, type[np.unsignedinteger]] = {"uint16": np.uint16, "uint32": np.uint32}
MASK_DTYPE = np.dtype(np.uint8)
DOCS_SUFFIX = ".docs.npy"
MASK_SUFFIX = ".mask.bin"
_RERUN = "re-run the stage that wrote them (`llmforge run --force tokenizer` for pretraining shards)"


def shard_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab < 65536), else uint32: half the disk and page cache for most vocabs."""
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def _disk_dtype(name: str) -> np.dtype:
    return np.dtype(DTYPES[name]).newbyteorder("<")


def _docs_name(bin_name: str) -> str:
    return bin_name[: -len(".bin")] + DOCS_SUFFIX


def _mask_name(bin_name: str) -> str:
    return bin_name[: -len(".bin")] + MASK_SUFFIX


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------


@dataclass
class SplitStats:
    """What a ``ShardWriter`` wrote for one split (mirrors ``index.json``'s ``splits[name]``)."""

    num_tokens: int = 0
    num_documents: int = 0
    files: list[dict[str, Any]] = field(default_factory=list)

    def to_index(self) -> dict[str, Any]:
        return {"num_tokens": self.num_tokens, "num_documents": self.num_documents, "files": self.files}


class ShardWriter:
    """The one writer: appends whole documents to ``<split>_NNNNN.bin`` files (+ boundaries, + mask).

    A new file starts once the current one holds ``max_tokens`` tokens (or ``max_documents`` documents); a
    file always takes at least one document, so an oversized document still lands somewhere. Output bytes
    depend only on the sequence of documents added, never on how they were batched into ``add`` calls, which
    is what makes the tokenizer stage's output identical for any number of workers.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        split: str,
        dtype: np.dtype | str,
        *,
        max_tokens: int = 100_000_000,
        max_documents: int | None = None,
        loss_mask: bool = False,
    ):
        if max_tokens < 1 or (max_documents is not None and max_documents < 1):
            raise ValueError("max_tokens and max_documents must be >= 1")
        self.folder, self.split = Path(folder), split
        self.dtype = _disk_dtype(np.dtype(dtype).name)
        self.max_tokens, self.max_documents, self.loss_mask = max_tokens, max_documents, loss_mask
        self.stats = SplitStats()
        self._f = None
        self._mf = None
        self._name = ""
        self._starts: list[np.ndarray] = []
        self._tokens = 0
        self._docs = 0

    def _open(self) -> None:
        self._name = f"{self.split}_{len(self.stats.files):05d}.bin"
        self._f = open(self.folder / self._name, "wb")  # noqa: SIM115 - closed in _close
        if self.loss_mask:
            self._mf = open(self.folder / _mask_name(self._name), "wb")  # noqa: SIM115 - closed in _close
        self._starts, self._tokens, self._docs = [], 0, 0

    def _close(self) -> None:
        if self._f is None:
            return
        self._f.close()
        if self._mf is not None:
            self._mf.close()
        starts = np.concatenate(self._starts) if self._starts else np.zeros(0, dtype=np.int64)
        np.save(self.folder / _docs_name(self._name), starts.astype(np.int64))
        entry: dict[str, Any] = {
            "name": self._name,
            "num_tokens": self._tokens,
            "num_documents": int(starts.size),
            "docs": _docs_name(self._name),
        }
        if self.loss_mask:
            entry["mask"] = _mask_name(self._name)
        self.stats.files.append(entry)
        self.stats.num_tokens += self._tokens
        self.stats.num_documents += int(starts.size)
        self._f = self._mf = None

    def add(self, tokens: np.ndarray, lens: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append whole documents: ``tokens`` is their concatenation, ``lens`` their lengths (> 0).

        ``mask`` (same length as ``tokens``, 0/1) is required when the writer has a loss mask and refused
        otherwise, so a folder never has masks for some files and not others.
        """
        tokens = np.asarray(tokens)
        lens = np.asarray(lens, dtype=np.int64)
        if lens.size and (lens.min() < 1 or int(lens.sum()) != tokens.size):
            raise ValueError("document lengths must be >= 1 and sum to len(tokens)")
        if (mask is not None) != self.loss_mask:
            raise ValueError("mask must be given exactly when the writer was made with loss_mask=True")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != tokens.shape:
                raise ValueError("mask must have one entry per token")
            mask = (mask != 0).astype(MASK_DTYPE)
        ends = np.cumsum(lens)
        done_docs, done_tok = 0, 0
        while done_docs < lens.size:
            if self._f is None:
                self._open()
            room = self.max_tokens - self._tokens
            # How many of the remaining documents fit by tokens (and by count).
            fit = int(np.searchsorted(ends[done_docs:] - done_tok, room, side="right"))
            if self.max_documents is not None:
                fit = min(fit, self.max_documents - self._docs)
            if fit == 0 and self._docs == 0:
                fit = 1
            if fit == 0:
                self._close()
                continue
            end_tok = int(ends[done_docs + fit - 1])
            starts = np.concatenate(([0], ends[done_docs : done_docs + fit - 1] - done_tok)) + self._tokens
            self._f.write(np.ascontiguousarray(tokens[done_tok:end_tok], dtype=self.dtype).tobytes())
            if mask is not None:
                self._mf.write(mask[done_tok:end_tok].tobytes())
            self._starts.append(starts.astype(np.int64))
            self._tokens += end_tok - done_tok
            self._docs += fit
            done_docs += fit
            done_tok = end_tok
            if self._tokens >= self.max_tokens or (
                self.max_documents is not None and self._docs >= self.max_documents
            ):
                self._close()

    def finish(self) -> SplitStats:
        self._close()
        return self.stats


def build_index(
    *,
    dtype: np.dtype | str,
    vocab_size: int,
    eos_id: int,
    bos_id: int | None,
    pad_id: int | None,
    splits: Mapping[str, SplitStats],
    loss_mask: bool = False,
    tokenizer_sha256: str | None = None,
    fingerprint: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``index.json`` dict for a folder whose splits were written by ``ShardWriter``s."""
    index: dict[str, Any] = {
        "format": SHARDS_FORMAT,
        "dtype": np.dtype(dtype).name,
        "vocab_size": int(vocab_size),
        "bos_id": bos_id,
        "eos_id": int(eos_id),
        "pad_id": pad_id,
    }
    if tokenizer_sha256 is not None:
        index["tokenizer_sha256"] = tokenizer_sha256
    index["loss_mask"] = bool(loss_mask)
    index["splits"] = {name: st.to_index() for name, st in splits.items()}
    if fingerprint is not None:
        index["fingerprint"] = fingerprint
    for k, v in (extra or {}).items():
        if k in index:
            raise ValueError(f"extra index key {k!r} would overwrite a format key")
        index[k] = v
    return index


@contextlib.contextmanager
def shard_folder(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder that replaces ``out_dir`` atomically on success (write shards + index.json in it)."""
    with atomic_dir(out_dir) as tmp:
        yield tmp


def write_index(folder: str | os.PathLike, index: Mapping[str, Any]) -> None:
    write_json(Path(folder) / "index.json", dict(index))


def write_shards(
    root: str | os.PathLike,
    splits: Mapping[str, Sequence[Sequence[int]]],
    *,
    vocab_size: int,
    eos_id: int,
    bos_id: int | None = None,
    pad_id: int | None = None,
    dtype: str = "uint16",
    docs_per_file: int | None = None,
    shard_tokens: int = 100_000_000,
    masks: Mapping[str, Sequence[Sequence[int]]] | None = None,
    append_eos: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write in-memory documents as shards through ``ShardWriter`` (tests and small tools); replaces ``root``.

    ``append_eos`` frames each document with ``eos_id`` the way pretraining shards are (the EOS token gets
    mask 1). ``masks`` gives a loss mask per document, one 0/1 per token, for every split or none.
    """
    np_dtype = np.dtype(DTYPES[dtype])
    if masks is not None and set(masks) != set(splits):
        raise ValueError("masks must be given for every split or for none")
    stats: dict[str, SplitStats] = {}
    with shard_folder(root) as tmp:
        for name, docs in splits.items():
            writer = ShardWriter(
                tmp,
                name,
                np_dtype,
                max_tokens=shard_tokens,
                max_documents=docs_per_file,
                loss_mask=masks is not None,
            )
            extra_tok = [eos_id] if append_eos else []
            rows = [[*d, *extra_tok] for d in docs]
            if rows:
                lens = np.array([len(r) for r in rows], dtype=np.int64)
                flat = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows])
                m = None
                if masks is not None:
                    mrows = [[*mk, *([1] if append_eos else [])] for mk in masks[name]]
                    if [len(r) for r in mrows] != lens.tolist():
                        raise ValueError(f"split {name!r}: every mask must have one entry per token")
                    m = np.concatenate([np.asarray(r, dtype=np.uint8) for r in mrows])
                writer.add(flat, lens, m)
            stats[name] = writer.finish()
        index = build_index(
            dtype=np_dtype,
            vocab_size=vocab_size,
            eos_id=eos_id,
            bos_id=bos_id,
            pad_id=pad_id,
            splits=stats,
            loss_mask=masks is not None,
            extra=extra,
        )
        write_index(tmp, index)
    return Path(root)


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardIndex:
    """The parsed ``index.json`` of a shards folder (``raw`` keeps every key, writer-specific ones included)."""

    root: Path
    dtype: str
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int | None
    splits: dict[str, dict[str, Any]]
    loss_mask: bool = False
    tokenizer_sha256: str | None = None
    fingerprint: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def load(cls, root: str | os.PathLike) -> ShardIndex:
        root = Path(root)
        path = root / "index.json"
        if not path.is_file():
            raise StageInputError(
                f"{path}: token shard index not found; re-run the tokenizer stage (`llmforge run tokenizer`)"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise StageInputError(
                f"{path}: unreadable shard index ({err}); re-run the tokenizer stage"
            ) from None
        if not isinstance(raw, dict) or raw.get("format") != SHARDS_FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise StageInputError(
                f"{path}: format {got!r} is not {SHARDS_FORMAT!r}; re-run the tokenizer stage "
                "with this version of llmforge"
            )
        if raw.get("dtype") not in DTYPES:
            raise StageInputError(f"{path}: dtype must be one of {sorted(DTYPES)}, got {raw.get('dtype')!r}")
        for key in ("vocab_size", "eos_id", "splits"):
            if key not in raw:
                raise StageInputError(f"{path}: missing key {key!r}; re-run the tokenizer stage")
        return cls(
            root=root,
            dtype=raw["dtype"],
            vocab_size=int(raw["vocab_size"]),
            bos_id=raw.get("bos_id"),
            eos_id=int(raw["eos_id"]),
            pad_id=raw.get("pad_id"),
            splits=raw["splits"],
            loss_mask=bool(raw.get("loss_mask", False)),
            tokenizer_sha256=raw.get("tokenizer_sha256"),
            fingerprint=raw.get("fingerprint"),
            raw=raw,
        )

    def num_tokens(self, split: str) -> int:
        return int(self.splits.get(split, {}).get("num_tokens", 0))

    def num_documents(self, split: str) -> int:
        return int(self.splits.get(split, {}).get("num_documents", 0))

    def open(self, split: str) -> TokenSplit:
        """Memory-map every file of ``split`` (raises if a file is missing or its size is wrong).

        Boundaries and masks are mapped too when present; their sizes are checked here, their contents
        when first used (``TokenSplit.document_starts``).
        """
        info = self.splits.get(split)
        if info is None:
            raise StageInputError(f"{self.root / 'index.json'}: no split named {split!r}")
        dtype = _disk_dtype(self.dtype)
        arrays, masks, docs = [], [], []
        for f in info.get("files", []):
            path = self.root / f["name"]
            if not path.is_file():
                raise StageInputError(f"{path}: shard file listed in index.json is missing; {_RERUN}")
            n = int(f["num_tokens"])
            size = path.stat().st_size
            if size != n * dtype.itemsize:
                raise StageInputError(
                    f"{path}: {size} bytes but index.json says {n} {self.dtype} tokens ({n * dtype.itemsize} "
                    f"bytes); the shards are corrupt or from another run — {_RERUN}"
                )
            if self.loss_mask:
                mpath = self.root / f.get("mask", _mask_name(f["name"]))
                if not mpath.is_file() or mpath.stat().st_size != n * MASK_DTYPE.itemsize:
                    raise StageInputError(
                        f"{mpath}: the loss mask is missing or does not have one byte per token of {path.name}; "
                        f"the shards are corrupt — {_RERUN}"
                    )
            dpath = self.root / f.get("docs", _docs_name(f["name"]))
            starts = None
            if dpath.is_file():
                try:
                    starts = np.load(dpath, mmap_mode="r")
                except (OSError, ValueError) as err:
                    raise StageInputError(
                        f"{dpath}: unreadable document boundaries ({err}); {_RERUN}"
                    ) from None
                if starts.ndim != 1 or len(starts) != int(f.get("num_documents", -1)):
                    raise StageInputError(
                        f"{dpath}: {len(starts)} document starts but index.json says "
                        f"{f.get('num_documents')} documents; the shards are corrupt — {_RERUN}"
                    )
            elif "docs" in f:
                raise StageInputError(
                    f"{dpath}: document boundaries listed in index.json are missing; {_RERUN}"
                )
            if n:
                arrays.append(np.memmap(path, dtype=dtype, mode="r"))
                if self.loss_mask:
                    masks.append(np.memmap(mpath, dtype=MASK_DTYPE, mode="r"))
                docs.append(starts)
        return TokenSplit(
            arrays,
            masks=masks if self.loss_mask else None,
            doc_starts=None if any(d is None for d in docs) else docs,
            where=f"{self.root}:{split}",
        )


class TokenSplit:
    """Several memory-mapped token files read as one contiguous stream (+ their masks and boundaries)."""

    def __init__(
        self,
        arrays: list[np.ndarray],
        *,
        masks: list[np.ndarray] | None = None,
        doc_starts: list[np.ndarray] | None = None,
        where: str = "token split",
    ):
        self.arrays = arrays
        self.masks = masks
        self.offsets = np.cumsum([0] + [len(a) for a in arrays])
        self._file_starts = doc_starts
        self._starts: np.ndarray | None = None
        self.where = where

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def has_mask(self) -> bool:
        return self.masks is not None

    @property
    def has_boundaries(self) -> bool:
        return self._file_starts is not None

    def _gather(self, arrays: list[np.ndarray], start: int, length: int, dtype) -> np.ndarray:
        if start < 0 or start + length > len(self):
            raise IndexError(f"read [{start}, {start + length}) outside a split of {len(self)} tokens")
        out = np.empty(length, dtype=dtype)
        pos, filled = start, 0
        i = int(np.searchsorted(self.offsets, start, side="right") - 1)
        while filled < length:
            a = arrays[i]
            lo = pos - int(self.offsets[i])
            take = min(length - filled, len(a) - lo)
            out[filled : filled + take] = a[lo : lo + take]
            filled += take
            pos += take
            i += 1
        return out

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as int64, across file boundaries."""
        return self._gather(self.arrays, start, length, np.int64)

    def read_mask(self, start: int, length: int) -> np.ndarray:
        """Loss mask ``[start, start + length)`` as uint8 (0/1); raises if the shards have no mask."""
        if self.masks is None:
            raise StageInputError(
                f"{self.where}: these shards have no loss mask (pretraining shards); SFT needs shards written "
                "by the SFT data step (`tokenize_sft`)"
            )
        return self._gather(self.masks, start, length, np.uint8)

    def document_starts(self) -> np.ndarray:
        """Start offset of every document in the whole split (int64, increasing, first 0), checked once."""
        if self._starts is None:
            if self._file_starts is None:
                raise StageInputError(
                    f"{self.where}: these shards have no document boundaries (<split>_NNNNN.docs.npy); "
                    f"{_RERUN}"
                )
            parts = [
                np.asarray(s, dtype=np.int64) + int(off)
                for s, off in zip(self._file_starts, self.offsets[:-1], strict=True)
            ]
            starts = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            for s, n in zip(self._file_starts, np.diff(self.offsets), strict=True):
                if len(s) and (s[0] != 0 or s[-1] >= n or np.any(np.diff(s) <= 0)):
                    raise StageInputError(
                        f"{self.where}: document boundaries are not increasing offsets inside their file; "
                        f"the shards are corrupt — {_RERUN}"
                    )
                if not len(s) and n:
                    raise StageInputError(
                        f"{self.where}: a shard file with tokens lists no documents; {_RERUN}"
                    )
            self._starts = starts
        return self._starts

    def document_lengths(self) -> np.ndarray:
        starts = self.document_starts()
        return np.diff(np.append(starts, len(self))).astype(np.int64)

    @property
    def num_documents(self) -> int:
        return len(self.document_starts())

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens (int64) and loss mask (uint8, or None without a mask) of document ``i``."""
        starts = self.document_starts()
        start = int(starts[i])
        end = int(starts[i + 1]) if i + 1 < len(starts) else len(self)
        mask = self.read_mask(start, end - start) if self.masks is not None else None
        return self.read(start, end - start), mask
