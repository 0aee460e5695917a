"""The training core: the pieces every objective is built from, and ``train()``, which composes them.

Pieces (a recipe with its own structure — rollouts, a value model, two optimizers — composes them itself):

* ``setup()`` → a ``TrainSession``: moves the model to the device, resumes from a checkpoint (weights,
  optimizer, scheduler, RNG, counters and every registered *stateful* object such as the data reader), wraps it
  (DDP / FSDP2 / compile) and builds AdamW + the LR schedule. ``place_frozen()`` puts the frozen models an
  objective declares (a distillation teacher, a DPO reference) on the device in eval mode, with no gradients,
  outside the optimizer and the checkpoints.
* ``optimizer_step()`` — one optimizer step over ``grad_accum`` micro-batches:

  1. forward under autocast; the loss function returns a ``LossOutput``: a mean loss, the number of units it
     averages (``weight``: target tokens, pairs, sequences), the tokens it processed (``tokens``, for
     throughput) and extra metrics (means over ``weight`` units, or ``(mean, weight)`` pairs). We
     backpropagate ``loss * weight`` (DDP/FSDP skip the gradient all-reduce on all but the last micro-batch).
  2. One all-reduce of every weighted sum (loss, metrics, weights, tokens) across ranks; gradients are then
     scaled by ``world / Σ weight`` (DDP/FSDP already averaged over ranks). The result is the gradient of the
     mean loss over *every unit of the global batch*, whatever the split into processes and micro-batches —
     batch 8 x accumulation 1 equals batch 1 x accumulation 8, and 2 processes x batch B equal 1 process x
     batch 2B (torchtune's token-normalised accumulation, which stays correct when micro-batches hold
     different numbers of target tokens, as in SFT). Logged metrics are reduced the same way, so they too
     are independent of the split.
  3. Clip the global gradient norm; a non-finite loss or norm skips the update (``nan_policy: skip``, counted,
     stopping after ``max_skipped_steps``) or stops the run (``nan_policy: stop``). An objective may opt into
     loss-spike detection (pretraining does): a loss far above the running mean is handled the same way. The
     LR schedule and the data advance either way, so a skip never shifts the rest of the run.
  4. AdamW step (fused kernels where available) and schedule step.
* ``evaluate()`` — weighted mean validation loss and metrics over every rank's validation batches.
* ``save_checkpoint()`` — model (or, for adapter runs, only the trainable weights), optimizer, scheduler,
  per-rank RNG states, stateful objects and counters, atomically.

Optimizer parameter groups: weight decay applies to matrices (``ndim >= 2``) except token embeddings;
norm gains, biases and embeddings (hence tied output embeddings) get none — decaying a gain pulls it toward
zero rather than toward identity, and decaying embeddings shrinks the rows of rare tokens that seldom get a
gradient (GPT-2/minGPT/nanoGPT practice). Frozen parameters (``requires_grad=False``, e.g. a LoRA base) are
left out of the optimizer entirely.

Exact resume: ``resume: auto`` restarts at the newest complete checkpoint and reproduces the loss curve and
final weights of an uninterrupted run bit for bit on the same machine and world size.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .. import console
from ..errors import CheckpointError, TrainingError, UserInputError
from . import dist
from .checkpoint import (
    ModelIO,
    SafetensorsIO,
    TrainerState,
    clean_stale,
    config_diff,
    config_hash,
    list_checkpoints,
    load_trainer_state,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from .metrics import MetricsWriter, peak_flops
from .schedule import build_scheduler

log = console.get_logger(__name__)

Batch = dict[str, Any]
Number = torch.Tensor | float | int


@dataclass
class LossOutput:
    """What a loss function returns for one micro-batch.

    ``loss`` is a mean over ``weight`` units (target tokens, preference pairs, sequences); the core
    backpropagates ``loss * weight`` and divides by the global ``Σ weight``. ``tokens`` is the number of
    tokens the micro-batch processed, for throughput (default: ``input_ids.numel()``; padding-aware losses
    report the real count). ``metrics`` are extra means to log: a value is a mean over the same ``weight``
    units, a ``(mean, weight)`` pair carries its own weight (e.g. a per-pair accuracy next to a per-token loss).
    Every metric is reduced weighted across micro-batches and ranks, so logs do not depend on the split.
    """

    loss: torch.Tensor
    weight: Number = 1.0
    tokens: Number | None = None
    metrics: dict[str, Number | tuple[Number, Number]] = field(default_factory=dict)


LossFn = Callable[[nn.Module, Batch], "LossOutput | torch.Tensor"]


class BatchSource(Protocol):
    """An endless iterator of this rank's micro-batches whose position can be saved and restored."""

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Objective:
    """An objective = a name, a loss function and its data (this rank's share of it).

    ``frozen`` names the models the loss reads but does not train (a distillation teacher, a DPO reference):
    the core places them on the device and dtype, in eval mode with gradients off, and leaves them out of
    the optimizer and the checkpoints; the loss function holds its own reference to them. Loss-spike
    detection is opt-in (``spike_factor > 0``): right for pretraining's smooth curves, wrong for objectives
    whose loss legitimately jumps between batches (SFT on mixed tasks, preference losses).
    """

    name: str
    loss_fn: LossFn
    train_data: BatchSource
    val_data: Callable[[], Iterable[Batch]] | None = None  # a fresh pass over this rank's validation set
    frozen: dict[str, nn.Module] = field(default_factory=dict)
    spike_factor: float = 0.0
    spike_warmup_steps: int = 20


