"""The standard GPTQ checkpoint layout: one definition of how quantized weights are packed and unpacked.

This is the format AutoGPTQ introduced and that gptqmodel, transformers + optimum and vLLM (``--quantization
gptq``) read: every quantized ``nn.Linear`` of weight ``W [out, in]`` is stored as four tensors

* ``qweight`` int32 ``[in * bits / 32, out]``: the integer codes ``q[in, out]`` packed along the input axis,
  value ``j`` of a 32-value block in bits ``[bits*j, bits*j + bits)`` of the little-endian bit stream of its
  ``bits`` words (for 2/4/8 bits that is simply ``32 / bits`` codes per word, the lowest bits first);
* ``qzeros`` int32 ``[groups, out * bits / 32]``: the zero points, packed the same way along the output axis,
  stored **minus one** (the "v1" convention every GPTQ reader adds back);
* ``scales`` float16 ``[groups, out]``;
* ``g_idx`` int32 ``[in]``: the group of every input column (``i // group_size`` without act-order, a
  permuted assignment with it).

so that ``W[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])``. ``config.json`` carries
``quantization_config`` with ``quant_method: gptq``, ``bits``, ``group_size``, ``sym``, ``desc_act``.

Only the decoder layers' seven projections are quantized (as GPTQ does for Llama); embeddings, norms and
``lm_head`` stay in floating point.
"""

from __future__ import annotations

import torch

QUANTIZED_PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
SUPPORTED_BITS = (2, 3, 4, 8)


def pack_multiple(bits: int) -> int:
    """Values whose count must divide a packed axis: 32/bits codes per word, or 32 codes per 3 words at 3 bits."""
    return 32 // bits if 32 % bits == 0 else 32


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along ``dim`` into int32 words (see the module docstring)."""
    v = values.movedim(dim, -1).to(torch.int64)
    n = v.shape[-1]
    block = pack_multiple(bits)
    if n % block:
        raise ValueError(f"{n} values along dim {dim} is not a multiple of {block} ({bits}-bit packing)")
    if 32 % bits == 0:
        per = 32 // bits
        v = v.reshape(*v.shape[:-1], n // per, per)
        shifts = torch.arange(per, dtype=torch.int64) * bits
        words = (v << shifts).sum(-1)
    else:  # 3 bits: 32 codes -> one 96-bit stream -> 3 words; some codes straddle two words
        v = v.reshape(*v.shape[:-1], n // 32, 32)
        pos = torch.arange(32, dtype=torch.int64) * bits
        word, shift = pos // 32, pos % 32
        out = torch.zeros(*v.shape[:-1], bits, dtype=torch.int64)
        for j in range(32):
            low = (v[..., j] << shift[j]) & 0xFFFFFFFF
            out[..., word[j]] |= low
            if shift[j] + bits > 32:
                out[..., word[j] + 1] |= v[..., j] >> (32 - shift[j])
        words = out.reshape(*v.shape[:-2], -1)
    # int64 holding an unsigned 32-bit pattern -> the same bits as int32
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim)


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of ``pack``: int32 words → int64 codes along ``dim`` (``32 / bits`` times as many)."""
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        per = 32 // bits
        shifts = torch.arange(per, dtype=torch.int64) * bits
        v = (w.unsqueeze(-1) >> shifts) & mask
        v = v.reshape(*w.shape[:-1], -1)
    else:
        if w.shape[-1] % bits:
            raise ValueError(
                f"{w.shape[-1]} words along dim {dim} is not a multiple of {bits} (3-bit packing)"
            )
        w = w.reshape(*w.shape[:-1], -1, bits)
        pos = torch.arange(32, dtype=torch.int64) * bits
        word, shift = pos // 32, pos % 32
        cols = []
        for j in range(32):
            x = w[..., word[j]] >> shift[j]
            if shift[j] + bits > 32:
                x = x | (w[..., word[j] + 1] << (32 - shift[j]))
            cols.append(x & mask)
        v = torch.stack(cols, -1).reshape(*w.shape[:-2], -1)
    return v.movedim(-1, dim)


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The floating-point weight ``[out, in]`` one GPTQ module stores (the module docstring's formula)."""
    q = unpack(qweight, bits, 0)  # [in, out]
    zeros = (unpack(qzeros, bits, 1) + 1) & ((1 << bits) - 1)  # [groups, out], v1 stores zero - 1
    g = g_idx.to(torch.int64)
    s = scales.to(torch.float32)
    w = s[g] * (q - zeros[g]).to(torch.float32)  # [in, out]
    return w.t().contiguous().to(dtype)


def quant_params(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scale and zero point of every (row, group) of ``w [out, in]``: ``[out, groups]`` each.

    The min/max rule of GPTQ's quantizer, so RTN and GPTQ differ only in how they round, never in the grid:
    the range always includes 0; symmetric grids centre the zero point at ``2**(bits-1)``; an all-zero group
    gets the range [-1, 1]. The scale is rounded to float16 first (the stored precision), so the codes are
    the nearest ones for the scale a reader will actually use.
    """
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    x = w.to(torch.float32).reshape(out_f, in_f // g, g)
    maxq = 2**bits - 1
    xmin = x.amin(-1).clamp(max=0)
    xmax = x.amax(-1).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / maxq).to(torch.float16).to(torch.float32)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero.clamp(0, maxq)


def rtn_pack(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> dict[str, torch.Tensor]:
    """Round-to-nearest quantize ``w [out, in]`` into the four GPTQ tensors (no act-order: ``g_idx = i // g``)."""
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    scale, zero = quant_params(w, bits, group_size, sym)  # [out, groups]
    x = w.to(torch.float32).reshape(out_f, in_f // g, g)
    q = torch.clamp(torch.round(x / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, 2**bits - 1)
    q = q.reshape(out_f, in_f).to(torch.int64)
    stored_zero = (zero.to(torch.int64) - 1) & (2**bits - 1)  # v1: zero - 1 (wraps like every GPTQ writer)
    return {
        "qweight": pack(q.t(), bits, 0),
        "qzeros": pack(stored_zero.t(), bits, 1),
        "scales": scale.t().contiguous().to(torch.float16),
        "g_idx": (torch.arange(in_f, dtype=torch.int32) // g).to(torch.int32),
    }
