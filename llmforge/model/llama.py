"""The Llama-architecture decoder, in one file.

Architectural choices (all as in Llama 2/3, and numerically as in ``transformers``' ``LlamaForCausalLM``):

* **Pre-norm residual blocks**: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``, a final norm, a linear head.
* **RMSNorm** (no mean subtraction, no bias), computed in float32 and cast back, like transformers.
* **RoPE** rotary position embeddings in the "rotate half" layout (the Hugging Face weight layout), base
  ``rope_theta``, optional linear or Llama-3.1 frequency scaling. cos/sin tables are precomputed once for
  ``max_position_embeddings`` positions (float32, non-persistent buffers) and sliced, never recomputed.
* **SwiGLU MLP**: ``down(silu(gate(x)) * up(x))``.
* **Grouped-query attention** through ``torch.nn.functional.scaled_dot_product_attention`` with
  ``enable_gqa`` (no K/V copies), using the fused causal kernel whenever no explicit mask is needed.
* Optional **tied embeddings** (``lm_head.weight is model.embed_tokens.weight``), optional **q/k/v/o bias**
  (Qwen2 checkpoints load with a zero o bias), **no dropout** by default (``attention_dropout`` in training).
* Parameter names are transformers' (``model.embed_tokens.weight``, ``model.layers.0.self_attn.q_proj.weight``,
  …, ``model.norm.weight``, ``lm_head.weight``), so a checkpoint is a ``safetensors`` dump of ``state_dict()``.

* **Packed sequences**: ``document_ids`` [B, T] restrict attention to earlier tokens of the same document
  with positions restarting at each document, so several short sequences share a row exactly as if each ran
  alone: a block-diagonal causal mask, or on CPU one causal SDPA call per document (fewer scores to compute).
  Without ``document_ids`` the fused causal SDPA kernel runs with no mask at all.

Logits come back in the model's dtype (float32 for a float32 model; bfloat16 under a bf16 model or autocast).
Training never needs them: ``forward`` computes what the objective asks for from the final hidden states with
the chunked kernels of ``fused.py`` (never materialising [B, T, vocab] logits) — the mean cross-entropy
(``labels=``), its sum and token count (``output="ce_sum"``), per-token log-probs (``output="logprobs"``),
or a teacher–student divergence plus CE (``distill=``). They sit inside ``forward`` so DDP/FSDP wrappers see
them (FSDP2 gathers the head's weight only there). ``KVCache`` is a static, preallocated per-layer K/V store
for batched generation.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..errors import ModelError
from .config import LlamaConfig
from .fused import (
    IGNORE_INDEX,
    DistillOutput,
    DistillTarget,
    LossSum,
    _linear_kd_apply,
    linear_cross_entropy,
    linear_token_logprobs,
)

# IGNORE_INDEX and linear_cross_entropy lived here before fused.py: importing them from here keeps working.
ForwardOutput = Literal["mean_ce", "ce_sum", "logprobs"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` → ``torch.bfloat16`` (torch dtypes pass through)."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ModelError(f"unsupported dtype {name!r}; use one of {', '.join(_DTYPES)}") from None


# ------------------------------------------------------------------------------------------------------
# RoPE
# ------------------------------------------------------------------------------------------------------


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in float32, with linear or Llama-3.1 scaling applied."""
    dim = config.head_dim
    assert dim is not None
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    if rs["rope_type"] == "linear":
        return inv_freq / rs["factor"]
    # Llama 3.1: keep high frequencies (short wavelengths), divide low frequencies by `factor`, and
    # interpolate smoothly in between, so local order is preserved while long-range positions stretch.
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_tables(
    config: LlamaConfig, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_position_embeddings, head_dim/2] (float32)."""
    inv_freq = rope_inv_freq(config).to(device)
    pos = torch.arange(config.max_position_embeddings, device=device, dtype=torch.int64).float()
    freqs = torch.outer(pos, inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, T, H, D] by cos/sin [B or 1, T, 1, D/2] in the rotate-half layout.

    Equal, bit for bit, to transformers' ``x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)`` with half the
    multiplies: the first half is ``x1*cos - x2*sin`` and the second ``x2*cos + x1*sin``.
    """
    if cos.dtype != x.dtype:  # under autocast q/k are bf16 while the residual stream is fp32
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ------------------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------------------


