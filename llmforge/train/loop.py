"""The one training loop. Every objective (pretraining, SFT, distillation, DPO, reward, GRPO, PPO) is a loss
function plus a batch source that plug into ``train()``; nothing here knows which objective runs.

What one optimizer step does, written out plainly in ``train()``:

1. ``grad_accum`` micro-batches: forward under autocast, ``loss_fn`` returns a mean loss and the number of
   units it averages (``weight``, e.g. target tokens); we backpropagate ``loss * weight`` (DDP/FSDP skip the
   gradient all-reduce on all but the last micro-batch).
2. One all-reduce of ``[Σ loss·weight, Σ weight, tokens]`` across ranks; gradients are then scaled by
   ``world / Σ weight`` (DDP/FSDP already averaged over ranks). The result is the gradient of the mean loss
   over *every unit of the global batch*, whatever the split into processes and micro-batches: batch 8 x
   accumulation 1 equals batch 1 x accumulation 8, and 2 processes x batch B equal 1 process x batch 2B
   (torchtune's token-normalised accumulation, which stays correct when micro-batches hold different
   numbers of target tokens, as in SFT).
3. Clip the global gradient norm; a non-finite loss or norm skips the update (``nan_policy: skip``, counted,
   stopping after ``max_skipped_steps``) or stops the run (``nan_policy: stop``). The LR schedule and the
   data advance either way, so a skip never shifts the rest of the run.
4. AdamW step (fused kernels where available), schedule step, metrics, periodic validation and checkpoints.

Optimizer parameter groups: weight decay applies to matrices (``ndim >= 2``) except token embeddings;
norm gains, biases and embeddings (hence tied output embeddings) get none — decaying a gain pulls it toward
zero rather than toward identity, and decaying embeddings shrinks the rows of rare tokens that seldom get a
gradient (GPT-2/minGPT/nanoGPT practice).

Exact resume: model, optimizer, scheduler, scaler, per-rank RNG states, the data cursor and counters are
checkpointed; ``resume: auto`` restarts at the newest complete checkpoint and reproduces the loss curve and
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
    save_checkpoint,
    set_rng_state,
)
from .metrics import MetricsWriter, peak_flops
from .schedule import build_scheduler

log = console.get_logger(__name__)

Batch = dict[str, Any]


@dataclass
class LossOutput:
    """What a loss function returns: ``loss`` is a mean over ``weight`` units (tokens, sequences, pairs)."""

    loss: torch.Tensor
    weight: torch.Tensor | float = 1.0
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # extra means, logged as-is


LossFn = Callable[[nn.Module, Batch], "LossOutput | torch.Tensor"]


class BatchSource(Protocol):
    """An endless iterator of this rank's micro-batches whose position can be saved and restored."""

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Objective:
    """An objective = a name, a loss function and its data (this rank's share of it)."""

    name: str
    loss_fn: LossFn
    train_data: BatchSource
    val_data: Callable[[], Iterable[Batch]] | None = None  # a fresh pass over this rank's validation set


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


