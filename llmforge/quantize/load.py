"""Load a GPTQ checkpoint (the standard layout, ``layout.py``) into llmforge's ``Llama``.

Dequantize-on-load: every ``qweight``/``qzeros``/``scales``/``g_idx`` quadruple becomes the floating-point
weight it encodes, so the result is an ordinary ``Llama`` that computes exactly what the quantized model
computes (up to the order of float additions), on any device, with no kernel library. It costs the fp model's
memory; the saving on disk and in transfer stays. This is what the quantize stage evaluates with, and what the
engine loads when it has no int4 kernel.

Works for checkpoints written by gptqmodel, AutoGPTQ, optimum and llmforge's own RTN baseline, with or
without act-order; 2/3/4/8 bits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..console import get_logger
from ..errors import CheckpointError
from .layout import SUPPORTED_BITS, dequantize

log = get_logger(__name__)
QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


def gptq_config(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The ``quantization_config`` of a GPTQ checkpoint, or None for an unquantized one.

    Reads ``config.json`` (transformers' place) and falls back to ``quantize_config.json`` (AutoGPTQ's).
    """
    d = Path(directory)
    try:
        raw = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    qc = raw.get("quantization_config")
    if not qc and (d / "quantize_config.json").is_file():
        qc = json.loads((d / "quantize_config.json").read_text(encoding="utf-8"))
        qc.setdefault("quant_method", "gptq")
    if not qc:
        return None
    return qc


def is_gptq_checkpoint(directory: str | os.PathLike) -> bool:
    qc = gptq_config(directory)
    return bool(qc) and str(qc.get("quant_method", "")).lower() == "gptq"


def _read_tensors(d: Path) -> tuple[dict[str, torch.Tensor], str]:
    from safetensors.torch import load_file

    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{d}: a GPTQ checkpoint needs *.safetensors weights; none found")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f), device="cpu"))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{f}: corrupt or unreadable safetensors ({err})") from None
    return tensors, str(files[0] if len(files) == 1 else d)


def dequantized_state_dict(
    directory: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(the unquantized ``config.json`` dict, Hugging Face-named fp tensors) of a GPTQ checkpoint."""
    d = Path(directory)
    qc = gptq_config(d)
    if not qc or str(qc.get("quant_method", "")).lower() != "gptq":
        raise CheckpointError(
            f"{d / 'config.json'}: not a GPTQ checkpoint (no quantization_config.quant_method gptq)"
        )
    bits = int(qc.get("bits", 0))
    if bits not in SUPPORTED_BITS:
        raise CheckpointError(
            f"{d / 'config.json'}: quantization_config.bits={bits}; supported: {SUPPORTED_BITS}"
        )
    fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
    if fmt not in ("gptq", ""):
        raise CheckpointError(
            f"{d / 'config.json'}: checkpoint_format {fmt!r}; llmforge reads the standard 'gptq' layout "
            "(re-save the model with gptqmodel's default format)"
        )
    raw = json.loads((d / "config.json").read_text(encoding="utf-8"))
    raw.pop("quantization_config", None)
    tensors, source = _read_tensors(d)
    out: dict[str, torch.Tensor] = {}
    prefixes = sorted({k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")})
    if not prefixes:
        raise CheckpointError(f"{source}: config.json says GPTQ but no tensor ends in .qweight")
    for p in prefixes:
        parts = {s: tensors.get(p + s) for s in QUANT_SUFFIXES}
        missing = [p + s for s, t in parts.items() if t is None]
        if missing:
            raise CheckpointError(f"{source}: GPTQ module {p} lacks {', '.join(missing)}")
        try:
            w = dequantize(
                parts[".qweight"], parts[".qzeros"], parts[".scales"], parts[".g_idx"], bits, dtype
            )
        except (RuntimeError, IndexError, ValueError) as err:
            raise CheckpointError(f"{source}: GPTQ tensors of {p} are inconsistent ({err})") from None
        out[p + ".weight"] = w
        if p + ".bias" in tensors:
            out[p + ".bias"] = tensors[p + ".bias"].to(dtype)
    quantized = set(prefixes)
    for k, t in tensors.items():
        prefix = k.rsplit(".", 1)[0]
        if prefix in quantized:
            continue
        out[k] = t.to(dtype) if t.is_floating_point() else t
    return raw, out


def load_gptq(
    directory: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    packed: bool = False,
    kernel: str = "auto",
):
    """An llmforge ``Llama`` (eval mode) holding the weights a GPTQ checkpoint encodes, dequantized.

    packed: keep the quantized projections packed (``qlinear.GPTQLinear``): the quantized model's memory at run
    time. ``kernel`` picks how they multiply (``qlinear``'s docstring): ``"auto"`` = torch's int4 CPU matmul
    where a layer fits it, unpack-per-call elsewhere. Loading still passes through the float weights once.
    """
    from ..errors import ModelError
    from ..model.checkpoint import load_hf_state_dict
    from ..model.config import LlamaConfig
    from ..model.llama import Llama

    d = Path(directory)
    raw, tensors = dequantized_state_dict(d, dtype)
    try:
        config = LlamaConfig.from_hf_dict(raw, where=str(d / "config.json"))
    except ModelError as err:
        raise CheckpointError(str(err)) from None
    with torch.device("meta"):
        model = Llama(config)
    load_hf_state_dict(model, tensors, source=str(d), model_type=raw.get("model_type", "llama"))
    model.reset_rope("cpu")  # the tables were built on meta; make them real before moving the model
    model.to(device=device, dtype=dtype)
    model.reset_rope(device)
    model.config.torch_dtype = {
        torch.float32: "float32",
        torch.float16: "float16",
        torch.bfloat16: "bfloat16",
    }[dtype]
    if packed:
        _pack_projections(model, d, device, kernel)
    model.eval()
    return model


def _pack_projections(model, d: Path, device: str | torch.device, kernel: str = "auto") -> None:
    from .layout import QUANTIZED_PROJECTIONS
    from .qlinear import GPTQLinear

    qc = gptq_config(d) or {}
    tensors, _ = _read_tensors(d)
    for i, layer in enumerate(model.model.layers):
        for name in QUANTIZED_PROJECTIONS:
            p = f"model.layers.{i}.{name}"
            if p + ".qweight" not in tensors:
                continue
            parent_name, attr = name.split(".")
            parent = getattr(layer, parent_name)
            old = getattr(parent, attr)
            q = GPTQLinear(
                *(tensors[p + s].to(device) for s in QUANT_SUFFIXES),
                bits=int(qc["bits"]),
                bias=None if old.bias is None else old.bias.detach(),
                kernel=kernel,
            )
            setattr(parent, attr, q)


def load_model(
    directory: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    quantized: str = "dequantize",
):
    """Any checkpoint llmforge serves: others as stored; GPTQ ones in float (fp32 unless ``dtype``) with
    ``quantized="dequantize"``, or kept 4-bit in memory with ``quantized="packed"`` (``load_gptq(packed=True)``).
    """
    if is_gptq_checkpoint(directory):
        if quantized not in ("dequantize", "packed"):
            raise ValueError(f"quantized={quantized!r}: choose 'dequantize' or 'packed'")
        return load_gptq(directory, device=device, dtype=dtype or torch.float32, packed=quantized == "packed")
    from ..model import load_pretrained

    return load_pretrained(directory, device=device, dtype=dtype)