@dataclass
class TrainResult:
    step: int
    tokens_seen: int
    skipped_steps: int
    train_loss: float | None
    val_loss: float | None
    tokens_per_s: float | None
    train_time: float
    num_parameters: int
    checkpoint: Path | None
    resumed_from: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    trainable_parameters: int = 0
    val_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def val_ppl(self) -> float | None:
        return None if self.val_loss is None else math.exp(min(self.val_loss, 700.0))


# ----------------------------------------------------------------------------------------------------
# setup helpers
# ----------------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device, env: dist.DistEnv | None = None) -> torch.device:
    """``auto`` → CUDA, then MPS, then CPU; under torchrun each rank gets its local GPU."""
    device = str(device)
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError("project.device is `cuda` but no CUDA GPU is visible; use `auto` or `cpu`")
        return torch.device("cuda", env.local_rank if env else torch.cuda.current_device())
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None  # CPU (and old GPUs): fp32 — CPU bf16 autocast is slower on most chips
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserInputError("precision: bf16 but this GPU has no bf16 support; use `fp16` or `auto`")
        return torch.bfloat16
    if device.type != "cuda":
        raise UserInputError(
            f"precision: fp16 needs a CUDA GPU (device is {device.type}); use `bf16` or `fp32`"
        )
    return torch.float16


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices, not norms/biases/embeddings (see the module docstring)."""
    no_decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or id(p) in no_decay_ids else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay)
    kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    # fused AdamW runs the whole update in one kernel per dtype/device (CUDA, and CPU since torch 2.4)
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError) as err:
            log.debug("fused AdamW unavailable (%s); using the foreach implementation", err)
    return torch.optim.AdamW(groups, **kwargs)


def _decoder_blocks(model: nn.Module) -> list[nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is not None:
        return list(layers)
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def wrap_model(
    model: nn.Module, strategy: str, env: dist.DistEnv, device: torch.device, compile_model: bool
) -> nn.Module:
    """DDP or FSDP2 (one shard group per decoder block, then the root) when distributed; optional compile."""
    wrapped = model
    if env.enabled and (env.world_size > 1 or strategy == "fsdp"):
        if strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in _decoder_blocks(model):
                fully_shard(block)
            fully_shard(model)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif strategy == "fsdp":
        log.warning("strategy: fsdp needs launcher: torchrun; training as a single process without sharding")
    if compile_model:
        wrapped.compile()  # in place: parameter names and state_dict keys stay those of the model
    return wrapped


def _unwrap(model: nn.Module) -> nn.Module:
    return (
        model.module
        if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel)
        else model
    )


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(model, FSDPModule)


def _full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) state dict; a collective under FSDP, every rank must call it."""
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _unwrap(model).state_dict()


