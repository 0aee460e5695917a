"""`pretrain:`, `sft:`, `distill:` — sections that drive the one training loop."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import Section, StageSection


class WandbConfig(Section):
    enabled: bool = Field(default=False, description="Log metrics to Weights & Biases (if installed).")
    project: str | None = Field(default=None, description="W&B project (default: the llmforge project name).")


class SlurmConfig(Section):
    partition: str | None = Field(default=None, description="`#SBATCH --partition` of the generated script.")
    account: str | None = Field(default=None, description="`#SBATCH --account` of the generated script.")
    time: str = Field(default="24:00:00", description="`#SBATCH --time` wall-clock limit.")
    gpus_per_node: int | None = Field(
        default=None, gt=0, description="GPUs requested per node (default: `nproc`)."
    )
    cpus_per_task: int = Field(
        default=16, gt=0, description="CPU cores per node (one torchrun task per node)."
    )
    extra_sbatch: list[str] = Field(
        default_factory=list,
        description="Extra `#SBATCH` lines, verbatim without the prefix (e.g. `--qos=high`).",
    )
    setup: list[str] = Field(
        default_factory=list,
        description="Shell lines run on every node before torchrun (e.g. `source .venv/bin/activate`).",
    )


class TrainSection(StageSection):
    """Knobs shared by every objective that runs through `train/loop.py`."""

    max_steps: int = Field(default=1000, gt=0, description="Optimizer steps.")
    batch_size: int = Field(default=8, gt=0, description="Sequences per micro-batch per process.")
    grad_accum: int = Field(default=1, gt=0, description="Micro-batches accumulated per optimizer step.")
    seq_len: int = Field(default=512, gt=0, description="Tokens per training sequence.")
    lr: float = Field(default=3e-4, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="Final LR as a fraction of the peak.")
    warmup_steps: int = Field(default=100, ge=0, description="Linear warmup steps; must be < max_steps.")
    schedule: Literal["cosine", "linear", "wsd", "constant"] = Field(
        default="cosine", description="LR decay after warmup (`wsd` = warmup-stable-decay)."
    )
    decay_fraction: float = Field(
        default=0.2, gt=0, le=1, description="For `wsd`: fraction of steps spent in the final decay."
    )
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW weight decay (not on norms/biases).")
    beta1: float = Field(default=0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(default=0.95, ge=0, lt=1, description="AdamW beta2.")
    eps: float = Field(default=1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(default=1.0, ge=0, description="Clip the gradient global norm (0 = off).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="`auto` = bf16 autocast on GPUs that support it, fp32 on CPU."
    )
    compile: bool = Field(default=False, description="Wrap the model in torch.compile.")
    eval_every: int = Field(default=200, ge=0, description="Validation every N steps (0 = only at the end).")
    eval_batches: int = Field(default=20, gt=0, description="Micro-batches per validation.")
    save_every: int = Field(default=500, ge=0, description="Checkpoint every N steps (0 = only at the end).")
    keep_last: int = Field(default=2, gt=0, description="Checkpoints kept (older ones are deleted).")
    resume: str = Field(
        default="auto",
        description="`auto` = continue from the newest checkpoint in the run folder, `false` = start fresh "
        "(existing checkpoints and metrics of the run are deleted), or a checkpoint directory path.",
    )
    log_every: int = Field(default=10, gt=0, description="Write metrics every N steps.")
    nan_policy: Literal["skip", "stop"] = Field(
        default="skip", description="On a non-finite loss or gradient: skip that step, or stop the run."
    )
    max_skipped_steps: int = Field(
        default=10,
        ge=0,
        description="With `nan_policy: skip`, stop when more than this many steps were skipped.",
    )
    launcher: Literal["none", "torchrun"] = Field(
        default="none", description="`torchrun` starts `nproc` processes (DDP/FSDP)."
    )
    nproc: int = Field(default=1, gt=0, description="Processes per node with the torchrun launcher.")
    nnodes: int = Field(
        default=1, gt=0, description="Nodes (multi-node through torchrun rendezvous / Slurm)."
    )
    rdzv_endpoint: str | None = Field(
        default=None,
        description="`host:port` of the torchrun rendezvous for multi-node runs started by hand "
        "(the Slurm script sets it from the first node of the allocation).",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp", description="Data parallel (ddp) or sharded (fsdp)."
    )
    tensorboard: bool = Field(default=False, description="Also write TensorBoard event files (if installed).")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="Weights & Biases logging.")
    slurm: SlurmConfig = Field(
        default_factory=SlurmConfig, description="Settings of the script `--print-slurm` generates."
    )

    @field_validator("resume", mode="before")
    @classmethod
    def _resume_bool(cls, v):
        # YAML reads `resume: false` as a boolean; accept it (and `true` as `auto`).
        if isinstance(v, bool):
            return "auto" if v else "false"
        return v

    @model_validator(mode="after")
    def _check_train(self):
        if self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be smaller than max_steps ({self.max_steps})"
            )
        return self


class PretrainSection(TrainSection):
    spike_factor: float = Field(
        default=2.0,
        ge=0,
        description="A step whose loss is above this multiple of the running mean loss is a spike and is "
        "handled like a non-finite loss, per nan_policy (0 = no spike detection).",
    )
    spike_warmup_steps: int = Field(
        default=20, ge=0, description="Steps averaged into the running mean before spike detection starts."
    )
    shuffle: bool = Field(
        default=True,
        description="Visit the packed training windows in a seeded random order, reshuffled every epoch "
        "(false = corpus order).",
    )


class LoraConfig(Section):
    enabled: bool = Field(default=False, description="Train low-rank adapters instead of all weights.")
    r: int = Field(default=16, gt=0, description="Adapter rank.")
    alpha: float = Field(default=32, gt=0, description="Adapter scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Linear layers that get adapters.",
    )


class SFTSection(TrainSection):
    data: list[str] = Field(
        default_factory=list, description="JSONL files of conversations (`messages`: [{role, content}, ...])."
    )
    base: Path | None = Field(default=None, description="Model to fine-tune (default: the pretrain output).")
    assistant_only_loss: bool = Field(default=True, description="Train only on assistant turns.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters.")


class DistillSection(TrainSection):
    teacher: Path | None = Field(default=None, description="Teacher checkpoint (default: the aligned model).")
    student_preset: str = Field(default="tiny", description="Student size preset.")
    mode: Literal["logits", "generations"] = Field(
        default="logits", description="Match teacher logits (KD) or train on teacher generations."
    )
    temperature: float = Field(default=2.0, gt=0, description="Softmax temperature for logit distillation.")
    alpha: float = Field(default=0.5, ge=0, le=1, description="Weight of the KD loss vs the LM loss.")


# keep these names importable for the root manifest
__all__ = [
    "DistillSection",
    "LoraConfig",
    "PretrainSection",
    "SFTSection",
    "SlurmConfig",
    "TrainSection",
    "WandbConfig",
]
