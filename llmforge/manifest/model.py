"""`model:` — the Llama-architecture model's shape (or an existing checkpoint to start from)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from .base import Section

# Keep in step with llmforge.model.config.PRESETS (a test checks it); listed here so that a typo is a manifest
# error naming the allowed values, without importing the model package.
PresetName = Literal["tiny", "small", "124M", "350M", "1B"]


class RopeScaling(Section):
    """RoPE context extension; `llama3` is the Llama-3.1 frequency-dependent scheme."""

    rope_type: Literal["llama3", "linear"] = Field(
        default="llama3",
        description="Scaling kind: `llama3` (Llama-3.1 style) or `linear` (position interpolation).",
    )
    factor: float = Field(default=8.0, gt=0, description="Context extension factor (both kinds).")
    low_freq_factor: float = Field(default=1.0, gt=0, description="Llama-3 low-frequency factor.")
    high_freq_factor: float = Field(default=4.0, gt=0, description="Llama-3 high-frequency factor.")
    original_max_position_embeddings: int = Field(default=8192, gt=0, description="Pre-extension context.")


class ModelSection(Section):
    """The model's shape: a preset, explicit fields on top of it, or an existing checkpoint (`from`)."""

    preset: PresetName | None = Field(
        default="tiny",
        description="Named size (`tiny`, `small`, `124M`, `350M`, `1B`); fields set below override it.",
    )
    from_: Path | None = Field(
        default=None,
        alias="from",
        description="Start from this local Hugging Face Llama/Mistral/Qwen2-style checkpoint directory "
        "instead of random weights (continued pretraining). Its config.json gives the shape (the preset is "
        "ignored); only max_position_embeddings, rope_theta, rope_scaling and dropout may change on top of it.",
    )
    vocab_size: int | None = Field(
        default=None,
        gt=0,
        description="Default: the tokenizer's vocabulary size; may be larger (padded), never smaller.",
    )
    hidden_size: int | None = Field(default=None, gt=0, description="Model width.")
    intermediate_size: int | None = Field(default=None, gt=0, description="SwiGLU hidden width.")
    num_hidden_layers: int | None = Field(default=None, gt=0, description="Transformer blocks.")
    num_attention_heads: int | None = Field(default=None, gt=0, description="Query heads.")
    num_key_value_heads: int | None = Field(
        default=None, gt=0, description="Key/value heads (grouped-query attention); divides the query heads."
    )
    head_dim: int | None = Field(
        default=None, gt=0, description="Per-head width; default hidden_size / num_attention_heads."
    )
    max_position_embeddings: int | None = Field(
        default=None, gt=0, description="Longest context (RoPE tables and KV caches are sized by it)."
    )
    rope_theta: float | None = Field(default=None, gt=0, description="RoPE base frequency.")
    rope_scaling: RopeScaling | None = Field(
        default=None, description="RoPE context extension (`llama3` or `linear`); none by default."
    )
    rms_norm_eps: float | None = Field(default=None, gt=0, description="RMSNorm epsilon.")
    tie_word_embeddings: bool | None = Field(default=None, description="Share input and output embeddings.")
    attention_bias: bool | None = Field(
        default=None,
        description="Bias on the q/k/v/o attention projections (Qwen2-style checkpoints load with it).",
    )
    initializer_range: float | None = Field(
        default=None,
        gt=0,
        description="Std of the normal initialization of every weight matrix (default 0.02).",
    )
    dropout: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Dropout on attention probabilities while training (transformers' `attention_dropout`); "
        "off by default, as in Llama.",
    )

    @model_validator(mode="after")
    def _check(self):
        h, nh, kv = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        if h is not None and nh is not None and h % nh:
            raise ValueError(f"hidden_size {h} must be divisible by num_attention_heads {nh}")
        if nh is not None and kv is not None and nh % kv:
            raise ValueError(f"num_attention_heads {nh} must be divisible by num_key_value_heads {kv}")
        return self