class KVCache:
    """Static per-layer key/value store for batched decoding.

    ``k`` and ``v`` are preallocated [layers, batch, kv_heads, max_len, head_dim]; every sequence of the batch
    writes the same slots (left-pad shorter prompts and pass an ``attention_mask``). ``length`` is the number of
    filled slots; the model advances it after each forward.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(
        cls, model: Llama, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None
    ) -> KVCache:
        """A cache sized for ``model`` (its device and dtype unless ``dtype`` is given)."""
        cfg = model.config
        if max_len > cfg.max_position_embeddings:
            raise ModelError(
                f"KV cache of {max_len} positions exceeds max_position_embeddings={cfg.max_position_embeddings}"
            )
        weight = model.model.embed_tokens.weight
        assert cfg.num_key_value_heads is not None and cfg.head_dim is not None
        return cls(
            cfg.num_hidden_layers,
            batch_size,
            max_len,
            cfg.num_key_value_heads,
            cfg.head_dim,
            device=weight.device,
            dtype=dtype or weight.dtype,
        )

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k/v [B, H_kv, T, D] after the filled slots; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ModelError(f"KV cache is full: {end} positions requested, {self.max_len} allocated")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self) -> None:
        self.length = 0


# ------------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32 even for bf16 activations (a bf16 mean of squares loses precision), then
        # cast back before the weight, the order transformers uses, so bf16 outputs match too.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        assert config.head_dim is not None and config.num_key_value_heads is not None
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        h, q_out, kv_out = config.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(h, q_out, bias=bias)
        self.k_proj = nn.Linear(h, kv_out, bias=bias)
        self.v_proj = nn.Linear(h, kv_out, bias=bias)
        self.o_proj = nn.Linear(q_out, h, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | DocumentSegments | None,
        is_causal: bool,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        dropout, gqa = self.dropout if self.training else 0.0, self.n_kv_heads != self.n_heads
        if isinstance(mask, DocumentSegments):  # packed rows, one causal call per document
            # split(), not slicing: the backward of a split is one cat, while every slice would allocate and
            # zero a full-size gradient (measured ~9% of a packed SFT step)
            rows = []
            for qb, kb, vb, row in zip(q.split(1), k.split(1), v.split(1), mask.bounds, strict=True):
                sizes = [e - s for s, e in row]
                if row[0][0]:  # leading tokens outside any document attend alone (never happens in practice)
                    sizes.insert(0, row[0][0])
                parts = [
                    F.scaled_dot_product_attention(
                        qs, ks, vs, is_causal=True, dropout_p=dropout, enable_gqa=gqa
                    )
                    for qs, ks, vs in zip(
                        qb.split(sizes, 2), kb.split(sizes, 2), vb.split(sizes, 2), strict=True
                    )
                ]
                rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
            y = torch.cat(rows) if len(rows) > 1 else rows[0]
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout, enable_gqa=gqa
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | DocumentSegments | None,
        is_causal: bool,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    """Embeddings, blocks and final norm: the ``model.`` prefix of transformers' parameter names."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# ------------------------------------------------------------------------------------------------------
# Packed sequences
# ------------------------------------------------------------------------------------------------------


def _document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions [B, T] that restart at 0 wherever the document id changes along a row."""
    B, T = document_ids.shape
    idx = torch.arange(T, device=document_ids.device).expand(B, T)
    # index of the latest document start at or before each token
    return idx - torch.where(_document_starts(document_ids), idx, 0).cummax(dim=1).values


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask [B, 1, T, T] for SDPA (True = may attend): a token sees itself and the
    earlier tokens of its document, a document being a run of equal ids (so an id may repeat further along
    the row without joining the earlier run). Every token sees itself, so padding rows stay finite."""
    T = document_ids.shape[1]
    run = _document_starts(document_ids).cumsum(dim=1)
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril_()
    return (run[:, :, None] == run[:, None, :]).logical_and_(causal)[:, None]


