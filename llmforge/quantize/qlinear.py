"""``GPTQLinear``: a linear layer whose weight stays quantized in memory.

Two ways to multiply, chosen per layer when it is built (``kernel``):

* ``"int4"`` — torch's own int4 CPU matmul (``aten._weight_int4pack_mm_for_cpu``): the 4-bit codes are repacked
  once into the kernel's layout and multiplied without ever forming the float weight. It needs 4 bits, a CPU
  tensor, a group size of 32/64/128/256 that divides the input width, an output width that is a multiple of 16
  and no act-order permutation (a trivial ``g_idx``). The kernel computes ``(q - 8) * s + (8 - z) * s``, i.e.
  exactly ``(q - z) * s``; in float32 its result equals the dequantized matmul up to the order of additions.
* ``"unpack"`` — unpack the stored words into the float weight on every call (``layout.dequantize``) and run
  ``F.linear``: any bit width, act-order, any device (this is the CUDA path: llmforge has no CUDA int4 kernel of
  its own), at the price of rebuilding each matrix per forward.

``"auto"`` takes ``int4`` where the layer allows it and ``unpack`` elsewhere. Either way the memory held is the
quantized model's (about ``bits / 8`` bytes per weight plus the group scales and zeros), which is the point of
serving packed; for speed on small models the engine's default is to dequantize on load instead
(``load.load_gptq(packed=False)``) — see ``benchmarks/bench_quantize.py`` for the measured trade.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .layout import dequantize, unpack

INT4_GROUP_SIZES = (32, 64, 128, 256)
Kernel = Literal["auto", "int4", "unpack"]


def _has_int4_cpu_kernel() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_convert_weight_to_int4pack_for_cpu") and hasattr(ops, "_weight_int4pack_mm_for_cpu")


def trivial_group_size(g_idx: torch.Tensor) -> int | None:
    """The group size when ``g_idx`` is the plain ``i // group_size`` (no act-order permutation), else None."""
    n = int(g_idx.numel())
    g = g_idx.to(torch.int64).cpu()
    groups = int(g.max()) + 1 if n else 0
    if groups == 0 or n % groups:
        return None
    size = n // groups
    return size if torch.equal(g, torch.arange(n) // size) else None


def int4_unsupported_reason(bits: int, g_idx: torch.Tensor, out_features: int, device) -> str | None:
    """Why torch's int4 CPU kernel cannot run this layer (None when it can)."""
    if not _has_int4_cpu_kernel():
        return "this torch build has no int4 CPU kernel"
    if torch.device(device).type != "cpu":
        return f"the int4 kernel is CPU-only (layer on {device})"
    if bits != 4:
        return f"{bits}-bit weights (the kernel is 4-bit)"
    gs = trivial_group_size(g_idx)
    if gs is None:
        return "act-order (a permuting g_idx)"
    if gs not in INT4_GROUP_SIZES:
        return f"group size {gs} (the kernel takes {', '.join(map(str, INT4_GROUP_SIZES))})"
    if out_features % 16:
        return f"output width {out_features} is not a multiple of 16"
    return None


class GPTQLinear(nn.Module):
    def __init__(
        self,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor,
        bits: int,
        bias: torch.Tensor | None = None,
        kernel: Kernel = "auto",
    ):
        super().__init__()
        self.bits = bits
        self.in_features = int(g_idx.numel())
        self.out_features = int(scales.shape[1])
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        why_not = int4_unsupported_reason(bits, g_idx, self.out_features, qweight.device)
        if kernel == "int4" and why_not:
            raise ValueError(f"int4 kernel unavailable for this layer: {why_not}")
        self.kernel = "int4" if kernel != "unpack" and why_not is None else "unpack"
        if self.kernel == "int4":
            self.group_size = int(trivial_group_size(g_idx))
            q = unpack(qweight, bits, 0).t().to(torch.int32).contiguous()  # [out, in], codes 0..15
            z = ((unpack(qzeros, bits, 1) + 1) & 0xF).to(torch.float32)  # [groups, out]; v1 stores zero - 1
            s = scales.to(torch.float32)
            self.register_buffer("int4_weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            self.register_buffer("int4_scale_zeros", torch.stack([s, (8.0 - z) * s], -1).contiguous())
            self._sz: dict[torch.dtype, torch.Tensor] = {}
        else:
            self.register_buffer("qweight", qweight)
            self.register_buffer("qzeros", qzeros)
            self.register_buffer("scales", scales)
            self.register_buffer("g_idx", g_idx)

    def _scale_zeros(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._sz:
            self._sz[dtype] = self.int4_scale_zeros.to(dtype)
        return self._sz[dtype]

    def weight_fp(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The floating-point weight ``[out, in]`` this layer encodes."""
        if self.kernel == "int4":
            eye = torch.eye(self.in_features, dtype=torch.float32, device=self.int4_weight.device)
            return self._int4_mm(eye).t().contiguous().to(dtype)
        return dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, dtype)

    def _int4_mm(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).contiguous(),
            self.int4_weight,
            self.group_size,
            self._scale_zeros(x.dtype),
        )
        return y.reshape(*shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.kernel == "int4":
            y = self._int4_mm(x)
            return y if bias is None else y + bias
        return F.linear(x, self.weight_fp(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"kernel={self.kernel}"
        )