def _full_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def _load_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def load_model_weights(
    model: nn.Module, state: dict[str, torch.Tensor], source: Path, *, only: set[str] | None = None
) -> None:
    """Copy a checkpoint's weights into ``model``; tied weights may be stored once.

    Strict for full models. ``only`` (an adapter run's trainable parameter names) makes the checkpoint hold
    exactly those weights — still strict: a missing or unexpected adapter weight is an error.
    """
    if only is not None:
        missing_a, unexpected_a = sorted(only - set(state)), sorted(set(state) - only)
        if missing_a or unexpected_a:
            raise CheckpointError(
                f"{source}: adapter weights do not match the model (missing {missing_a[:5]}, unexpected "
                f"{unexpected_a[:5]}); the adapter settings changed since this checkpoint — set resume: false "
                "or restore the settings"
            )
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches (e.g. a different vocabulary) raise instead of returning
        shapes = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        raise CheckpointError(
            f"{source}: weights do not fit the model ({'; '.join(shapes[:3]) or err}); this checkpoint is from "
            "a run with another model shape or tokenizer — point resume at a matching checkpoint or set "
            "resume: false"
        ) from None
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - {
        n for n, _ in model.named_parameters()
    }
    missing = [k for k in missing if k not in tied and (only is None or k in only)]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]}); "
            "the model section changed since this checkpoint — set resume: false or restore the settings"
        )


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def _count_tokens(batch: Batch) -> int:
    ids = batch.get("input_ids")
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def _all_finite(params: list[nn.Parameter]) -> bool:
    bad = torch.zeros((), dtype=torch.float32)
    for p in params:
        local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2 DTensor shard
        if local.numel() and not torch.isfinite(local.detach()).all():
            bad += 1
            break
    flag = bad.to(params[0].device if params else "cpu")
    return float(dist.all_reduce_sum(flag).item()) == 0.0


# ----------------------------------------------------------------------------------------------------
# weighted metric sums
# ----------------------------------------------------------------------------------------------------


def _scalar(x: Number, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device, dtype=torch.float64).reshape(())
    return torch.tensor(float(x), dtype=torch.float64, device=device)