def load_model_weights(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy a checkpoint's weights into ``model``; tied weights may be stored once."""
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
    missing = [k for k in missing if k not in tied]
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
# the loop
# ----------------------------------------------------------------------------------------------------


def evaluate(model: nn.Module, objective: Objective, device: torch.device, autocast) -> float | None:
    """Mean validation loss over every rank's validation batches (weighted like training)."""
    if objective.val_data is None:
        return None
    was_training = model.training
    model.eval()
    acc = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in objective.val_data():
            with autocast():
                out = _as_output(objective.loss_fn(model, _to_device(batch, device)))
            w = torch.as_tensor(out.weight, dtype=torch.float64, device=device)
            acc[0] += out.loss.detach().double() * w
            acc[1] += w
    dist.all_reduce_sum(acc)
    model.train(was_training)
    if acc[1].item() == 0:
        return None
    return float(acc[0] / acc[1])


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
) -> TrainResult:
    """Train ``model`` on ``objective`` with the knobs of ``cfg`` (a ``TrainSection``).

    ``model`` is the bare module, initialised identically on every rank; it is moved to ``device``, loaded
    from the resume checkpoint if any, wrapped (DDP/FSDP2/compile) and trained in place. Checkpoints go to
    ``run_dir/checkpoints`` (model files written by ``model_io``), metrics to ``run_dir/metrics.jsonl``.
    ``run_config`` is what defines the run (hashed into checkpoints; resume warns when it differs);
    ``resume`` overrides ``cfg.resume``; ``loss_hook(step, loss) -> loss`` sees every micro-batch loss
    (tests inject NaNs through it). Returns a ``TrainResult`` (the same on every rank).
    """
    env = env or dist.DistEnv()
    device = torch.device(device)
    model_io = model_io or SafetensorsIO()
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    description = description or objective.name
    run_config = run_config if run_config is not None else cfg.model_dump(mode="json")
    chash = config_hash(run_config)
    resume = cfg.resume if resume is None else resume
    amp_dtype = resolve_precision(cfg.precision, device)

    # -- where do we start? ------------------------------------------------------------------------------
    if env.is_main:
        clean_stale(ckpt_root)
        if str(resume).lower() == "false" and ckpt_root.exists():
            log.info("resume: false — deleting the previous checkpoints in %s", ckpt_root)
            shutil.rmtree(ckpt_root)
    dist.barrier()
    resume_dir = _resolve_resume(resume, ckpt_root)
    state: dict[str, Any] | None = None
    if resume_dir is not None:
        state = load_trainer_state(resume_dir)
        load_model_weights(model, model_io.load(resume_dir), resume_dir)
        if state["config_hash"] != chash:
            diffs = config_diff(state.get("config", {}), run_config)
            log.warning(
                "resuming from %s with a different configuration (%s); the run will not match an "
                "uninterrupted one. Set resume: false to start over.",
                resume_dir,
                "; ".join(diffs[:8]) or "hash differs",
            )
    start_step = int(state["step"]) if state else 0

    # -- model, optimizer, schedule --------------------------------------------------------------------------
    _seed_everything(seed + env.rank)  # dropout differs per rank; restored exactly on resume
    model.to(device)
    model.train()
    wrapped = wrap_model(model, cfg.strategy, env, device, cfg.compile)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    num_params = sum(p.numel() for p in _unwrap(wrapped).parameters())
    optimizer = build_optimizer(wrapped, cfg, device)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    tokens_seen, skipped, train_time = 0, 0, 0.0
    loss_ema, ema_steps = None, 0  # running mean loss (EMA) for spike detection
    if state is not None:
        _load_optim_state(wrapped, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        objective.train_data.load_state_dict(state["data"])
        tokens_seen, skipped = int(state["tokens_seen"]), int(state["skipped_steps"])
        loss_ema, ema_steps = state.get("loss_ema"), int(state.get("loss_ema_steps", 0))
        train_time = float(state["train_time"])
        rngs = state["rng"]
        if state["world_size"] != env.world_size:
            log.warning(
                "checkpoint was written by %d processes, resuming with %d: data order is kept, random "
                "states (dropout) are not",
                state["world_size"],
                env.world_size,
            )
        set_rng_state(rngs[env.rank % len(rngs)])
        log.info("resumed from %s at step %d (%s tokens seen)", resume_dir, start_step, f"{tokens_seen:,}")

    if env.is_main:
        MetricsWriter.truncate(run_dir, start_step if state else None)
    writer = MetricsWriter(
        run_dir,
        enabled=env.is_main,
        tensorboard=getattr(cfg, "tensorboard", False),
        wandb=cfg.wandb.model_dump() if hasattr(cfg, "wandb") else None,
        config=run_config,
    )

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    fsdp = _is_fsdp(wrapped)
    ddp = isinstance(wrapped, nn.parallel.DistributedDataParallel)
    peak = peak_flops(device, amp_dtype)
    flops_fn = getattr(_unwrap(wrapped), "flops_per_token", None)
    history: list[dict[str, Any]] = []
    last_loss: float | None = None
    val_loss: float | None = None
    last_ckpt: Path | None = resume_dir
    window_tokens, window_time = 0, 0.0
    session_tokens, session_time = 0, 0.0
    tok_per_s: float | None = None
    seq_len = None

    def checkpoint(step: int) -> Path:
        # never persist a broken model: every rank checks its (shard of the) weights first
        if not _all_finite(params):
            raise TrainingError(
                f"step {step}: the weights contain NaN/Inf, refusing to write a checkpoint; lower "
                f"{description}.lr or enable grad_clip, and resume from the previous checkpoint"
            )
        model_state = _full_model_state(wrapped)
        optim_state = _full_optim_state(wrapped, optimizer)
        rngs = dist.all_gather_object(rng_state())
        path = ckpt_root / f"step_{step:06d}"
        if env.is_main:
            ts = TrainerState(
                step=step,
                tokens_seen=tokens_seen,
                skipped_steps=skipped,
                train_time=train_time,
                optimizer=optim_state,
                scheduler=scheduler.state_dict(),
                data=objective.train_data.state_dict(),
                rng=rngs,
                config=run_config,
                config_hash=chash,
                world_size=env.world_size,
                scaler=scaler.state_dict() if scaler is not None else None,
                objective=objective.name,
                loss_ema=loss_ema,
                loss_ema_steps=ema_steps,
            )
            save_checkpoint(
                ckpt_root,
                step,
                model_state=model_state,
                trainer_state=ts,
                model_io=model_io,
                keep_last=cfg.keep_last,
            )
            log.info("checkpoint %s", path)
        dist.barrier()
        return path

    if env.is_main and start_step < cfg.max_steps:
        log.info(
            "%s: %s parameters, %d process(es) on %s, %s, %d x %d x %d sequences per step, steps %d-%d",
            description, f"{num_params:,}", env.world_size, device.type,
            str(amp_dtype).removeprefix("torch.") if amp_dtype else "fp32",
            env.world_size, cfg.batch_size, cfg.grad_accum, start_step + 1, cfg.max_steps,
        )  # fmt: skip
    train_iter: Iterator[Batch] = objective.train_data  # type: ignore[assignment]
    bar_ctx = (
        console.progress(description, total=cfg.max_steps - start_step, unit="step")
        if env.is_main
        else contextlib.nullcontext()
    )
    with bar_ctx as bar:
        for step in range(start_step, cfg.max_steps):
            t0 = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            acc = torch.zeros(3, dtype=torch.float64, device=device)  # Σ loss·w, Σ w, tokens
            for micro in range(cfg.grad_accum):
                batch = _to_device(next(train_iter), device)
                last_micro = micro == cfg.grad_accum - 1
                sync = contextlib.nullcontext()
                if ddp and not last_micro:
                    sync = wrapped.no_sync()
                elif fsdp:
                    wrapped.set_requires_gradient_sync(last_micro)
                with sync:
                    with autocast():
                        out = _as_output(objective.loss_fn(wrapped, batch))
                    loss = out.loss if loss_hook is None else loss_hook(step, out.loss)
                    w = torch.as_tensor(out.weight, dtype=torch.float32, device=device)
                    scaled = loss.float() * w
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                acc[0] += loss.detach().double() * w
                acc[1] += w
                acc[2] += _count_tokens(batch)
                if seq_len is None and "input_ids" in batch:
                    seq_len = int(batch["input_ids"].shape[-1])
            dist.all_reduce_sum(acc)
            loss_sum, weight_sum, step_tokens = acc.tolist()
            if weight_sum <= 0:
                raise TrainingError(
                    f"step {step}: the batch has no units to learn from (loss weight 0); check the data "
                    "(e.g. an SFT batch whose assistant mask is all zero)"
                )
            step_loss = loss_sum / weight_sum
            if scaler is not None:
                scaler.unscale_(optimizer)
            grads = _grads(params)
            # DDP/FSDP averaged over ranks; turn Σ_rank-mean of Σ(loss·w) into the global mean
            scale = env.world_size / weight_sum if (ddp or fsdp) else 1.0 / weight_sum
            if fsdp:
                for g in grads:
                    g.mul_(scale)
            else:
                torch._foreach_mul_(grads, scale)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=None)
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
            grad_norm = float(norm)
            finite = math.isfinite(step_loss) and (math.isfinite(grad_norm) or scaler is not None)
            # A loss spike (far above the running mean) is treated like a non-finite loss: applying its update
            # is how runs diverge. The decision uses the all-reduced loss, so every rank agrees.
            spike = (
                finite
                and cfg.spike_factor > 0
                and loss_ema is not None
                and ema_steps >= cfg.spike_warmup_steps
                and step_loss > cfg.spike_factor * loss_ema
            )
            if finite and not spike:
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            tokens_seen += int(step_tokens)
            dt = time.perf_counter() - t0
            train_time += dt
            window_tokens += int(step_tokens)
            window_time += dt
            session_tokens += int(step_tokens)
            session_time += dt
            done = step + 1

            if not finite or spike:
                skipped += 1
                if spike:
                    msg = (
                        f"step {done}: loss spike {step_loss:.4g} > {cfg.spike_factor:g} x running mean "
                        f"{loss_ema:.4g} ({description}.spike_factor)"
                    )
                else:
                    msg = f"step {done}: non-finite loss {step_loss} / grad norm {grad_norm}"
                if cfg.nan_policy == "stop":
                    raise TrainingError(
                        f"{msg}; stopping (nan_policy: stop). Lower {description}.lr, keep grad_clip on, or "
                        f"set {description}.nan_policy: skip; resume continues from the last checkpoint"
                    )
                log.warning("%s; update skipped (%d skipped so far)", msg, skipped)
                if skipped > cfg.max_skipped_steps:
                    raise TrainingError(
                        f"{skipped} steps had a loss spike or a non-finite loss or gradient (max_skipped_steps: "
                        f"{cfg.max_skipped_steps}); the run diverged. Lower {description}.lr or increase "
                        f"{description}.warmup_steps, then resume from the last checkpoint"
                    )
            else:
                last_loss = step_loss
                loss_ema = step_loss if loss_ema is None else 0.9 * loss_ema + 0.1 * step_loss
                ema_steps += 1

            row: dict[str, Any] | None = None
            if done % cfg.log_every == 0 or done == cfg.max_steps or not finite or spike:
                tok_per_s = window_tokens / window_time if window_time > 0 else None
                row = {
                    "step": done,
                    "loss": step_loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": tokens_seen,
                }
                if tok_per_s is not None:
                    row["tok_per_s"] = tok_per_s
                    if peak and flops_fn is not None and seq_len:
                        row["mfu"] = tok_per_s * flops_fn(seq_len) / (peak * env.world_size)
                if skipped:
                    row["skipped"] = skipped
                for k, v in out.metrics.items():
                    row[k] = float(v)
                writer.log(row)
                history.append(row)
                window_tokens, window_time = 0, 0.0
            if bar is not None:
                fields: dict[str, Any] = {"loss": round(step_loss, 4), "lr": f"{lr:.2e}"}
                if tok_per_s:
                    fields["tok/s"] = int(tok_per_s)
                bar.advance(1, **fields)

            is_last = done == cfg.max_steps
            if (cfg.eval_every and done % cfg.eval_every == 0) or is_last:
                val_loss = evaluate(wrapped if fsdp else _unwrap(wrapped), objective, device, autocast)
                if val_loss is not None:
                    vrow = {"step": done, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0))}
                    writer.log(vrow)
                    history.append(vrow)
                    log.info("step %d: val_loss %.4f (ppl %.2f)", done, val_loss, vrow["val_ppl"])
            if (cfg.save_every and done % cfg.save_every == 0) or is_last:
                last_ckpt = checkpoint(done)

    if start_step >= cfg.max_steps:
        log.info("checkpoint %s is already at max_steps (%d); nothing to train", resume_dir, cfg.max_steps)
        val_loss = evaluate(wrapped if fsdp else _unwrap(wrapped), objective, device, autocast)
        if env.is_main:  # report the finished run's last training loss
            from .metrics import read_metrics

            losses = [r["loss"] for r in read_metrics(run_dir) if isinstance(r.get("loss"), float)]
            last_loss = losses[-1] if losses else None
    writer.close()
    # the run's throughput is this session's (a resumed run's earlier sessions ran elsewhere/at other times)
    tok_per_s = session_tokens / session_time if session_time > 0 else None
    return TrainResult(
        step=max(start_step, cfg.max_steps),
        tokens_seen=tokens_seen,
        skipped_steps=skipped,
        train_loss=last_loss,
        val_loss=val_loss,
        tokens_per_s=tok_per_s,
        train_time=train_time,
        num_parameters=num_params,
        checkpoint=last_ckpt,
        resumed_from=resume_dir,
        history=history,
    )
