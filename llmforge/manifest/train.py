"""`pretrain:`, `sft:`, `distill:` — sections that drive the one training loop."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import Section, StageSection, runtime_only


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
    compile: bool = runtime_only(default=False, description="Wrap the model in torch.compile.")
    eval_every: int = runtime_only(
        default=200, ge=0, description="Validation every N steps (0 = only at the end)."
    )
    eval_batches: int = runtime_only(default=20, gt=0, description="Micro-batches per validation.")
    save_every: int = runtime_only(
        default=500, ge=0, description="Checkpoint every N steps (0 = only at the end)."
    )
    keep_last: int = runtime_only(default=2, gt=0, description="Checkpoints kept (older ones are deleted).")
    resume: str = runtime_only(
        default="auto",
        description="`auto` = continue from the newest checkpoint in the run folder, `false` = start fresh "
        "(existing checkpoints and metrics of the run are deleted), or a checkpoint directory path.",
    )
    log_every: int = runtime_only(default=10, gt=0, description="Write metrics every N steps.")
    nan_policy: Literal["skip", "stop"] = Field(
        default="skip", description="On a non-finite loss or gradient: skip that step, or stop the run."
    )
    max_skipped_steps: int = Field(
        default=10,
        ge=0,
        description="With `nan_policy: skip`, stop when more than this many steps were skipped.",
    )
    launcher: Literal["none", "torchrun"] = runtime_only(
        default="none", description="`torchrun` starts `nproc` processes (DDP/FSDP)."
    )
    nproc: int = Field(default=1, gt=0, description="Processes per node with the torchrun launcher.")
    nnodes: int = Field(
        default=1, gt=0, description="Nodes (multi-node through torchrun rendezvous / Slurm)."
    )
    rdzv_endpoint: str | None = runtime_only(
        default=None,
        description="`host:port` of the torchrun rendezvous for multi-node runs started by hand "
        "(the Slurm script sets it from the first node of the allocation).",
    )
    strategy: Literal["ddp", "fsdp"] = runtime_only(
        default="ddp", description="Data parallel (ddp) or sharded (fsdp)."
    )
    tensorboard: bool = runtime_only(
        default=False, description="Also write TensorBoard event files (if installed)."
    )
    wandb: WandbConfig = runtime_only(default_factory=WandbConfig, description="Weights & Biases logging.")
    slurm: SlurmConfig = runtime_only(
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
        description="Linear layers that get adapters (module-name suffixes).",
    )
    use_rslora: bool = Field(
        default=False, description="Rank-stabilised scale alpha / sqrt(r) instead of alpha / r."
    )
    quantize_base: Literal["none", "nf4"] = Field(
        default="none",
        description="QLoRA-style: hold the frozen base weights in 4-bit NF4 (needs `torchao`).",
    )


class SFTDataConfig(Section):
    """How conversations become training rows (shared by `sft:` and the data of `distill:`)."""

    val_fraction: float = Field(
        default=0.05,
        ge=0,
        lt=1,
        description="Share of conversations held out for validation (chosen by a stable hash of each row, so "
        "adding rows does not reshuffle the split); ignored when `val_data` is given.",
    )
    train_on_prompt: bool = Field(
        default=False,
        description="Train on every token, prompts included (default: only the assistant turns).",
    )
    packing: bool = Field(
        default=True,
        description="Pack several conversations into each `seq_len` row (positions restart and attention "
        "never crosses a conversation); false = one conversation per row, padded.",
    )
    truncation: Literal["truncate", "drop"] = Field(
        default="truncate",
        description="A conversation longer than `seq_len`: keep its head (`truncate`) or leave it out "
        "(`drop`); counted either way.",
    )


class SFTSection(TrainSection, SFTDataConfig):
    """Supervised fine-tuning. Its defaults are fine-tuning's, not pretraining's: a small LR with a short
    warmup, no weight decay, no loss-spike detection."""

    from_: str | None = Field(
        default=None,
        alias="from",
        description="Model to fine-tune: a local Hugging Face Llama-family directory or a stage's model "
        "(`runs/pretrain/model`). Default: the newest enabled upstream stage's model.",
    )
    data: list[str] = Field(
        default_factory=list,
        description="JSONL or Parquet files (or globs) of conversations: `messages` "
        "([{role: system|user|assistant, content}, ...]) or `prompt`/`completion` rows.",
    )
    val_data: list[str] = Field(
        default_factory=list, description="Validation files (default: `val_fraction` of `data`)."
    )
    lr: float | None = Field(
        default=None,
        gt=0,
        description="Peak learning rate (default: 2e-5 for full fine-tuning, 2e-4 with LoRA).",
    )
    warmup_steps: int = Field(default=10, ge=0, description="Linear warmup steps; must be < max_steps.")
    max_steps: int = Field(default=500, gt=0, description="Optimizer steps.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay (not on norms/biases).")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters.")
    eval_prompts: int = runtime_only(
        default=8,
        ge=0,
        description="Held-out conversations whose answers are generated and written to the stage's report.",
    )
    max_new_tokens: int = runtime_only(
        default=64, gt=0, description="Longest generated answer in the report (greedy)."
    )
    answer_format: str | None = Field(
        default=None,
        description="Regular expression an answer must match to follow the format the data teaches; the "
        "report gives the share of held-out answers that match, before and after fine-tuning.",
    )

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-4 if self.lora.enabled else 2e-5


class StudentConfig(Section):
    """The student of distillation: a smaller shape from scratch, or a subset of the teacher's layers."""

    init: Literal["scratch", "teacher_layers"] = Field(
        default="teacher_layers",
        description="`scratch`: random weights of the shape below; `teacher_layers`: the teacher's "
        "embeddings, final norm, head and the decoder layers listed in `layers` (a depth-pruned copy).",
    )
    layers: list[int] | None = Field(
        default=None,
        description="For `teacher_layers`: which teacher layers to keep, in order (default: every other "
        "layer, first and last included).",
    )
    hidden_size: int | None = Field(default=None, gt=0, description="For `scratch`: model width.")
    intermediate_size: int | None = Field(default=None, gt=0, description="For `scratch`: SwiGLU width.")
    num_hidden_layers: int | None = Field(default=None, gt=0, description="For `scratch`: blocks.")
    num_attention_heads: int | None = Field(default=None, gt=0, description="For `scratch`: query heads.")
    num_key_value_heads: int | None = Field(default=None, gt=0, description="For `scratch`: K/V heads.")