class WeightedSums:
    """Σ value·weight and Σ weight per name, reduced across ranks in a single all-reduce.

    Every rank must add the same names (they run the same loss function). ``reduce()`` returns the weighted
    means (``None`` where the total weight is 0) and the plain totals of ``count()``-ed quantities.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._num: dict[str, torch.Tensor] = {}
        self._den: dict[str, torch.Tensor] = {}
        self._tot: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: Number, weight: Number) -> None:
        w = _scalar(weight, self.device)
        v = _scalar(value, self.device) * w
        if name in self._num:
            self._num[name] += v
            self._den[name] += w
        else:
            self._num[name], self._den[name] = v, w

    def count(self, name: str, value: Number) -> None:
        v = _scalar(value, self.device)
        self._tot[name] = self._tot[name] + v if name in self._tot else v

    def add_output(self, out: LossOutput, loss: torch.Tensor, tokens: Number) -> None:
        self.add("loss", loss, out.weight)
        self.count("weight", out.weight)
        self.count("tokens", tokens)
        for k, v in out.metrics.items():
            value, weight = v if isinstance(v, tuple) else (v, out.weight)
            self.add(k, value, weight)

    def reduce(self) -> tuple[dict[str, float | None], dict[str, float]]:
        means, totals = sorted(self._num), sorted(self._tot)
        flat = [self._num[k] for k in means] + [self._den[k] for k in means] + [self._tot[k] for k in totals]
        if not flat:
            return {}, {}
        t = dist.all_reduce_sum(torch.stack(flat))
        vals = t.tolist()
        n = len(means)
        out_means = {k: (vals[i] / vals[n + i] if vals[n + i] > 0 else None) for i, k in enumerate(means)}
        out_tot = {k: vals[2 * n + i] for i, k in enumerate(totals)}
        return out_means, out_tot


# ----------------------------------------------------------------------------------------------------
# the pieces: setup, frozen models, one optimizer step, evaluation, checkpoints
# ----------------------------------------------------------------------------------------------------


@dataclass
class TrainSession:
    """Everything one training run holds between optimizer steps (see ``setup``)."""

    model: nn.Module  # the bare model: what checkpoints hold
    wrapped: nn.Module  # what to call: DDP / FSDP2 / compiled, or the model itself
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    params: list[nn.Parameter]  # trainable parameters
    cfg: Any
    env: dist.DistEnv
    device: torch.device
    amp_dtype: torch.dtype | None
    run_dir: Path
    run_config: dict[str, Any]
    config_hash: str
    model_io: ModelIO
    description: str
    objective_name: str
    stateful: dict[str, Any]  # objects with state_dict()/load_state_dict() saved in every checkpoint
    step: int = 0
    tokens_seen: int = 0
    skipped: int = 0
    train_time: float = 0.0
    loss_ema: float | None = None  # running mean loss (EMA) for spike detection
    ema_steps: int = 0
    resumed_from: Path | None = None
    num_parameters: int = 0
    trainable_parameters: int = 0

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def fsdp(self) -> bool:
        return _is_fsdp(self.wrapped)

    @property
    def ddp(self) -> bool:
        return isinstance(self.wrapped, nn.parallel.DistributedDataParallel)

    @property
    def eval_model(self) -> nn.Module:
        """The module to evaluate with: FSDP2 must be called through its wrapper, DDP need not."""
        return self.wrapped if self.fsdp else _unwrap(self.wrapped)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def setup(
    model: nn.Module,
    cfg,
    *,
    run_dir: Path,
    device: torch.device | str = "cpu",
    seed: int = 0,
    model_io: ModelIO | None = None,
    run_config: dict[str, Any] | None = None,
    resume: str | Path | None = None,
    env: dist.DistEnv | None = None,
    description: str = "train",
    objective_name: str = "",
    stateful: dict[str, Any] | None = None,
) -> TrainSession:
    """Resume (or start), place, wrap and build the optimizer for ``model`` (see the module docstring).

    ``model`` is the bare module, initialised identically on every rank, with the parameters that must not
    train already frozen (``requires_grad=False``). ``stateful`` objects (the data reader, a recipe's own
    state) are restored from the resume checkpoint and saved in every new one.
    """
    env = env or dist.DistEnv()
    device = torch.device(device)
    model_io = model_io or SafetensorsIO()
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    run_config = run_config if run_config is not None else cfg.model_dump(mode="json")
    chash = config_hash(run_config)
    resume = cfg.resume if resume is None else resume
    stateful = dict(stateful or {})

    if env.is_main:
        clean_stale(ckpt_root)
        if str(resume).lower() == "false" and ckpt_root.exists():
            log.info("resume: false — deleting the previous checkpoints in %s", ckpt_root)
            shutil.rmtree(ckpt_root)
    dist.barrier()
    resume_dir = _resolve_resume(resume, ckpt_root)
    state: dict[str, Any] | None = None
    only = _trainable_names(model) if _trainable_only(model_io) else None
    if resume_dir is not None:
        state = load_trainer_state(resume_dir)
        load_model_weights(model, model_io.load(resume_dir), resume_dir, only=only)
        if state["config_hash"] != chash:
            diffs = config_diff(state.get("config", {}), run_config)
            log.warning(
                "resuming from %s with a different configuration (%s); the run will not match an "
                "uninterrupted one. Set resume: false to start over.",
                resume_dir,
                "; ".join(diffs[:8]) or "hash differs",
            )

    _seed_everything(seed + env.rank)  # dropout differs per rank; restored exactly on resume
    model.to(device)
    model.train()
    wrapped = wrap_model(model, cfg.strategy, env, device, cfg.compile)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    if not params:
        raise TrainingError(f"{description}: the model has no trainable parameters")
    amp_dtype = resolve_precision(cfg.precision, device)
    optimizer = build_optimizer(wrapped, cfg, device)
    session = TrainSession(
        model=model,
        wrapped=wrapped,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg),
        scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None,
        params=params,
        cfg=cfg,
        env=env,
        device=device,
        amp_dtype=amp_dtype,
        run_dir=run_dir,
        run_config=run_config,
        config_hash=chash,
        model_io=model_io,
        description=description,
        objective_name=objective_name or description,
        stateful=stateful,
        resumed_from=resume_dir,
        num_parameters=sum(p.numel() for p in _unwrap(wrapped).parameters()),
        trainable_parameters=sum(p.numel() for p in _unwrap(wrapped).parameters() if p.requires_grad),
    )
    if state is not None:
        _restore(session, state, resume_dir)
    return session


def _restore(session: TrainSession, state: dict[str, Any], resume_dir: Path) -> None:
    env = session.env
    _load_optim_state(session.wrapped, session.optimizer, state["optimizer"])
    session.scheduler.load_state_dict(state["scheduler"])
    if session.scaler is not None and state.get("scaler"):
        session.scaler.load_state_dict(state["scaler"])
    saved = state.get("stateful") or {"data": state.get("data")}
    for name, obj in session.stateful.items():
        if saved.get(name) is None:
            raise CheckpointError(
                f"{resume_dir}: the checkpoint has no saved state for {name!r}; it was written by another "
                "kind of run — set resume: false"
            )
        obj.load_state_dict(saved[name])
    session.step = int(state["step"])
    session.tokens_seen, session.skipped = int(state["tokens_seen"]), int(state["skipped_steps"])
    session.loss_ema, session.ema_steps = state.get("loss_ema"), int(state.get("loss_ema_steps", 0))
    session.train_time = float(state["train_time"])
    rngs = state["rng"]
    if state["world_size"] != env.world_size:
        log.warning(
            "checkpoint was written by %d processes, resuming with %d: data order is kept, random "
            "states (dropout) are not",
            state["world_size"],
            env.world_size,
        )
    set_rng_state(rngs[env.rank % len(rngs)])
    log.info(
        "resumed from %s at step %d (%s tokens seen)", resume_dir, session.step, f"{session.tokens_seen:,}"
    )


def place_frozen(
    frozen: dict[str, nn.Module], device: torch.device, dtype: torch.dtype | None = None
) -> None:
    """Put the models a loss reads but does not train on ``device`` (and ``dtype``), in eval mode, with
    gradients off. They are never handed to the optimizer or written into checkpoints."""
    for module in frozen.values():
        module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)
        module.eval()
        module.requires_grad_(False)


@dataclass
class StepStats:
    """What one optimizer step did; metrics are the loss function's, reduced over the global batch."""

    step: int  # optimizer steps completed, this one included
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    seconds: float
    applied: bool
    reason: str | None = None  # "spike" or "non-finite" when the update was skipped
    metrics: dict[str, float] = field(default_factory=dict)


