"""GPTQ through gptqmodel (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers").

Per layer, GPTQ quantizes the columns of ``W`` one at a time and spreads each column's rounding error over the
not-yet-quantized columns using the inverse Hessian ``H = 2 X Xᵀ`` of the layer's calibration inputs
(``argmin_Q ||W X - Q X||²``), which is what makes 4-bit usable where round-to-nearest is not.

gptqmodel (pinned 7.6.0, see ``docs/quantize.md``) is used because it quantizes on CPU and keeps the CPU torch;
AutoGPTQ is unmaintained and requires CUDA. What it prints to stdout is discarded (library code never prints);
its own logger still writes to stderr.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..console import get_logger
from ..errors import MissingDependencyError, StageError
from .spec import QuantSpec

log = get_logger(__name__)
EXTRA = "quantize"
PIN = "gptqmodel==7.6.0"


def _env() -> None:
    # gptqmodel sizes a CPU worker pool from the core count and fails on 2-core machines unless told
    # (`Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1`).
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _import_gptqmodel():
    _env()
    try:
        import gptqmodel
    except ImportError as err:
        raise MissingDependencyError(
            "gptqmodel", EXTRA, "GPTQ quantization (quantize.method: gptq)", hint=f"pip install '{PIN}'"
        ) from err
    return gptqmodel


class GPTQModelBackend:
    name = "gptqmodel"

    def check(self) -> None:
        _import_gptqmodel()

    def quantize(self, model_dir: Path, out_dir: Path, spec: QuantSpec, calibration: list[list[int]]) -> None:
        import torch

        gptqmodel = _import_gptqmodel()
        from ..model.llama import torch_dtype
        from .spec import read_config

        raw = read_config(Path(model_dir), "quantize.from")
        # quantize in the dtype the weights are stored in: the non-quantized tensors (embeddings, norms,
        # head) are then written as they came, and the RTN baseline, which keeps them too, is comparable
        dtype = torch_dtype(str(raw.get("torch_dtype") or raw.get("dtype") or "float32"))
        qc = gptqmodel.QuantizeConfig(
            bits=spec.bits,
            group_size=spec.group_size,
            sym=spec.sym,
            desc_act=spec.desc_act,
            damp_percent=spec.damp_percent,
        )
        rows = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calibration]
        try:
            # library code never prints: gptqmodel's own prints and progress bars go to /dev/null
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                model = gptqmodel.GPTQModel.load(str(model_dir), qc, device="cpu", dtype=dtype)
                with torch.inference_mode(False):
                    model.quantize(rows, batch_size=1)
                model.save(str(out_dir))
        except MissingDependencyError:
            raise
        except Exception as err:  # gptqmodel raises plain exceptions; keep its message, name the step
            raise StageError(
                f"quantize: gptqmodel failed quantizing {model_dir} ({type(err).__name__}: {err}). If it "
                "mentions a non positive-definite Hessian, raise quantize.damp_percent or calibration_samples"
            ) from err
        log.info(f"gptq: {spec.bits}-bit g{spec.group_size} written to {out_dir}")
