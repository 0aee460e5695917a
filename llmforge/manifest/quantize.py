"""`quantize:` — GPTQ quantization of the final model (the stage lands with its issue; the section validates
today so a manifest written now keeps working)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from .base import StageSection


class QuantizeSection(StageSection):
    method: Literal["gptq"] = Field(default="gptq", description="Quantization method (GPTQ via gptqmodel).")
    bits: Literal[2, 3, 4, 8] = Field(default=4, description="Weight bits.")
    group_size: int = Field(default=128, description="Columns per quantization group (-1 = per channel).")
    desc_act: bool = Field(default=False, description="Act-order (quantize columns by activation size).")
    sym: bool = Field(default=True, description="Symmetric quantization.")
    calibration_samples: int = Field(default=128, gt=0, description="Calibration texts from the corpus.")
    source: Path | None = Field(
        default=None, description="Model to quantize (default: the last stage's model)."
    )
