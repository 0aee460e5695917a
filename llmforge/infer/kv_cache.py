"""A pool of per-sequence KV slots: ``max_batch`` slots × ``max_model_len`` positions per layer.

Each running sequence owns one slot and its own length, so sequences of any lengths share a step without
left padding, and a sequence that finishes frees its slot for the next request at once. The model drives the
cache exactly like ``llama.KVCache``: every attention layer calls ``update(layer_idx, k, v)`` and attends to
what it returns. Before each forward the engine ``bind``s the step's rows (which slot each row writes, where
it starts, how many of its tokens are real) and passes the model explicit ``position_ids`` and a boolean
[B, 1, T, S] mask from ``attention_mask()``; the model then never consults ``length``.

Layout: ``k``/``v`` are [layers, slots, kv_heads, max_model_len, head_dim], the layout SDPA reads. When the
step's rows are consecutive slots (the engine keeps decoding sequences in a prefix of the pool for that
reason) ``update`` returns a view and copies nothing; otherwise it gathers the rows' slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ModelError


@dataclass
class BoundRows:
    """One forward's rows: row b writes ``lengths[b]`` tokens into slot ``slots[b]`` from ``starts[b]``."""

    slots: list[int]
    starts: list[int]
    lengths: list[int]  # real (non-padding) tokens of each row; the row is right-padded to the step width
    width: int  # T: tokens per row in this forward
    key_len: int  # S: keys every row attends over (max of starts + lengths)
    contiguous: bool  # slots are consecutive: read through a view
    flat_index: torch.Tensor  # [N * H] rows of the flattened [slots * H * max_len, D] layer to write
    row_index: torch.Tensor  # [N] row of every real token
    col_index: torch.Tensor  # [N] column (0..T-1) of every real token
    rows: torch.Tensor  # [B] slots, for the gather when not contiguous
    starts_t: torch.Tensor  # [B]
    lengths_t: torch.Tensor  # [B]


