"""What every model-producing training stage shares, so pretrain, SFT and distillation read alike.

* ``resolve_model`` — the one resolver of a stage's input model: an explicit path from the stage's section,
  or the newest enabled upstream stage's ``model`` output in pipeline order (DESIGN: "Which model a stage
  reads"). The returned ``ResolvedModel`` says where it came from, for the summary and lineage.
* ``training_env`` — join the process group (torchrun) and pick the device.
* ``load_start_model`` — a checkpoint directory → an fp32 ``Llama`` on CPU, its tokenizer checked against the
  project's.
* ``export_model`` — the last checkpoint → ``runs/<stage>/model`` (the HF directory downstream stages and
  vLLM read), atomically.
* ``train_metrics`` / ``train_summary`` — the metrics and summary rows every training stage reports.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import console
from ..errors import StageInputError
from ..stage import StageContext

log = console.get_logger(__name__)

MODEL_OUTPUT = "model"


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    source: str  # "stage pretrain" or "sft.from"

    def describe(self, ctx: StageContext) -> str:
        return f"{_rel(self.path, ctx.project_dir)} ({self.source})"


def resolve_model(ctx: StageContext, explicit: str | os.PathLike | None, field: str) -> ResolvedModel:
    """The model a consuming stage starts from (see the module docstring).

    ``field`` names the manifest knob that overrides the choice (``sft.from``), for messages.
    """
    if explicit is not None:
        path = ctx.resolve(explicit)
        if not (path / "config.json").is_file():
            raise StageInputError(
                f"{field}: {path} is not a Hugging Face model directory (no config.json); point it at a "
                "checkpoint folder such as runs/pretrain/model, or remove it to use the upstream stage's model"
            )
        return ResolvedModel(path, field)
    from ..pipeline import Pipeline

    spec = Pipeline().get(ctx.name)
    for dep in reversed(spec.needs):
        if ctx.has_input(dep, MODEL_OUTPUT):
            return ResolvedModel(ctx.input(dep, MODEL_OUTPUT), f"stage {dep}")
    producers = [d for d in spec.needs if d != "tokenizer"]
    raise StageInputError(
        f"stage '{ctx.name}' needs a model to start from: enable one of {', '.join(producers)} in the manifest "
        f"(and run it), or set {field} to a local Hugging Face model directory"
    )


def base_identity(ctx: StageContext, path: str | os.PathLike) -> dict[str, str]:
    """What a run's checkpoints record about the model it started from: its path *and* a hash of its weights.

    ``resume: auto`` continues only checkpoints whose run config matches. Upstream stages rewrite their model in
    place (``runs/sft/model``), so the path alone would let an SFT, reward, policy or student run resume checkpoints trained
    from the previous upstream model. The weights' hashes come from the pipeline's hash cache (the runner has just
    hashed this folder for the stage's fingerprint), so large checkpoints are not re-read.
    """
    from ..utils.hashing import HashCache, sha256_listing

    path = Path(path)
    hashes = HashCache(ctx.runs_dir / ".cache" / "hashes.json")  # read only: the runner owns this file
    files = sorted(p for p in path.glob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())
    return {"path": str(path), "weights": sha256_listing((p.name, hashes.file(p)) for p in files)}


def relaunch_under_torchrun(ctx: StageContext, cfg):
    """A training stage asked for several processes (``launcher: torchrun`` or ``--nproc``) and not yet under
    torchrun: re-launch it there and return rank 0's result; None when the stage should train here."""
    from . import dist

    nproc = int(ctx.options.get("nproc") or cfg.nproc)
    if (cfg.launcher == "torchrun" or ctx.options.get("nproc")) and not dist.in_torchrun():
        from .launch import relaunch

        return relaunch(ctx, nproc)
    return None


def training_env(project):
    """(DistEnv, device) for ``project.device``; joins torchrun's process group when started by it."""
    import torch

    from . import dist
    from .loop import resolve_device

    requested = "cuda" if project.device == "auto" and torch.cuda.is_available() else project.device
    env = dist.setup("cuda" if requested == "cuda" else "cpu")
    return env, resolve_device(project.device, env)


def load_start_model(path: Path, tokenizer_dir: Path | None = None):
    """An fp32 ``Llama`` on CPU from a checkpoint directory; its tokenizer must be the project's."""
    import torch

    from ..model import load_pretrained

    if tokenizer_dir is not None:
        check_same_tokenizer(path, tokenizer_dir)
    model = load_pretrained(path, device="cpu", dtype=torch.float32)
    model.train()
    return model


def check_same_tokenizer(model_dir: Path, tokenizer_dir: Path, what: str = "model") -> None:
    """A model trained with another tokenizer reads ids that mean something else: an error, not a warning."""
    from ..errors import TokenizerError
    from ..tokenizer.info import load_tokenizer_info

    mine = load_tokenizer_info(tokenizer_dir)
    if not (Path(model_dir) / "tokenizer.json").is_file():
        return  # a bare weights folder: the vocabulary size check of load_pretrained still applies
    theirs = load_tokenizer_info(model_dir)
    if mine.sha256 and theirs.sha256 and mine.sha256 != theirs.sha256:
        raise TokenizerError(
            f"{model_dir}: the {what} was trained with a different tokenizer (tokenizer.json sha256 "
            f"{theirs.sha256[:12]}) than the project's {tokenizer_dir} ({mine.sha256[:12]}); use a {what} "
            "trained with this project's tokenizer, or import that tokenizer with `tokenizer.from`"
        )


def set_aside_foreign_checkpoints(
    ckpt_root: Path, rc: dict[str, Any], *, force: bool = False, field: str = "pretrain.resume"
) -> None:
    """``resume: auto`` continues only an interrupted run of *this* configuration and data.

    The stage re-runs when its config or inputs change (e.g. a new tokenizer); continuing from checkpoints of
    the previous run would silently mix two runs, or crash on a changed vocabulary. So checkpoints whose
    config hash differs are moved to ``checkpoints.previous/`` (replacing an older set) and training starts
    fresh. To continue a different run on purpose, point ``<stage>.resume`` (``field``) at one of its
    checkpoints.
    ``force`` (the user forced the stage) sets every existing checkpoint aside the same way.
    """
    from .checkpoint import config_hash, list_checkpoints, load_trainer_state

    ckpts = list_checkpoints(ckpt_root)
    if not ckpts:
        return
    newest = ckpts[-1][1]
    try:
        state = load_trainer_state(newest)
    except Exception:  # unreadable: let the loop report it with its own message
        return
    if state.get("config_hash") == config_hash(rc) and not force:
        return
    from .checkpoint import config_diff

    diffs = ["forced with --force"] if force else config_diff(state.get("config", {}), rc)
    previous = ckpt_root.with_name("checkpoints.previous")
    shutil.rmtree(previous, ignore_errors=True)
    os.replace(ckpt_root, previous)
    log.warning(
        "the checkpoints in %s belong to a different run (%s): starting fresh; they are kept in %s. "
        "To continue that run deliberately, set %s to one of its checkpoint folders.",
        ckpt_root,
        "; ".join(diffs[:4]) or "config differs",
        previous,
        field,
    )


def export_model(checkpoint: Path | None, out_dir: Path, env) -> Path:
    """Copy (hard-link) the last checkpoint, minus its trainer state, to ``out_dir/model`` atomically."""
    from ..utils.atomic import atomic_dir
    from . import dist
    from .checkpoint import link_or_copy_tree, share_dir

    final = out_dir / MODEL_OUTPUT
    if env.is_main:
        if checkpoint is None:
            raise StageInputError("training produced no checkpoint")  # unreachable: the last step saves
        with atomic_dir(final) as tmp:
            link_or_copy_tree(checkpoint, tmp)
            share_dir(tmp)
        log.info("model: %s", final)
    dist.barrier()
    return final


def train_metrics(result, env) -> dict[str, Any]:
    return {
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "val_ppl": result.val_ppl,
        "tokens": result.tokens_seen,
        "tokens_per_s": result.tokens_per_s,
        "params": result.num_parameters,
        "trainable_params": result.trainable_parameters,
        "steps": result.step,
        "skipped_steps": result.skipped_steps,
        "train_time_s": round(result.train_time, 3),
        "world_size": env.world_size,
        **{k: v for k, v in result.val_metrics.items()},
    }


def train_summary(ctx: StageContext, result, config, model_dir: Path) -> list[tuple[str, str]]:
    params = f"{result.num_parameters / 1e6:.2f}M parameters ({config.num_hidden_layers} layers)"
    if result.trainable_parameters and result.trainable_parameters != result.num_parameters:
        params += f", {result.trainable_parameters / 1e6:.3f}M trainable"
    rows = [
        ("model", params),
        ("steps", f"{result.step:,} ({result.tokens_seen:,} tokens)"),
        ("train loss", fmt(result.train_loss)),
        ("val loss / ppl", f"{fmt(result.val_loss)} / {fmt(result.val_ppl)}"),
        ("throughput", f"{result.tokens_per_s:,.0f} tok/s" if result.tokens_per_s else "-"),
        ("final model", _rel(model_dir, ctx.project_dir)),
    ]
    if result.resumed_from is not None:
        rows.append(("resumed from", _rel(result.resumed_from, ctx.project_dir)))
    if result.skipped_steps:
        rows.append(("skipped steps", str(result.skipped_steps)))
    return rows


def fmt(x: float | None, digits: int = 4) -> str:
    if x is None or not math.isfinite(x):
        return "-" if x is None else str(x)
    return f"{x:.{digits}f}"


def _rel(p: Path, root: Path) -> str:
    try:
        return os.path.relpath(p, root)
    except ValueError:
        return str(p)
