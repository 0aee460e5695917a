"""Token shards → packed, resumable, rank-strided training batches.

Shard format (``llmforge.shards.v1``, written by the tokenizer stage): a folder with ``index.json``::

    {"format": "llmforge.shards.v1", "dtype": "uint16" | "uint32", "vocab_size": V,
     "bos_id": b, "eos_id": e, "pad_id": p,
     "splits": {"train": {"num_tokens": N, "num_documents": D,
                          "files": [{"name": "train_00000.bin", "num_tokens": n, "num_documents": d}]},
                "val": {...}}}

Each ``.bin`` is a flat little-endian array of ``dtype``: every document's tokens followed by ``eos_id``.

Packing: a split is one long token stream (its files concatenated). Window ``i`` is the ``seq_len + 1``
tokens starting at ``i * seq_len`` (consecutive windows share one token), so inputs are ``w[:-1]`` and
targets ``w[1:]`` and every token is a target exactly once per epoch. Documents are separated by EOS and
attention is not masked across them (GPT-2/nanoGPT practice; cheaper than per-document masks and harmless
at these lengths).

Determinism and scale-out: the loop consumes *global* micro-batches of ``world * batch_size`` windows. The
order of windows is a seeded permutation per epoch (or corpus order), a pure function of ``(seed, epoch)``,
and rank ``r`` takes the ``r``-th block of ``batch_size`` windows of each global micro-batch. Hence the data
of one optimizer step does not depend on how it is split into processes or accumulation micro-batches, and
the whole reader state is one integer: the number of global windows consumed (``cursor``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import StageInputError

SHARDS_FORMAT = "llmforge.shards.v1"
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


@dataclass(frozen=True)
class ShardIndex:
    """The parsed ``index.json`` of a shards folder."""

    root: Path
    dtype: str
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int | None
    splits: dict[str, dict[str, Any]]

    @classmethod
    def load(cls, root: str | Path) -> ShardIndex:
        root = Path(root)
        path = root / "index.json"
        if not path.is_file():
            raise StageInputError(
                f"{path}: token shard index not found; re-run the tokenizer stage (`llmforge run tokenizer`)"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise StageInputError(
                f"{path}: unreadable shard index ({err}); re-run the tokenizer stage"
            ) from None
        if raw.get("format") != SHARDS_FORMAT:
            raise StageInputError(
                f"{path}: format {raw.get('format')!r} is not {SHARDS_FORMAT!r}; re-run the tokenizer stage "
                "with this version of llmforge"
            )
        if raw.get("dtype") not in _DTYPES:
            raise StageInputError(f"{path}: dtype must be one of {sorted(_DTYPES)}, got {raw.get('dtype')!r}")
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
        )

    def num_tokens(self, split: str) -> int:
        return int(self.splits.get(split, {}).get("num_tokens", 0))

    def open(self, split: str) -> TokenSplit:
        """Memory-map every file of ``split`` (raises if a file is missing or its size is wrong)."""
        info = self.splits.get(split)
        if info is None:
            raise StageInputError(f"{self.root / 'index.json'}: no split named {split!r}")
        arrays = []
        for f in info.get("files", []):
            path = self.root / f["name"]
            if not path.is_file():
                raise StageInputError(
                    f"{path}: shard file listed in index.json is missing; re-run the tokenizer"
                )
            n = int(f["num_tokens"])
            itemsize = np.dtype(_DTYPES[self.dtype]).itemsize
            size = path.stat().st_size
            if size != n * itemsize:
                raise StageInputError(
                    f"{path}: {size} bytes but index.json says {n} {self.dtype} tokens ({n * itemsize} bytes); "
                    "the shards are corrupt or from another run — re-run the tokenizer stage"
                )
            if n:
                arrays.append(
                    np.memmap(path, dtype=np.dtype(_DTYPES[self.dtype]).newbyteorder("<"), mode="r")
                )
        return TokenSplit(arrays)


class TokenSplit:
    """Several memory-mapped token files read as one contiguous stream."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.offsets = np.cumsum([0] + [len(a) for a in arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as int64, across file boundaries."""
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        i = int(np.searchsorted(self.offsets, start, side="right") - 1)
        while filled < length:
            a = self.arrays[i]
            lo = pos - int(self.offsets[i])
            take = min(length - filled, len(a) - lo)
            out[filled : filled + take] = a[lo : lo + take]
            filled += take
            pos += take
            i += 1
        return out


