"""`quantize:` — post-training weight quantization of the final model (GPTQ, with round-to-nearest as the
baseline it is measured against).

Shape checks (does the group size divide every quantized layer's input width, do the packed words fit the
output width) need the model's config, so they run in the stage before any work (``llmforge.quantize.spec``),
not here; this section only rejects values that are wrong for every model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .base import StageSection


class QuantizeSection(StageSection):
    method: Literal["gptq", "rtn"] = Field(
        default="gptq",
        description="`gptq`: GPTQ (error-compensating, needs calibration data) through `backend`; `rtn`: "
        "round-to-nearest only (no calibration, the baseline). Both write the same standard GPTQ layout.",
    )
    backend: Literal["gptqmodel"] = Field(
        default="gptqmodel", description="Library that runs GPTQ (gptqmodel; CPU and CUDA)."
    )
    bits: Literal[2, 3, 4, 8] = Field(default=4, description="Bits per weight.")
    group_size: int | None = Field(
        default=None,
        description="Input columns that share one scale and zero point. Default: 128, or for a model narrower "
        "than that the largest power of two <= 128 that divides every quantized layer's input width. "
        "-1 = one group per output row (per channel).",
    )
    sym: bool = Field(
        default=True, description="Symmetric quantization (zero point fixed at the middle of the range)."
    )
    desc_act: bool = Field(
        default=False,
        description="Act-order: quantize columns in order of decreasing Hessian diagonal (better accuracy at "
        "low bits; the checkpoint then carries a permuting g_idx).",
    )
    damp_percent: float = Field(
        default=0.01,
        gt=0,
        lt=1,
        description="GPTQ dampening: this fraction of the mean Hessian diagonal is added to it before the "
        "Cholesky factorisation (raise it when quantization reports a non positive-definite Hessian).",
    )
    calibration: Literal["data", "sft"] = Field(
        default="data",
        description="Calibration texts: `data` = documents of the token shards' train split (the data stage's "
        "corpus as the tokenizer stage split it; perplexity is measured on the disjoint val split), `sft` = "
        "the SFT stage's conversations (`sft.data`) rendered with the model's chat template.",
    )
    eval_on: Literal["auto", "data", "sft"] = Field(
        default="auto",
        description="Held-out text the perplexities are measured on: `data` = the token shards' val split, "
        "`sft` = conversations of `sft.data` not used for calibration, rendered with the chat template; "
        "`auto` = the calibration source (a chat model is scored on conversations, not on web text).",
    )
    calibration_samples: int = Field(
        default=128, ge=1, description="Calibration sequences; the source must hold at least this many."
    )
    calibration_seq_len: int = Field(
        default=512,
        ge=8,
        description="Tokens per calibration sequence (longer documents are cut; must not exceed the model's "
        "max_position_embeddings).",
    )
    eval_tokens: int = Field(
        default=32768,
        ge=64,
        description="Held-out (val split) tokens the perplexity of the original, GPTQ and RTN models is "
        "measured on.",
    )
    max_ppl_increase: float | None = Field(
        default=0.25,
        gt=0,
        description="Fail the stage when the quantized model's perplexity exceeds the original's by more than "
        "this fraction (0.25 = +25%); null = never fail on perplexity.",
    )
    seed: int = Field(default=0, description="Seed that picks the calibration sequences.")
    from_: str | None = Field(
        default=None,
        alias="from",
        description="Model to quantize: a local Hugging Face Llama-family directory or a stage's model "
        "(`runs/sft/model`). Default: the newest enabled upstream stage's model (distill, align, sft, pretrain).",
    )

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int | None) -> int | None:
        if v is not None and v != -1 and v < 1:
            raise ValueError(f"must be a positive number of columns or -1 for per-channel (got {v})")
        return v
