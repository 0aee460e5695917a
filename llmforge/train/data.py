"""Token shards → packed, resumable, rank-strided pretraining batches.

The shard format (``llmforge.shards.v1``: index schema, dtypes, boundaries, loss mask, reader and the one
writer) is defined in ``llmforge.shards``; its names are re-exported here for the training code and tests
that import them from ``llmforge.train.data``. SFT batches (whole conversations, loss masks, packing with
document ids) are in ``llmforge.train.sft_data``.

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

from typing import Any

import numpy as np
import torch

from ..errors import StageInputError
from ..shards import SHARDS_FORMAT, ShardIndex, TokenSplit, write_shards

__all__ = ["SHARDS_FORMAT", "PackedBatches", "ShardIndex", "TokenSplit", "eval_batches", "write_shards"]


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
