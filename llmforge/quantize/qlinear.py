"""``GPTQLinear``: a linear layer whose weight stays packed in memory and is unpacked on every call.

The memory of a GPTQ model at run time (``bits / 8`` bytes per weight plus the group scales and zeros) at the
price of unpacking each weight matrix per forward: a fallback for serving a model that does not fit in memory
as floats, not a fast kernel (that would be torch's int4 CPU matmul or a CUDA kernel; not built yet). The
result equals the dequantize-on-load model's exactly, since both run ``layout.dequantize``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layout import dequantize


class GPTQLinear(nn.Module):
    def __init__(
        self,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor,
        bits: int,
        bias: torch.Tensor | None = None,
    ):
        super().__init__()
        self.bits = bits
        self.in_features = int(g_idx.numel())
        self.out_features = int(scales.shape[1])
        self.register_buffer("qweight", qweight)
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("scales", scales)
        self.register_buffer("g_idx", g_idx)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def weight_fp(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The floating-point weight ``[out, in]`` this layer encodes."""
        return dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_fp(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"
