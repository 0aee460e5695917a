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

Logits come back in the model's dtype (float32 for a float32 model; bfloat16 under a bf16 model or autocast);
losses should upcast (``F.cross_entropy`` on bf16 logits is accurate enough for monitoring but upcast for the
gradient if it matters). For training, ``model(input_ids, labels=labels)`` returns the mean next-token
cross-entropy instead, computed by ``linear_cross_entropy`` a chunk of rows at a time with the gradient formed
in the same pass, so the [B, T, vocab] logits (and their log-softmax and gradient) are never materialised:
less memory and memory traffic, the same loss and gradients. It sits inside ``forward`` so DDP/FSDP wrappers
see it. ``KVCache`` is a static, preallocated per-layer K/V store for batched generation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..errors import ModelError
from .config import LlamaConfig

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
# Fused output projection + cross-entropy
# ------------------------------------------------------------------------------------------------------

IGNORE_INDEX = -100
_CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MiB in fp32): big enough for efficient matmuls


def _chunk_rows(vocab: int) -> int:
    return max(256, _CHUNK_ELEMENTS // vocab)


def _ce_chunk(
    h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, want_grad: bool
):
    """Σ CE and, if ``want_grad``, d(Σ CE)/d logits = softmax - onehot (rows of ignored targets included;
    the caller zeroes them on the small side of the matmuls)."""
    # fp32 log-softmax whatever the matmul dtype: bf16 log-probabilities over a large vocabulary lose the
    # small differences that matter (what F.cross_entropy(logits.float()) does)
    logp = torch.log_softmax(torch.mm(h, weight.t()).float(), dim=-1)
    t = target[:, None]
    loss = -(logp.gather(1, t).squeeze(1) * valid).sum()
    if not want_grad:
        return loss, None
    grad = logp.exp_()  # in place: the log-probabilities are not needed any more
    grad.scatter_add_(1, t, torch.full_like(t, -1, dtype=grad.dtype))
    return loss, grad


def _linear_ce(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    compute_dtype: torch.dtype,
    need_h: bool,
    need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(Σ CE, d/dh, d/dweight) a chunk of rows at a time; h [N, hidden], weight [vocab, hidden], labels [N]."""
    w = weight.to(compute_dtype)
    valid = labels != IGNORE_INDEX
    target = labels.masked_fill(~valid, 0)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if need_h else None
    # summed over chunks in fp32 even for a bf16 weight, then rounded once (as a single matmul would)
    grad_w = (
        torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) if need_w else None
    )
    rows = _chunk_rows(weight.shape[0])
    for s in range(0, h.shape[0], rows):
        e = min(s + rows, h.shape[0])
        hc, m = h[s:e].to(compute_dtype), valid[s:e]
        loss_c, g = _ce_chunk(hc, w, target[s:e], m, need_h or need_w)
        loss += loss_c
        if g is None:
            continue
        g = g.to(compute_dtype)
        m = m[:, None].to(compute_dtype)
        if grad_h is not None:
            grad_h[s:e] = torch.mm(g, w) * m
        if grad_w is not None:  # ignored rows contribute nothing: zero them in h, [rows, hidden], not in g
            if grad_w.dtype == compute_dtype:
                grad_w.addmm_(g.t(), hc * m)
            else:  # bf16 products summed in fp32
                grad_w += torch.mm(g.t(), hc * m)
    return loss, grad_h, None if grad_w is None else grad_w.to(weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """``_linear_ce`` as an autograd node: both gradients are formed in the forward pass, while the logits
    chunk is at hand, and the backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, h, weight, labels, compute_dtype):
        loss, grad_h, grad_w = _linear_ce(
            h, weight, labels, compute_dtype, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(grad_h, grad_w)
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # scaled in place: the buffers belong to this node alone, so it can be backpropagated through once
        if ctx.used:
            raise RuntimeError("linear_cross_entropy: backward through the same loss twice is not supported")
        ctx.used = True
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h.mul_(grad_loss) if grad_h is not None else None,
            grad_w.mul_(grad_loss) if grad_w is not None else None,
            None,
            None,
        )


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(F.linear(h, weight).float(), labels, ignore_index=-100, reduction="sum")`` without
    the full logits.

    h: [..., hidden] (the final-norm hidden states), weight: [vocab, hidden] (the output head), labels: [...].
    Works a chunk of rows at a time: logits, fp32 log-softmax, loss, and — when gradients are needed — the
    logit gradient ``softmax - onehot`` multiplied straight into the gradients of ``h`` and ``weight``, then
    dropped. Peak extra memory is one chunk's logits instead of ~3 copies of [tokens, vocab] in fp32, and the
    logits are never re-read from memory by separate log-softmax / NLL / backward kernels. The matmuls run
    in the autocast dtype when autocast is on (as ``lm_head`` would); the softmax is always fp32.
    """
    h = h.reshape(-1, h.shape[-1])
    labels = labels.reshape(-1)
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = h.dtype
    with torch.autocast(device_type, enabled=False):
        if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
            return _linear_ce(h, weight, labels, compute_dtype, need_h=False, need_w=False)[0]  # evaluation
        return _LinearCrossEntropy.apply(h, weight, labels, compute_dtype)


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
        mask: torch.Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
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
        mask: torch.Tensor | None,
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
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden] (``forward`` without the head; for chunked losses)."""
        B, T = input_ids.shape
        start = kv_cache.length if kv_cache is not None else 0
        end = start + T
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
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] in the model's dtype; with ``labels``, the mean cross-entropy instead.

        input_ids: LongTensor [B, T]. position_ids: [B, T], default: consecutive after the cached tokens (or
        derived from a 2-D ``attention_mask``). kv_cache: append this step's keys/values and attend to all
        cached ones. attention_mask: [B, cached + T] with 1 for real tokens and 0 for padding (combined with
        the causal mask), or a boolean [B, 1, T, cached + T] mask used as given (True = may attend).
        labels: LongTensor [B, T], the target of each position, *already aligned* (``labels[:, t]`` is the
        token that should follow ``input_ids[:, t]``; unlike transformers nothing is shifted here), -100 =
        ignored. Returns a float32 scalar: the mean over the non-ignored targets (0 when there are none),
        equal to ``F.cross_entropy(logits.float(), labels)`` but computed chunk-wise by
        ``linear_cross_entropy`` without materialising the logits.
        """
        h = self.hidden_states(
            input_ids, position_ids=position_ids, kv_cache=kv_cache, attention_mask=attention_mask
        )
        if labels is None:
            return self.lm_head(h)
        loss_sum = linear_cross_entropy(h, self.lm_head.weight, labels)
        return loss_sum / (labels != IGNORE_INDEX).sum().clamp(min=1)

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