class DocumentSegments(NamedTuple):
    """Packed attention as one causal SDPA call per document instead of one masked call per batch.

    ``bounds[b]`` lists the (start, end) of each document of row b. A boolean mask makes SDPA compute all
    T² scores (the fused causal kernel skips the upper triangle; a masked one cannot skip anything), while
    per-document calls compute Σ n_i²/2, at a fixed overhead per call: faster on CPU for long rows of long
    documents (when, measured, is in ``_packed_attention``'s thresholds).
    """

    bounds: tuple[tuple[tuple[int, int], ...], ...]


# When per-document calls pay on CPU. Measured (fwd+bwd, 1 thread, hidden 256, 4 layers, head_dim 32): rows of
# 1024-2048 tokens holding documents of ~150-300 tokens run 1.2-1.7x faster than with the masked kernel;
# rows of 256 tokens, or documents of 25-35 tokens (120-170 calls a layer), run 3-40% slower (per-call
# overhead). None: decide with these two thresholds on CPU outside torch.compile; True/False: force.
_PER_DOCUMENT_MIN_ROW = 512
_PER_DOCUMENT_MIN_MEAN_LENGTH = 128
_PER_DOCUMENT_ATTENTION: bool | None = None


def _packed_attention(document_ids: torch.Tensor) -> torch.Tensor | DocumentSegments:
    """What the attention layers get for packed rows: a block-diagonal mask, or per-document segments
    where those are cheaper (CPU, eager, long rows of long documents). Both give the same result."""
    B, T = document_ids.shape
    starts = _document_starts(document_ids)
    use = _PER_DOCUMENT_ATTENTION
    if use is None:
        use = (
            document_ids.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and T >= _PER_DOCUMENT_MIN_ROW
            and int(starts.sum()) * _PER_DOCUMENT_MIN_MEAN_LENGTH <= B * T
        )
    if not use:
        return document_mask(document_ids)
    bounds = []
    for row in starts.tolist():
        s = [t for t, is_start in enumerate(row) if is_start]
        bounds.append(tuple(zip(s, [*s[1:], T], strict=True)))
    return DocumentSegments(tuple(bounds))


# ------------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------------


