"""Round-to-nearest: the baseline GPTQ is measured against, written in the same GPTQ layout.

Each weight is rounded to the nearest point of the same grid GPTQ uses (same bits, group size, symmetric or
not, min/max ranges: ``layout.quant_params``) — only GPTQ's error compensation is missing. Writing the very
same layout means the evaluation loads both through one path, so a perplexity difference is the method's,
not the loader's. Act-order has no meaning without a Hessian; RTN ignores ``desc_act``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..console import get_logger
from ..errors import CheckpointError
from .layout import QUANTIZED_PROJECTIONS, rtn_pack
from .spec import QuantSpec

log = get_logger(__name__)


def _source_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors weights to quantize")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f), device="cpu"))
    return tensors


def quantize_state_dict(tensors: dict[str, torch.Tensor], spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Hugging Face-named fp tensors → the same names with every decoder projection in GPTQ form."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if (
            prefix
            and prefix.startswith("model.layers.")
            and prefix.split(".", 3)[-1] in QUANTIZED_PROJECTIONS
        ):
            for key, value in rtn_pack(t, spec.bits, spec.group_size, spec.sym).items():
                out[f"{prefix}.{key}"] = value.contiguous()
        else:
            out[name] = t.contiguous()
    return out


class RTNBackend:
    name = "rtn"

    def check(self) -> None:
        return None  # pure torch

    def quantize(self, model_dir: Path, out_dir: Path, spec: QuantSpec, calibration: list[list[int]]) -> None:
        from safetensors.torch import save_file

        del calibration  # RTN needs none
        model_dir, out_dir = Path(model_dir), Path(out_dir)
        tensors = quantize_state_dict(_source_tensors(model_dir), spec)
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        qc = {**spec.quantization_config(), "desc_act": False, "quantizer": "llmforge-rtn"}
        config["quantization_config"] = qc
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (out_dir / "quantize_config.json").write_text(json.dumps(qc, indent=2) + "\n", encoding="utf-8")
        log.info(f"rtn: {spec.bits}-bit g{spec.group_size} written to {out_dir}")