class PackedBatches:
    """Endless, resumable iterator of ``{"input_ids", "labels"}`` micro-batches for one rank.

    ``state_dict()`` / ``load_state_dict()`` carry the global window cursor (see the module docstring).
    """

    def __init__(
        self,
        split: TokenSplit,
        *,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        name: str = "train",
    ):
        self.split = split
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        # the last window needs seq_len + 1 tokens
        self.num_windows = (len(split) - 1) // seq_len if len(split) > seq_len else 0
        if self.num_windows < batch_size * world_size:
            need = batch_size * world_size * seq_len + 1
            raise StageInputError(
                f"the {name} split has {len(split):,} tokens but one micro-batch of {world_size} x "
                f"{batch_size} sequences of {seq_len} tokens needs {need:,}; add data or lower "
                "pretrain.batch_size / pretrain.seq_len"
            )
        self.cursor = 0  # global windows consumed
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    @property
    def epoch(self) -> int:
        return self.cursor // self.num_windows

    def _order(self, epoch: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        if self._perm_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def _window(self, g: int) -> np.ndarray:
        epoch, i = divmod(g, self.num_windows)
        order = self._order(epoch)
        w = int(order[i]) if order is not None else i
        return self.split.read(w * self.seq_len, self.seq_len + 1)

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        first = self.cursor + self.rank * self.batch_size
        rows = np.stack([self._window(first + j) for j in range(self.batch_size)])
        self.cursor += self.batch_size * self.world_size
        t = torch.from_numpy(rows)
        return {"input_ids": t[:, :-1], "labels": t[:, 1:]}

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "seed": self.seed, "shuffle": self.shuffle, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state["cursor"])


def eval_batches(
    split: TokenSplit, *, seq_len: int, batch_size: int, num_batches: int, rank: int = 0, world_size: int = 1
) -> list[dict[str, torch.Tensor]]:
    """The fixed validation set of this rank: the first ``num_batches`` global micro-batches, corpus order.

    Returns fewer batches when the split is small (never wraps around, so no token is counted twice);
    an empty list when the split cannot fill one global micro-batch.
    """
    num_windows = (len(split) - 1) // seq_len if len(split) > seq_len else 0
    per_global = batch_size * world_size
    n = min(num_batches, num_windows // per_global)
    out = []
    for b in range(n):
        first = b * per_global + rank * batch_size
        rows = np.stack([split.read((first + j) * seq_len, seq_len + 1) for j in range(batch_size)])
        t = torch.from_numpy(rows)
        out.append({"input_ids": t[:, :-1], "labels": t[:, 1:]})
    return out


def write_shards(
    root: str | Path,
    splits: dict[str, list[list[int]]],
    *,
    vocab_size: int,
    eos_id: int,
    bos_id: int | None = None,
    pad_id: int | None = None,
    dtype: str = "uint16",
    docs_per_file: int | None = None,
) -> Path:
    """Write documents as ``llmforge.shards.v1`` (each followed by EOS). For tests and small tools."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {
        "format": SHARDS_FORMAT,
        "dtype": dtype,
        "vocab_size": vocab_size,
        "bos_id": bos_id,
        "eos_id": eos_id,
        "pad_id": pad_id,
        "splits": {},
    }
    for name, docs in splits.items():
        per = docs_per_file or max(1, len(docs))
        files = []
        for k in range(0, max(1, len(docs)), per):
            chunk = docs[k : k + per]
            toks = [t for d in chunk for t in [*d, eos_id]]
            fname = f"{name}_{k // per:05d}.bin"
            np.asarray(toks, dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<")).tofile(root / fname)
            files.append({"name": fname, "num_tokens": len(toks), "num_documents": len(chunk)})
        index["splits"][name] = {
            "num_tokens": sum(f["num_tokens"] for f in files),
            "num_documents": len(docs),
            "files": files,
        }
    (root / "index.json").write_text(json.dumps(index, indent=2))
    return root
