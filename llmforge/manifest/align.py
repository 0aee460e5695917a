"""`reward:` and `align:` — the reward model, and one alignment method per run (DPO family, GRPO, PPO),
optionally after rejection sampling.

Both pipelines of the field are expressible: the GPT style (sft → reward → align.method: ppo) and the Llama style
(reward → align.rejection_sampling → align.method: dpo), plus GRPO with verifiable rewards (DeepSeek-R1 style).
The RL method settings (GRPO, PPO, rejection sampling, reward functions) live in ``rl.py``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Section, runtime_only
from .rl import GRPOConfig, PPOConfig, RejectionSamplingConfig, RewardSources
from .train import TrainSection


class RewardSection(TrainSection):
    """The reward model: a scalar head on the model, trained with a Bradley–Terry loss on preference pairs."""

    from_: str | None = Field(
        default=None,
        alias="from",
        description="Model to initialise the reward model from (default: the newest enabled upstream model).",
    )
    data: list[str] = Field(
        default_factory=list,
        description="Preference JSONL/Parquet: `prompt` (or `messages`), `chosen`, `rejected`.",
    )
    val_fraction: float = Field(default=0.1, ge=0, lt=1, description="Share of pairs held out.")
    margin: bool = Field(
        default=False, description="Use each pair's `margin` field in the loss: -log σ(r_c - r_r - m)."
    )
    lr: float = Field(default=1e-4, gt=0, description="Peak learning rate.")
    max_steps: int = Field(default=200, gt=0, description="Optimizer steps.")
    warmup_steps: int = Field(default=10, ge=0, description="Linear warmup steps; must be < max_steps.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")


class DPOConfig(Section):
    """Direct preference optimisation and its variants (one `loss`)."""

    data: list[str] = Field(
        default_factory=list,
        description="Preference JSONL/Parquet (`prompt` or `messages`, `chosen`, `rejected`); default: "
        "`reward.data`, or the pairs rejection sampling wrote.",
    )
    loss: Literal["sigmoid", "ipo", "simpo", "orpo"] = Field(
        default="sigmoid",
        description="`sigmoid` = DPO (with `label_smoothing` = cDPO), `ipo`, `simpo` (reference-free, "
        "length-normalised), `orpo` (reference-free, odds ratio + SFT term).",
    )
    beta: float = Field(default=0.1, gt=0, description="β: strength of the implicit KL to the reference.")
    label_smoothing: float = Field(
        default=0.0, ge=0, lt=0.5, description="cDPO: assumed share of flipped preference labels."
    )
    simpo_gamma: float = Field(
        default=0.5,
        ge=0,
        description="SimPO target reward margin γ, in reward units: L = -log σ(β·Δavg log π - γ) (TRL's "
        "`simpo_gamma`).",
    )
    orpo_lambda: float = Field(default=0.1, gt=0, description="ORPO: weight λ of the odds-ratio term.")
    precompute_reference: bool = Field(
        default=True,
        description="Compute the reference log-probs once before training (no second model in memory); "
        "false = keep a frozen reference model beside the policy.",
    )
    packing: bool = Field(
        default=False,
        description="Pack a batch's chosen and rejected sequences into rows of `seq_len` tokens (attention and "
        "positions never cross sequences; the same log-probs) instead of padding each to the longest. Off by "
        "default: on CPU the per-sequence attention of packed rows measured 2x slower than padding.",
    )
    val_fraction: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="Share of pairs held out (by a stable hash of each pair) to measure reward accuracy and "
        "margins before and after training.",
    )
    max_new_tokens: int = Field(
        default=32, gt=0, description="Longest greedy answer to a held-out prompt (before/after samples)."
    )


class AlignSection(TrainSection):
    """One alignment method per run on the resolved model (default: the SFT model)."""

    from_: str | None = Field(
        default=None,
        alias="from",
        description="Policy to start from (default: the newest enabled upstream model, i.e. sft's).",
    )
    method: Literal["dpo", "grpo", "ppo", "none"] = Field(
        default="dpo",
        description="`dpo` (and variants), `grpo`, `ppo`; `none` = only rejection sampling (its SFT set).",
    )
    rejection_sampling: RejectionSamplingConfig = Field(
        default_factory=RejectionSamplingConfig,
        description="Best-of-N sampling first (Llama-2 style); its pairs feed DPO, its best answers SFT.",
    )
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="DPO family settings.")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="GRPO settings.")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="PPO settings.")
    rewards: RewardSources = Field(
        default_factory=RewardSources,
        description="Where rewards come from for GRPO, PPO and rejection sampling.",
    )
    eval_prompts: int = runtime_only(
        default=32, ge=0, description="Held-out prompts scored before and after alignment."
    )
    lr: float = Field(default=5e-6, gt=0, description="Peak learning rate.")
    max_steps: int = Field(default=100, gt=0, description="Optimizer steps.")
    warmup_steps: int = Field(default=5, ge=0, description="Linear warmup steps; must be < max_steps.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
