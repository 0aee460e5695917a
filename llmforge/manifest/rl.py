"""Settings of the RL methods of `align:` — GRPO, PPO, rejection sampling — and their reward sources."""

from __future__ import annotations

from pydantic import Field

from .base import Section


class RewardFunction(Section):
    """A reward function: a built-in verifiable reward or a Python callable, with a weight."""

    name: str = Field(
        description="A built-in (`exact_match`, `regex`, `numeric`, `length_penalty`) or `module:function` "
        "with the signature `(prompts, completions, **fields) -> list[float]`."
    )
    weight: float = Field(default=1.0, description="Weight of this reward in the sum.")
    args: dict = Field(default_factory=dict, description="Keyword arguments for the function.")


class RewardSources(Section):
    functions: list[RewardFunction] = Field(
        default_factory=list, description="Reward functions, summed with their weights."
    )
    reward_model: bool = Field(
        default=False, description="Also score completions with the `reward` stage's model."
    )
    reward_model_weight: float = Field(default=1.0, description="Weight of the reward model's score.")


class GRPOConfig(Section):
    prompts: list[str] = Field(
        default_factory=list,
        description="JSONL/Parquet prompts (`prompt` or `messages`, plus any fields reward functions read).",
    )
    group_size: int = Field(default=8, ge=2, description="Completions per prompt (G).")
    prompts_per_step: int = Field(default=4, gt=0, description="Prompts per optimizer step.")
    max_new_tokens: int = Field(default=64, gt=0, description="Longest completion.")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature of rollouts.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling of rollouts.")
    clip_eps: float = Field(default=0.2, gt=0, description="PPO-style clip ε of the policy ratio.")
    clip_eps_high: float | None = Field(
        default=None,
        gt=0,
        description="Upper clip bound ε_high (DAPO's clip-higher, e.g. 0.28); default: clip_eps.",
    )
    scale_rewards: bool = Field(
        default=True,
        description="Divide group-centred rewards by the group's std (GRPO); false = Dr. GRPO's unscaled "
        "advantages.",
    )
    track_kl: bool = Field(
        default=False,
        description="Measure the KL to the starting policy even when kl_beta is 0 (keeps a frozen copy "
        "of the model: one more forward per batch, and its memory).",
    )
    kl_beta: float = Field(
        default=0.0, ge=0, description="KL penalty to the reference (0 = off, current practice)."
    )
    updates_per_batch: int = Field(
        default=1, gt=0, description="Optimizer steps on each batch of rollouts (μ)."
    )


class PPOConfig(Section):
    prompts: list[str] = Field(default_factory=list, description="JSONL/Parquet prompts.")
    prompts_per_step: int = Field(default=8, gt=0, description="Rollouts per optimizer step.")
    max_new_tokens: int = Field(default=64, gt=0, description="Longest completion.")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature of rollouts.")
    clip_eps: float = Field(default=0.2, gt=0, description="Clip ε of the policy ratio.")
    value_clip: float = Field(default=0.2, gt=0, description="Clip of the value-function update.")
    vf_coef: float = Field(default=0.1, ge=0, description="Weight of the value loss.")
    kl_coef: float = Field(default=0.05, ge=0, description="KL penalty to the reference in the reward.")
    gamma: float = Field(default=1.0, gt=0, le=1, description="Discount γ of GAE.")
    lam: float = Field(default=0.95, gt=0, le=1, description="λ of GAE.")
    ppo_epochs: int = Field(default=2, gt=0, description="Passes over each batch of rollouts.")


class RejectionSamplingConfig(Section):
    enabled: bool = Field(default=False, description="Run best-of-N sampling before the method.")
    prompts: list[str] = Field(default_factory=list, description="JSONL/Parquet prompts.")
    num_samples: int = Field(default=8, ge=2, description="Samples per prompt (N).")
    max_new_tokens: int = Field(default=64, gt=0, description="Longest sample.")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature.")