class Llama(nn.Module):
    """Llama-architecture causal LM with transformers-compatible parameter names.

    ``Llama(config)`` allocates float32 weights on the current default device (use ``torch.device("meta")``
    to build without allocating) and initializes them with ``init_weights()``.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        config.validate("model")
        self.config = config
        device = torch.get_default_device()  # honours `with torch.device(...)`
        # Build on `meta` and materialize once: skips nn.Linear's own init (wasted work for big models), and
        # makes `Llama(cfg)` and meta → to_empty() → init_weights() (the FSDP path) give the same weights.
        with torch.device("meta"):
            self.model = LlamaBackbone(config)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            # Angles are computed in float32 (pos * freq loses whole radians in bf16 past a few hundred
            # positions); `model.to(bf16)` then rounds the finished table, as transformers does.
            self.register_buffer("rope_cos", torch.empty(0), persistent=False)
            self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.tie_weights()
        # Recompute each block's activations in the backward pass instead of storing them (less memory,
        # ~30% more compute); the training loop switches it on for models that don't fit otherwise.
        self.gradient_checkpointing = False
        if device.type == "meta":
            self.reset_rope(device)
        else:
            self.to_empty(device=device)
            self.init_weights()

    # -- weights --------------------------------------------------------------------------------------
    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the embedding matrix when ``tie_word_embeddings``.

        Call after anything that replaces parameters (``load_state_dict(assign=True)``, ``to_empty``).
        """
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) weights, zero biases, unit norms, fresh RoPE tables.

        Deterministic under ``torch.manual_seed``: modules are visited in a fixed order.
        """
        self.tie_weights()
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                if module is self.lm_head and self.config.tie_word_embeddings:
                    continue  # same tensor as the embedding: initialize it once
                module.weight.normal_(mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        # A model built on `meta` and materialized with `to_empty()` (e.g. under FSDP) has garbage tables too.
        self.reset_rope()

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """Recompute the RoPE tables (after building on ``meta`` and loading real weights)."""
        device = device if device is not None else self.lm_head.weight.device
        self.rope_cos, self.rope_sin = rope_tables(self.config, device=device)

    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        """Parameter count (a tied embedding counted once); optionally without the input embedding."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if exclude_embeddings and not self.config.tie_word_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), the PaLM appendix B / nanoGPT MFU estimate.

        ``6 N`` for the matmuls of the N parameters that multiply activations (the input embedding is a lookup,
        so it is left out unless it doubles as the tied output head), plus ``12 L H Q T`` for the attention
        score and value matmuls (L layers, H query heads of width Q, context T; causal masking is not
        discounted, as in PaLM).
        """
        cfg = self.config
        assert cfg.head_dim is not None
        n = self.num_parameters(exclude_embeddings=True)
        return 6.0 * n + 12.0 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len

    # -- forward --------------------------------------------------------------------------------------
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden] (``forward`` without the head; for chunked losses and a
        distillation teacher). Arguments as in ``forward``."""
        B, T = input_ids.shape
        start = kv_cache.length if kv_cache is not None else 0
        end = start + T
        if document_ids is not None:
            if kv_cache is not None or attention_mask is not None:
                raise ModelError(
                    "document_ids (packed training rows) cannot be combined with kv_cache or attention_mask; "
                    "mark padding with document id -1 instead of an attention_mask"
                )
            if document_ids.shape != (B, T):
                raise ModelError(
                    f"document_ids must be [batch, tokens] = [{B}, {T}], got {list(document_ids.shape)}"
                )
            if position_ids is None:
                position_ids = document_positions(document_ids)
        if end > self.config.max_position_embeddings and position_ids is None:
            raise ModelError(
                f"sequence of {end} tokens exceeds max_position_embeddings={self.config.max_position_embeddings}"
            )
        if attention_mask is not None and attention_mask.dim() == 2:
            if attention_mask.shape != (B, end):
                raise ModelError(
                    f"attention_mask must be [batch, cached + new tokens] = [{B}, {end}], "
                    f"got {list(attention_mask.shape)}"
                )
            if position_ids is None:
                # Left padding: each sequence's first real token is position 0, as if it were alone.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:end]

        if position_ids is None:
            cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        else:
            cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]
        x = self.model.embed_tokens(input_ids)
        # [T, D/2] or [B, T, D/2] → broadcast over heads in the [B, T, H, D/2] layout; model dtype
        cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)

        if document_ids is not None:
            mask, is_causal = _packed_attention(document_ids), False
        else:
            mask, is_causal = self._attention_mask(attention_mask, B, T, start, x.device)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.model.layers:
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, cos, sin, mask, is_causal, kv_cache, use_reentrant=False
                )
            else:
                x = layer(x, cos, sin, mask, is_causal, kv_cache)
        if kv_cache is not None:
            kv_cache.length = end
        return self.model.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output: ForwardOutput | None = None,
        distill: DistillTarget | None = None,
    ) -> torch.Tensor | LossSum | DistillOutput:
        """Logits [B, T, vocab] in the model's dtype; with ``labels``, what ``output`` / ``distill`` ask for.

        input_ids: LongTensor [B, T]. position_ids: [B, T], default: consecutive after the cached tokens (or
        derived from a 2-D ``attention_mask`` or from ``document_ids``). kv_cache: append this step's
        keys/values and attend to all cached ones. attention_mask: [B, cached + T] with 1 for real tokens and 0
        for padding (combined with the causal mask), or a boolean [B, 1, T, cached + T] mask used as given
        (True = may attend). document_ids: [B, T] ints for packed rows, a document being a run of equal ids: a
        token attends only to itself and the earlier tokens of its document (mark padding -1; it stays finite),
        and positions restart at each document unless ``position_ids`` are given.

        labels: LongTensor [B, T], the target of each position, *already aligned* (``labels[:, t]`` is the
        token that should follow ``input_ids[:, t]``; unlike transformers nothing is shifted here), -100 =
        ignored. With labels, never materialising the logits (``fused.py``):

        * ``output=None`` or ``"mean_ce"``: float32 scalar, the mean CE over the non-ignored targets (0 when
          there are none), equal to ``F.cross_entropy(logits.float(), labels)`` (the pretraining path).
        * ``output="ce_sum"``: ``LossSum(loss_sum, num_tokens)``, Σ CE (float32) and the number of targets
          (int64), so a loss normalises by its own token count across micro-batches and ranks.
        * ``output="logprobs"``: float32 [B, T], log p(labels[:, t]) under the model, 0 at ignored positions
          (DPO, PPO, GRPO, reward scoring); differentiable for any upstream gradient.
        * ``distill=DistillTarget(...)``: ``DistillOutput(kd_sum, ce_sum, num_tokens)``, Σ T²·D(teacher,
          student) and Σ CE over the labelled positions from one pass over the student's logits chunks.
        """
        h = self.hidden_states(
            input_ids,
            position_ids=position_ids,
            kv_cache=kv_cache,
            attention_mask=attention_mask,
            document_ids=document_ids,
        )
        if labels is None:
            if output is not None or distill is not None:
                raise ModelError(
                    "output= and distill= need labels (the target of every position, -100 = none)"
                )
            return self.lm_head(h)
        if labels.shape != input_ids.shape:
            raise ModelError(
                f"labels must be shaped like input_ids {list(input_ids.shape)}, got {list(labels.shape)}"
            )
        weight = self.lm_head.weight
        if distill is not None:
            if output is not None:
                raise ModelError("give output= or distill=, not both")
            kd_sum, ce_sum = _linear_kd_apply(
                h,
                weight,
                labels,
                teacher_hidden=distill.teacher_hidden,
                teacher_weight=distill.teacher_weight,
                topk_ids=distill.topk_ids,
                topk_logprobs=distill.topk_logprobs,
                kind=distill.kind,
                temperature=distill.temperature,
                jsd_beta=distill.jsd_beta,
                ce_grad=distill.ce_grad,
            )
            return DistillOutput(kd_sum, ce_sum, (labels != IGNORE_INDEX).sum())
        if output is None or output == "mean_ce":
            loss_sum = linear_cross_entropy(h, weight, labels)
            return loss_sum / (labels != IGNORE_INDEX).sum().clamp(min=1)
        if output == "ce_sum":
            return LossSum(linear_cross_entropy(h, weight, labels), (labels != IGNORE_INDEX).sum())
        if output == "logprobs":
            return linear_token_logprobs(h, weight, labels)
        raise ModelError(f"unknown output {output!r}; use one of mean_ce, ce_sum, logprobs")

    @staticmethod
    def _attention_mask(
        attention_mask: torch.Tensor | None, B: int, T: int, start: int, device: torch.device
    ) -> tuple[torch.Tensor | None, bool]:
        """(boolean mask for SDPA or None, is_causal). Builds a mask only when the fused causal path can't do."""
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask, False
        if attention_mask is None:
            if start == 0:
                return None, True  # plain causal self-attention: the fused kernel's own mask
            if T == 1:
                return None, False  # one new token sees every cached one
        end = start + T
        q_pos = torch.arange(start, end, device=device)[:, None]
        k_pos = torch.arange(end, device=device)[None, :]
        mask = k_pos <= q_pos  # [T, S]
        if attention_mask is None:
            return mask[None, None], False
        valid = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S]
        # A padding query has no valid key; letting it see itself keeps its row finite (an all-masked row
        # gives NaN, which would leak into later layers' K/V through 0 * NaN).
        return (mask & valid) | (k_pos == q_pos), False
