"""The resolved quantization settings and every check that can be made before any work.

``resolve_spec`` turns the ``quantize:`` section plus the model's ``config.json`` into a ``QuantSpec``, failing
with a message that names the knob and the offending layer shape when the combination cannot be packed in the
standard GPTQ layout (``layout.py``) — before a calibration text is read or a weight is loaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import StageInputError, UserInputError
from .layout import QUANTIZED_PROJECTIONS, pack_multiple

DEFAULT_GROUP_SIZE = 128


@dataclass(frozen=True)
class QuantSpec:
    """What every backend is asked to produce (same meaning as gptqmodel's ``QuantizeConfig`` fields)."""

    bits: int = 4
    group_size: int = 128  # -1 = per channel
    sym: bool = True
    desc_act: bool = False
    damp_percent: float = 0.01

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def quantization_config(self) -> dict[str, Any]:
        """The ``config.json`` ``quantization_config`` of a checkpoint in this spec (what vLLM reads)."""
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "desc_act": self.desc_act,
            "damp_percent": self.damp_percent,
            "checkpoint_format": "gptq",
        }


def read_config(model_dir: Path, field: str) -> dict[str, Any]:
    """``config.json`` of a model to quantize, checked to be an unquantized causal LM."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise StageInputError(f"{field}: {model_dir} is not a Hugging Face model directory (no config.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise StageInputError(f"{path}: not valid JSON ({err})") from None
    archs = raw.get("architectures") or []
    if not any(str(a).endswith("ForCausalLM") for a in archs):
        raise StageInputError(
            f"{path}: architectures {archs} is not a causal language model (a reward or classification "
            f"checkpoint?); point {field} at a *ForCausalLM checkpoint such as runs/sft/model"
        )
    qc = raw.get("quantization_config")
    if qc:
        raise StageInputError(
            f"{path}: the model is already quantized ({qc.get('quant_method', '?')}, {qc.get('bits', '?')} "
            f"bits); quantize the full-precision model instead (set {field} to it)"
        )
    return raw


def layer_shapes(raw: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each quantized projection of a Llama-family config."""
    hidden = int(raw["hidden_size"])
    heads = int(raw["num_attention_heads"])
    kv = int(raw.get("num_key_value_heads") or heads)
    head_dim = int(raw.get("head_dim") or hidden // heads)
    inter = int(raw["intermediate_size"])
    return {
        "self_attn.q_proj": (hidden, heads * head_dim),
        "self_attn.k_proj": (hidden, kv * head_dim),
        "self_attn.v_proj": (hidden, kv * head_dim),
        "self_attn.o_proj": (heads * head_dim, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }


def default_group_size(in_features: list[int]) -> int:
    """128, or the largest power of two <= 128 dividing every input width (tiny models); -1 if none does."""
    g = DEFAULT_GROUP_SIZE
    while g >= 2:
        if all(n % g == 0 for n in in_features):
            return g
        g //= 2
    return -1


def resolve_spec(section: Any, raw_config: dict[str, Any], where: str = "quantize") -> QuantSpec:
    """``QuantSpec`` for this model, or a ``UserInputError`` naming the knob and the layer that cannot fit."""
    try:
        shapes = layer_shapes(raw_config)
    except (KeyError, TypeError, ValueError) as err:
        raise StageInputError(
            f"{where}: the model's config.json lacks a Llama-family field ({err})"
        ) from None
    assert set(shapes) == set(QUANTIZED_PROJECTIONS)
    bits = int(section.bits)
    group = section.group_size
    if group is None:
        group = default_group_size([i for i, _ in shapes.values()])
    for name, (in_f, out_f) in shapes.items():
        if group != -1 and in_f % group:
            raise UserInputError(
                f"{where}.group_size: {group} does not divide the input width {in_f} of {name} "
                f"(weight [{out_f}, {in_f}]); use a divisor of {in_f} such as "
                f"{default_group_size([i for i, _ in shapes.values()])}, or -1 for per-channel"
            )
        block = pack_multiple(bits)
        for axis, n in (("input", in_f), ("output", out_f)):
            if n % block:
                raise UserInputError(
                    f"{where}.bits: {bits}-bit codes pack {block} to a block, which does not divide the "
                    f"{axis} width {n} of {name} (weight [{out_f}, {in_f}]); choose bits 4 or 8, or a model "
                    f"whose widths are multiples of {block}"
                )
    return QuantSpec(
        bits=bits,
        group_size=int(group),
        sym=bool(section.sym),
        desc_act=bool(section.desc_act),
        damp_percent=float(section.damp_percent),
    )