def optimizer_step(
    session: TrainSession,
    next_batch: Callable[[], Batch],
    loss_fn: LossFn,
    *,
    grad_accum: int | None = None,
    spike_factor: float = 0.0,
    spike_warmup_steps: int = 20,
    loss_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> StepStats:
    """One optimizer step over ``grad_accum`` micro-batches from ``next_batch()`` (see the module docstring).

    Raises ``TrainingError`` when the nan policy says stop. ``loss_hook(step, loss) -> loss`` sees every
    micro-batch loss (tests inject NaNs and spikes through it).
    """
    cfg, wrapped, optimizer, scaler = session.cfg, session.wrapped, session.optimizer, session.scaler
    grad_accum = grad_accum or cfg.grad_accum
    description, step = session.description, session.step
    t0 = time.perf_counter()
    lr = session.scheduler.get_last_lr()[0]
    sums = WeightedSums(session.device)
    for micro in range(grad_accum):
        batch = _to_device(next_batch(), session.device)
        last_micro = micro == grad_accum - 1
        sync = contextlib.nullcontext()
        if session.ddp and not last_micro:
            sync = wrapped.no_sync()
        elif session.fsdp:
            wrapped.set_requires_gradient_sync(last_micro)
        with sync:
            with session.autocast():
                out = _as_output(loss_fn(wrapped, batch))
            loss = out.loss if loss_hook is None else loss_hook(step, out.loss)
            w = torch.as_tensor(out.weight, dtype=torch.float32, device=session.device)
            scaled = loss.float() * w
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        sums.add_output(out, loss, out.tokens if out.tokens is not None else _count_tokens(batch))
    means, totals = sums.reduce()
    weight_sum, step_tokens = totals["weight"], int(totals["tokens"])
    if weight_sum <= 0:
        raise TrainingError(
            f"step {step}: the batch has no units to learn from (loss weight 0); check the data "
            "(e.g. an SFT batch whose assistant mask is all zero)"
        )
    step_loss = float(means["loss"])  # weight_sum > 0, so defined
    if scaler is not None:
        scaler.unscale_(optimizer)
    grads = _grads(session.params)
    # DDP/FSDP averaged over ranks; turn Σ_rank-mean of Σ(loss·w) into the global mean
    world = session.env.world_size
    scale = world / weight_sum if (session.ddp or session.fsdp) else 1.0 / weight_sum
    if session.fsdp:
        for g in grads:
            g.mul_(scale)
    elif grads:
        torch._foreach_mul_(grads, scale)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(session.params, max_norm, foreach=None)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    grad_norm = float(norm)
    finite = math.isfinite(step_loss) and (math.isfinite(grad_norm) or scaler is not None)
    # A loss spike (far above the running mean) is treated like a non-finite loss: applying its update is
    # how runs diverge. The decision uses the all-reduced loss, so every rank agrees.
    spike = (
        finite
        and spike_factor > 0
        and session.loss_ema is not None
        and session.ema_steps >= spike_warmup_steps
        and step_loss > spike_factor * session.loss_ema
    )
    if finite and not spike:
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    session.scheduler.step()
    dt = time.perf_counter() - t0
    session.tokens_seen += step_tokens
    session.train_time += dt
    session.step = done = step + 1

    reason = None
    if not finite or spike:
        session.skipped += 1
        reason = "spike" if spike else "non-finite"
        if spike:
            msg = (
                f"step {done}: loss spike {step_loss:.4g} > {spike_factor:g} x running mean "
                f"{session.loss_ema:.4g} ({description}.spike_factor)"
            )
        else:
            msg = f"step {done}: non-finite loss {step_loss} / grad norm {grad_norm}"
        if cfg.nan_policy == "stop":
            raise TrainingError(
                f"{msg}; stopping (nan_policy: stop). Lower {description}.lr, keep grad_clip on, or "
                f"set {description}.nan_policy: skip; resume continues from the last checkpoint"
            )
        log.warning("%s; update skipped (%d skipped so far)", msg, session.skipped)
        if session.skipped > cfg.max_skipped_steps:
            raise TrainingError(
                f"{session.skipped} steps had a loss spike or a non-finite loss or gradient "
                f"(max_skipped_steps: {cfg.max_skipped_steps}); the run diverged. Lower {description}.lr or "
                f"increase {description}.warmup_steps, then resume from the last checkpoint"
            )
    else:
        ema = session.loss_ema
        session.loss_ema = step_loss if ema is None else 0.9 * ema + 0.1 * step_loss
        session.ema_steps += 1
    metrics = {k: v for k, v in means.items() if k != "loss" and v is not None}
    return StepStats(
        step=done,
        loss=step_loss,
        grad_norm=grad_norm,
        lr=lr,
        tokens=step_tokens,
        seconds=dt,
        applied=reason is None,
        reason=reason,
        metrics=metrics,
    )


def evaluate(
    model: nn.Module,
    objective: Objective | LossFn,
    device: torch.device,
    autocast,
    batches: Iterable[Batch] | None = None,
) -> dict[str, float] | None:
    """Weighted mean loss (``val_loss``) and metrics (``val_<name>``) over every rank's validation batches.

    ``objective`` gives the loss function and, unless ``batches`` is given, the validation set. Returns None
    when there is nothing to evaluate. Every rank must call it (one all-reduce).
    """
    loss_fn = objective.loss_fn if isinstance(objective, Objective) else objective
    if batches is None:
        if not isinstance(objective, Objective) or objective.val_data is None:
            return None
        batches = objective.val_data()
    was_training = model.training
    model.eval()
    sums = WeightedSums(device)
    with torch.no_grad():
        for batch in batches:
            batch = _to_device(batch, device)
            with autocast():
                out = _as_output(loss_fn(model, batch))
            sums.add_output(out, out.loss, out.tokens if out.tokens is not None else _count_tokens(batch))
    model.train(was_training)
    means, totals = sums.reduce()
    if not totals or totals.get("weight", 0) <= 0:
        return None
    out = {"val_loss": float(means["loss"])}
    out.update({f"val_{k}": float(v) for k, v in means.items() if k != "loss" and v is not None})
    return out


def save_checkpoint(session: TrainSession) -> Path:
    """Checkpoint the session at its current step (a collective: every rank must call it)."""
    params, step = session.params, session.step
    # never persist a broken model: every rank checks its (shard of the) weights first
    if not _all_finite(params):
        raise TrainingError(
            f"step {step}: the weights contain NaN/Inf, refusing to write a checkpoint; lower "
            f"{session.description}.lr or enable grad_clip, and resume from the previous checkpoint"
        )
    model_state = _full_model_state(session.wrapped)
    if _trainable_only(session.model_io):
        keep = _trainable_names(session.model)
        model_state = {k: v for k, v in model_state.items() if k in keep}
    optim_state = _full_optim_state(session.wrapped, session.optimizer)
    rngs = dist.all_gather_object(rng_state())
    path = session.ckpt_root / f"step_{step:06d}"
    if session.env.is_main:
        stateful = {name: obj.state_dict() for name, obj in session.stateful.items()}
        ts = TrainerState(
            step=step,
            tokens_seen=session.tokens_seen,
            skipped_steps=session.skipped,
            train_time=session.train_time,
            optimizer=optim_state,
            scheduler=session.scheduler.state_dict(),
            data=stateful.get("data", {}),
            rng=rngs,
            config=session.run_config,
            config_hash=session.config_hash,
            world_size=session.env.world_size,
            scaler=session.scaler.state_dict() if session.scaler is not None else None,
            objective=session.objective_name,
            loss_ema=session.loss_ema,
            loss_ema_steps=session.ema_steps,
            stateful=stateful,
        )
        write_checkpoint(
            session.ckpt_root,
            step,
            model_state=model_state,
            trainer_state=ts,
            model_io=session.model_io,
            keep_last=session.cfg.keep_last,
        )
        log.info("checkpoint %s", path)
    dist.barrier()
    return path


def _trainable_only(model_io: ModelIO) -> bool:
    """An adapter ``ModelIO`` (LoRA) stores only the trainable weights; the frozen base comes from elsewhere."""
    return bool(getattr(model_io, "trainable_only", False))


def _trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in _unwrap(model).named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------------
# train(): the pieces composed for "a loss plus a batch source"
# ----------------------------------------------------------------------------------------------------


def _as_output(out: LossOutput | torch.Tensor) -> LossOutput:
    return out if isinstance(out, LossOutput) else LossOutput(loss=out, weight=1.0)


def _resolve_resume(resume: str | Path | None, ckpt_root: Path) -> Path | None:
    if resume is None or str(resume).lower() in ("false", "no", "none", "off"):
        return None
    if str(resume).lower() == "auto":
        ckpts = list_checkpoints(ckpt_root)
        return ckpts[-1][1] if ckpts else None
    path = Path(resume)
    if not path.is_dir():
        raise UserInputError(f"resume: {path} is not a directory; use `auto`, `false` or a checkpoint folder")
    return path


def train(
    model: nn.Module,
    objective: Objective,
    cfg,
    *,
    run_dir: Path,
    device: torch.device | str = "cpu",
    seed: int = 0,
    model_io: ModelIO | None = None,
    run_config: dict[str, Any] | None = None,
    resume: str | Path | None = None,
    loss_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    description: str | None = None,
    env: dist.DistEnv | None = None,
    frozen_dtype: torch.dtype | None = None,
) -> TrainResult:
    """Train ``model`` on ``objective`` with the knobs of ``cfg`` (a ``TrainSection``).

    ``model`` is the bare module, initialised identically on every rank; it is moved to ``device``, loaded
    from the resume checkpoint if any, wrapped (DDP/FSDP2/compile) and trained in place. Checkpoints go to
    ``run_dir/checkpoints`` (model files written by ``model_io``), metrics to ``run_dir/metrics.jsonl``.
    ``run_config`` is what defines the run (hashed into checkpoints; resume warns when it differs);
    ``resume`` overrides ``cfg.resume``; ``loss_hook(step, loss) -> loss`` sees every micro-batch loss
    (tests inject NaNs through it). The objective's frozen models are placed on ``device`` (in
    ``frozen_dtype`` if given). Returns a ``TrainResult`` (the same on every rank).
    """
    env = env or dist.DistEnv()
    description = description or objective.name
    session = setup(
        model,
        cfg,
        run_dir=run_dir,
        device=device,
        seed=seed,
        model_io=model_io,
        run_config=run_config,
        resume=resume,
        env=env,
        description=description,
        objective_name=objective.name,
        stateful={"data": objective.train_data},
    )
    place_frozen(objective.frozen, session.device, frozen_dtype)
    start_step = session.step
    run_dir = session.run_dir

    if env.is_main:
        MetricsWriter.truncate(run_dir, start_step if session.resumed_from else None)
    writer = MetricsWriter(
        run_dir,
        enabled=env.is_main,
        tensorboard=getattr(cfg, "tensorboard", False),
        wandb=cfg.wandb.model_dump() if hasattr(cfg, "wandb") else None,
        config=session.run_config,
    )
    peak = peak_flops(session.device, session.amp_dtype)
    flops_fn = getattr(_unwrap(session.wrapped), "flops_per_token", None)
    history: list[dict[str, Any]] = []
    last_loss: float | None = None
    val: dict[str, float] | None = None
    last_ckpt: Path | None = session.resumed_from
    window_tokens, window_time = 0, 0.0
    session_tokens, session_time = 0, 0.0
    tok_per_s: float | None = None
    seq_len: int | None = None
    train_iter: Iterator[Batch] = objective.train_data  # type: ignore[assignment]

    def next_batch() -> Batch:
        nonlocal seq_len
        batch = next(train_iter)
        if seq_len is None and isinstance(batch.get("input_ids"), torch.Tensor):
            seq_len = int(batch["input_ids"].shape[-1])
        return batch

    if env.is_main and start_step < cfg.max_steps:
        log.info(
            "%s: %s parameters (%s trainable), %d process(es) on %s, %s, %d x %d x %d sequences per step, "
            "steps %d-%d",
            description, f"{session.num_parameters:,}", f"{session.trainable_parameters:,}", env.world_size,
            session.device.type,
            str(session.amp_dtype).removeprefix("torch.") if session.amp_dtype else "fp32",
            env.world_size, cfg.batch_size, cfg.grad_accum, start_step + 1, cfg.max_steps,
        )  # fmt: skip
    bar_ctx = (
        console.progress(description, total=cfg.max_steps - start_step, unit="step")
        if env.is_main
        else contextlib.nullcontext()
    )
    with bar_ctx as bar:
        while session.step < cfg.max_steps:
            st = optimizer_step(
                session,
                next_batch,
                objective.loss_fn,
                spike_factor=objective.spike_factor,
                spike_warmup_steps=objective.spike_warmup_steps,
                loss_hook=loss_hook,
            )
            done = st.step
            window_tokens += st.tokens
            window_time += st.seconds
            session_tokens += st.tokens
            session_time += st.seconds
            if st.applied:
                last_loss = st.loss

            if done % cfg.log_every == 0 or done == cfg.max_steps or not st.applied:
                tok_per_s = window_tokens / window_time if window_time > 0 else None
                row: dict[str, Any] = {
                    "step": done,
                    "loss": st.loss,
                    "lr": st.lr,
                    "grad_norm": st.grad_norm,
                    "tokens": session.tokens_seen,
                }
                if tok_per_s is not None:
                    row["tok_per_s"] = tok_per_s
                    if peak and flops_fn is not None and seq_len:
                        row["mfu"] = tok_per_s * flops_fn(seq_len) / (peak * env.world_size)
                if session.skipped:
                    row["skipped"] = session.skipped
                row.update(st.metrics)
                writer.log(row)
                history.append(row)
                window_tokens, window_time = 0, 0.0
            if bar is not None:
                fields: dict[str, Any] = {"loss": round(st.loss, 4), "lr": f"{st.lr:.2e}"}
                if tok_per_s:
                    fields["tok/s"] = int(tok_per_s)
                bar.advance(1, **fields)

            is_last = done == cfg.max_steps
            if (cfg.eval_every and done % cfg.eval_every == 0) or is_last:
                val = evaluate(session.eval_model, objective, session.device, session.autocast)
                if val is not None:
                    vrow = {"step": done, **val, "val_ppl": math.exp(min(val["val_loss"], 700.0))}
                    writer.log(vrow)
                    history.append(vrow)
                    log.info("step %d: val_loss %.4f (ppl %.2f)", done, val["val_loss"], vrow["val_ppl"])
            if (cfg.save_every and done % cfg.save_every == 0) or is_last:
                last_ckpt = save_checkpoint(session)

    if start_step >= cfg.max_steps:
        log.info(
            "checkpoint %s is already at max_steps (%d); nothing to train",
            session.resumed_from,
            cfg.max_steps,
        )
        val = evaluate(session.eval_model, objective, session.device, session.autocast)
        if env.is_main:  # report the finished run's last training loss
            from .metrics import read_metrics

            losses = [r["loss"] for r in read_metrics(run_dir) if isinstance(r.get("loss"), float)]
            last_loss = losses[-1] if losses else None
    writer.close()
    # the run's throughput is this session's (a resumed run's earlier sessions ran elsewhere/at other times)
    tok_per_s = session_tokens / session_time if session_time > 0 else None
    return TrainResult(
        step=max(start_step, cfg.max_steps),
        tokens_seen=session.tokens_seen,
        skipped_steps=session.skipped,
        train_loss=last_loss,
        val_loss=val["val_loss"] if val else None,
        tokens_per_s=tok_per_s,
        train_time=session.train_time,
        num_parameters=session.num_parameters,
        checkpoint=last_ckpt,
        resumed_from=session.resumed_from,
        history=history,
        trainable_parameters=session.trainable_parameters,
        val_metrics={k: v for k, v in (val or {}).items() if k != "val_loss"},
    )
