"""`align:`, `quantize:`, `serve:` — the shape of the later stages (not built yet in this version).

They validate today so a manifest written now keeps working when the stages land.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from .base import Section, StageSection


class AlignSection(StageSection):
    methods: list[Literal["reward", "dpo", "grpo", "ppo", "rejection_sampling"]] = Field(
        default_factory=lambda: ["dpo"], description="Alignment methods to run, in order."
    )
    preference_data: list[str] = Field(
        default_factory=list, description="JSONL with `prompt`, `chosen`, `rejected` (DPO / reward model)."
    )
    prompts: list[str] = Field(
        default_factory=list, description="JSONL prompts for GRPO/PPO/rejection sampling."
    )
    beta: float = Field(default=0.1, gt=0, description="DPO/KL strength.")
    max_steps: int = Field(default=500, gt=0, description="Optimizer steps per method.")
    lr: float = Field(default=5e-7, gt=0, description="Learning rate.")


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


class SafetyConfig(Section):
    blocklist: list[str] = Field(default_factory=list, description="Regexes that block a prompt or output.")
    pii: Literal["off", "redact", "block"] = Field(
        default="off", description="Apply the data stage's PII detectors."
    )
    classifier_model: str | None = Field(
        default=None, description="Served model asked for a safe/unsafe verdict."
    )
    custom: list[str] = Field(default_factory=list, description="Extra filters as `module:function`.")


class ServeSection(StageSection):
    engine: Literal["local", "vllm"] = Field(
        default="local", description="Inference engine behind the gateway."
    )
    model: Path | None = Field(default=None, description="Model to serve (default: the last stage's model).")
    host: str = Field(default="127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(default=8000, gt=0, lt=65536, description="Port the gateway listens on.")
    api_key_env: str | None = Field(default=None, description="Environment variable holding the API key.")
    max_tokens: int = Field(default=1024, gt=0, description="Upper bound on `max_tokens` per request.")
    max_n: int = Field(default=4, gt=0, description="Upper bound on `n` per request.")
    max_queue: int = Field(default=64, gt=0, description="Requests waiting before 429.")
    max_body_bytes: int = Field(default=1_000_000, gt=0, description="Largest request body.")
    safety: SafetyConfig = Field(default_factory=SafetyConfig, description="Safety filter chain.")