class GenerationsConfig(Section):
    """Black-box distillation: where teacher answers come from."""

    prompts: list[str] = Field(
        default_factory=list,
        description="JSONL/Parquet conversations whose last user turn the teacher answers (default: the "
        "prompts of `distill.data`, or of `sft.data`).",
    )
    endpoint: str | None = Field(
        default=None,
        description="An OpenAI-compatible base URL (`http://host:port/v1`) to ask instead of generating "
        "with llmforge's own engine from the teacher checkpoint.",
    )
    model: str | None = Field(default=None, description="Model name sent to the endpoint.")
    api_key_env: str | None = Field(default=None, description="Environment variable holding the API key.")
    max_new_tokens: int = Field(default=128, gt=0, description="Longest teacher answer.")
    temperature: float = Field(default=0.0, ge=0, description="Sampling temperature (0 = greedy).")
    timeout_s: float = runtime_only(default=60.0, gt=0, description="Per-request timeout for `endpoint`.")


class DistillSection(TrainSection, SFTDataConfig):
    """Knowledge distillation into a smaller student, on the same masked positions as SFT."""

    teacher: str | None = Field(
        default=None,
        description="Teacher checkpoint (a local HF directory). Default: the newest enabled upstream stage's "
        "model (align, then sft, then pretrain). It must use the project's tokenizer.",
    )
    mode: Literal["logits", "generations"] = Field(
        default="logits",
        description="`logits`: white-box KD on the teacher's next-token distributions; `generations`: "
        "black-box KD — SFT of the student on teacher answers, saved as an SFT dataset with lineage.",
    )
    data: list[str] = Field(
        default_factory=list,
        description="Conversations to distill on (SFT format; default: `sft.data`).",
    )
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        default="forward_kl", description="D(teacher ‖ student) for logit KD."
    )
    jsd_beta: float = Field(default=0.5, gt=0, lt=1, description="Mixture weight of the JSD.")
    temperature: float = Field(default=2.0, gt=0, description="Softmax temperature for logit distillation.")
    alpha: float = Field(
        default=0.5, ge=0, le=1, description="loss = alpha · KD + (1 − alpha) · CE on the data."
    )
    topk: int = Field(
        default=0,
        ge=0,
        description="0 = teacher logits on the fly; k > 0 = precompute the teacher's top-k log-probs once "
        "and store them on disk (for teachers too large to run beside the student).",
    )
    student: StudentConfig = Field(default_factory=StudentConfig, description="The student's shape.")
    generations: GenerationsConfig = Field(
        default_factory=GenerationsConfig, description="Teacher answers for `mode: generations`."
    )
    lr: float = Field(default=1e-3, gt=0, description="Peak learning rate.")
    warmup_steps: int = Field(default=10, ge=0, description="Linear warmup steps; must be < max_steps.")
    max_steps: int = Field(default=500, gt=0, description="Optimizer steps.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")


# keep these names importable for the root manifest
__all__ = [
    "DistillSection",
    "GenerationsConfig",
    "LoraConfig",
    "PretrainSection",
    "SFTDataConfig",
    "SFTSection",
    "SlurmConfig",
    "StudentConfig",
    "TrainSection",
    "WandbConfig",
]