class SlotKVCache:
    """Static per-slot key/value store; see the module docstring."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        # Zeros, not empty: masked keys still flow through SDPA's arithmetic, and stale NaNs would poison it.
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.num_slots = num_slots
        self.max_len = max_len
        self.device = self.k.device
        self._bound: BoundRows | None = None

    @classmethod
    def for_model(cls, model: torch.nn.Module, num_slots: int, max_len: int) -> SlotKVCache:
        """A pool sized for ``model`` (a ``llmforge.model.Llama``), on its device and in its dtype."""
        cfg = model.config
        if max_len > cfg.max_position_embeddings:
            raise ModelError(
                f"max_model_len={max_len} exceeds the model's max_position_embeddings="
                f"{cfg.max_position_embeddings}; lower max_model_len"
            )
        weight = model.model.embed_tokens.weight
        return cls(
            cfg.num_hidden_layers,
            num_slots,
            max_len,
            cfg.num_key_value_heads,
            cfg.head_dim,
            device=weight.device,
            dtype=weight.dtype,
        )

    @staticmethod
    def bytes_per_slot(config, max_len: int, dtype: torch.dtype) -> int:
        """Memory one slot takes (K and V, every layer): what bounds ``max_batch`` on a given device."""
        item = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * max_len * item

    # -- the model's interface ------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Always 0: kept for ``Llama.hidden_states``, which reads it only when no positions/mask are given."""
        return 0

    @length.setter
    def length(self, value: int) -> None:  # the model advances it after each forward; lengths live per slot
        pass

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's real k/v [B, H_kv, T, D] into the bound slots; return [B, H_kv, S, D] each."""
        b = self._bound
        if b is None:
            raise ModelError(
                "SlotKVCache.update called without bind(): the engine binds rows before a forward"
            )
        kl, vl = self.k[layer], self.v[layer]  # [slots, H, max_len, D]
        D = k.shape[-1]
        # One index_copy_ per tensor into the flattened layer; the indices are computed once per forward (bind)
        # and shared by every layer.
        if b.width == 1:  # decode: one token per row, every row real
            k_new, v_new = k[:, :, 0], v[:, :, 0]
        else:
            k_new, v_new = k[b.row_index, :, b.col_index], v[b.row_index, :, b.col_index]
        kl.view(-1, D).index_copy_(0, b.flat_index, k_new.reshape(-1, D))
        vl.view(-1, D).index_copy_(0, b.flat_index, v_new.reshape(-1, D))
        if b.contiguous:
            s0 = b.slots[0]
            return kl[s0 : s0 + len(b.slots), :, : b.key_len], vl[s0 : s0 + len(b.slots), :, : b.key_len]
        return kl[b.rows, :, : b.key_len], vl[b.rows, :, : b.key_len]

    # -- the engine's interface -----------------------------------------------------------------------
    def bind(self, slots: list[int], starts: list[int], lengths: list[int]) -> BoundRows:
        """Prepare the next forward: row b holds ``lengths[b]`` new tokens of slot ``slots[b]`` at positions
        ``starts[b]...``; rows are right-padded to the longest. Returns the binding (for the mask)."""
        if not slots:
            raise ModelError("bind() needs at least one row")
        width = max(lengths)
        ends = [s + n for s, n in zip(starts, lengths, strict=True)]
        if max(ends) > self.max_len:
            raise ModelError(f"KV slot overflow: position {max(ends)} requested, {self.max_len} allocated")
        dev = self.device
        slot_l, pos_l, row_l, col_l = [], [], [], []
        for r, (slot, start, n) in enumerate(zip(slots, starts, lengths, strict=True)):
            slot_l += [slot] * n
            pos_l += range(start, start + n)
            row_l += [r] * n
            col_l += range(n)
        H = self.k.shape[2]
        slot_t = torch.tensor(slot_l, dtype=torch.long, device=dev)
        pos_t = torch.tensor(pos_l, dtype=torch.long, device=dev)
        heads = torch.arange(H, device=dev)
        flat = ((slot_t[:, None] * H + heads[None, :]) * self.max_len + pos_t[:, None]).reshape(-1)
        if width == 1:
            row_t = col_t = flat  # unused on the decode path
        else:
            row_t = torch.tensor(row_l, dtype=torch.long, device=dev)
            col_t = torch.tensor(col_l, dtype=torch.long, device=dev)
        self._bound = BoundRows(
            slots=list(slots),
            starts=list(starts),
            lengths=list(lengths),
            width=width,
            key_len=max(ends),
            contiguous=slots == list(range(slots[0], slots[0] + len(slots))),
            flat_index=flat,
            row_index=row_t,
            col_index=col_t,
            rows=torch.tensor(slots, dtype=torch.long, device=dev),
            starts_t=torch.tensor(starts, dtype=torch.long, device=dev),
            lengths_t=torch.tensor(lengths, dtype=torch.long, device=dev),
        )
        return self._bound

    def attention_mask(self) -> torch.Tensor:
        """Boolean [B, 1, T, S] mask of the bound rows (True = may attend): a real query at column t of row b
        sees its slot's positions ``<= starts[b] + t``; a padding query sees the row's real keys only (its
        output is discarded, but it must stay finite)."""
        q_pos = self.position_ids()  # [B, T]
        k_pos = torch.arange(self._bound.key_len, device=self.device)
        return (k_pos[None, None, :] <= q_pos[:, :, None])[:, None]  # [B, 1, T, S]

    def position_ids(self) -> torch.Tensor:
        """[B, T] positions of the bound rows (padding columns repeat the row's last real position)."""
        b = self._bound
        assert b is not None
        if b.width == 1:
            return b.starts_t[:, None]
        cols = torch.arange(b.width, device=self.device)[None, :]
        return b.starts_t[:, None] + torch.minimum(cols, b.lengths_t[:, None] - 1)

    def unbind(self) -> None:
        self._bound = None

    def move(self, moves: list[tuple[int, int, int]]) -> None:
        """Relocate sequences between slots: each (src, dst, length) copies ``length`` positions. All
        sources are read before any destination is written, so swaps and chains are safe."""
        if not moves:
            return
        saved = [
            (dst, n, self.k[:, src, :, :n].clone(), self.v[:, src, :, :n].clone()) for src, dst, n in moves
        ]
        for dst, n, k, v in saved:
            self.k[:, dst, :, :n] = k
            self.v[:, dst, :, :n] = v
