"""The `pretrain` stage body: token shards + model section → trained Hugging Face checkpoint.

Outputs (under ``runs/pretrain/``): ``checkpoints/step_NNNNNN/`` (HF directory + ``trainer_state.pt``, the
newest ``keep_last``), ``final/`` (the HF directory of the last step, tokenizer included) and
``metrics.jsonl``. With ``launcher: torchrun`` the body re-launches itself under torchrun and returns rank
0's result.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from .. import console
from ..errors import StageInputError, UserInputError
from ..stage import StageContext, StageResult
from ..utils.atomic import atomic_dir

log = console.get_logger(__name__)

# knobs that change how a run is observed or stored, not what it computes: excluded from the config hash
# so that changing them does not trigger a "configuration differs" warning on resume
_NON_SEMANTIC = (
    "enabled", "resume", "log_every", "save_every", "keep_last", "eval_every", "eval_batches",
    "tensorboard", "wandb", "slurm", "launcher", "rdzv_endpoint", "compile", "strategy",
)  # fmt: skip


class HFModelIO:
    """``ModelIO`` writing checkpoints as Hugging Face directories that carry the tokenizer."""

    def __init__(self, config, tokenizer_dir: Path | None, generation_config: dict | None = None):
        self.config = config
        self.tokenizer_dir = tokenizer_dir
        # the tokenizer's stop ids (EOS and <|im_end|>), so transformers and vLLM stop where llmforge does
        self.generation_config = generation_config

    def save(self, state_dict: dict, directory: Path) -> None:
        import torch

        from ..model import Llama, save_pretrained
        from ..model.checkpoint import load_hf_state_dict

        # a meta-device shell adopts the (possibly FSDP-gathered) tensors without copying them
        with torch.device("meta"):
            shell = Llama(self.config)
        load_hf_state_dict(shell, state_dict, source="training state")
        save_pretrained(
            shell, directory, tokenizer_dir=self.tokenizer_dir, generation_config=self.generation_config
        )

    def load(self, directory: Path) -> dict:
        import torch

        from ..model import load_pretrained

        return load_pretrained(directory, device="cpu", dtype=torch.float32).state_dict()


def run_config(ctx: StageContext, model_config, index) -> dict[str, Any]:
    """What defines the run's result (hashed into every checkpoint)."""
    section = ctx.manifest.pretrain.model_dump(mode="json")
    for k in _NON_SEMANTIC:
        section.pop(k, None)
    return {
        "pretrain": section,
        "model": model_config.to_dict(),
        "seed": ctx.manifest.project.seed,
        "data": {
            "vocab_size": index.vocab_size,
            "train_tokens": index.num_tokens("train"),
            "val_tokens": index.num_tokens("val"),
            # content of the shards (and so of the tokenizer that made them), not just their size
            "shards": _shards_fingerprint(index.root),
        },
    }


def check_shards_match_tokenizer(shards_dir: Path, index, tokenizer_dir: Path):
    """The shards must have been made by this tokenizer: same special ids and the same tokenizer.json.

    A mismatch (e.g. shards copied from another project) would train on ids that mean something else to the
    tokenizer shipped in the checkpoint, which nothing downstream could detect. It is an error, not a warning.
    """
    from ..tokenizer.info import load_tokenizer_info

    info = load_tokenizer_info(tokenizer_dir)
    where = str(Path(shards_dir) / "index.json")
    info.check(where, eos_id=index.eos_id, bos_id=index.bos_id, vocab_size=index.vocab_size)
    try:
        raw = json.loads((Path(shards_dir) / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = {}
    sha = raw.get("tokenizer_sha256")
    if sha and info.sha256 and sha != info.sha256:
        from ..errors import TokenizerError

        raise TokenizerError(
            f"{where} was tokenized with a different tokenizer.json (sha256 {sha[:12]}) than {tokenizer_dir} "
            f"({info.sha256[:12]}); re-run `llmforge run --force tokenizer`"
        )
    return info


def _shards_fingerprint(shards_dir: Path) -> str | None:
    try:
        raw = json.loads((Path(shards_dir) / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw.get("fingerprint") or raw.get("tokenizer_sha256")


def set_aside_foreign_checkpoints(ckpt_root: Path, rc: dict[str, Any], *, force: bool = False) -> None:
    """``resume: auto`` continues only an interrupted run of *this* configuration and data.

    The stage re-runs when its config or inputs change (e.g. a new tokenizer); continuing from checkpoints of
    the previous run would silently mix two runs, or crash on a changed vocabulary. So checkpoints whose
    config hash differs are moved to ``checkpoints.previous/`` (replacing an older set) and training starts
    fresh. To continue a different run on purpose, point ``pretrain.resume`` at one of its checkpoints.
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
        "To continue that run deliberately, set pretrain.resume to one of its checkpoint folders.",
        ckpt_root,
        "; ".join(diffs[:4]) or "config differs",
        previous,
    )


def run_pretrain(ctx: StageContext) -> StageResult:
    """Train the model of ``ctx.manifest.model`` on the tokenizer stage's shards (see the module docstring).

    ``ctx.options["nproc"]`` (from the CLI) overrides ``pretrain.nproc`` for the torchrun launcher.
    """
    from . import dist

    cfg = ctx.manifest.pretrain
    nproc = int(ctx.options.get("nproc") or cfg.nproc)
    if (cfg.launcher == "torchrun" or ctx.options.get("nproc")) and not dist.in_torchrun():
        from .launch import relaunch

        return relaunch(ctx, nproc)
    return _train_here(ctx)


def _train_here(ctx: StageContext) -> StageResult:
    import torch

    from ..model import Llama, config_from_manifest, load_pretrained
    from . import dist
    from .checkpoint import link_or_copy_tree, share_dir
    from .data import PackedBatches, ShardIndex, eval_batches
    from .loop import resolve_device, train
    from .pretrain import pretrain_objective

    m = ctx.manifest
    cfg, project = m.pretrain, m.project
    shards_dir = ctx.input("tokenizer", "shards")
    tokenizer_dir = ctx.input("tokenizer", "tokenizer")
    index = ShardIndex.load(shards_dir)
    tok_info = check_shards_match_tokenizer(shards_dir, index, tokenizer_dir)
    config = config_from_manifest(
        m.model,
        index.vocab_size,
        bos_id=index.bos_id,
        eos_id=index.eos_id,
        pad_id=index.pad_id,
        root=ctx.project_dir,
    )
    if cfg.seq_len > config.max_position_embeddings:
        raise UserInputError(
            f"pretrain.seq_len ({cfg.seq_len}) is longer than the model's max_position_embeddings "
            f"({config.max_position_embeddings}); lower pretrain.seq_len or raise model.max_position_embeddings"
        )

    requested = "cuda" if project.device == "auto" and torch.cuda.is_available() else project.device
    env = dist.setup("cuda" if requested == "cuda" else "cpu")
    device = resolve_device(project.device, env)

    # identical initial weights on every rank (FSDP does not broadcast them)
    torch.manual_seed(project.seed)
    if m.model.from_ is not None:
        src_dir = ctx.resolve(m.model.from_)
        log.info("continuing pretraining from %s", src_dir)
        with torch.device("meta"):
            model = Llama(config)
        src = load_pretrained(src_dir, device="cpu", dtype=torch.float32)
        model.load_state_dict(src.state_dict(), assign=True)
        model.tie_weights()
        model.reset_rope("cpu")
        del src
    else:
        model = Llama(config)

    train_split = index.open("train")
    data = PackedBatches(
        train_split,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        rank=env.rank,
        world_size=env.world_size,
        shuffle=cfg.shuffle,
        seed=project.seed,
    )
    val: list = []
    if index.num_tokens("val") > cfg.seq_len:
        val = eval_batches(
            index.open("val"),
            seq_len=cfg.seq_len,
            batch_size=cfg.batch_size,
            num_batches=cfg.eval_batches,
            rank=env.rank,
            world_size=env.world_size,
        )
    if not val:
        log.warning("no validation data (the val split is smaller than one batch); val loss is not reported")
    objective = pretrain_objective(data, val, cfg)

    if cfg.wandb.enabled and cfg.wandb.project is None:
        cfg = cfg.model_copy(update={"wandb": cfg.wandb.model_copy(update={"project": project.name})})
    resume: str | Path = cfg.resume
    if resume not in ("auto", "false"):
        resume = ctx.resolve(resume)
    rc = run_config(ctx, config, index)
    if resume == "auto":
        if env.is_main:
            set_aside_foreign_checkpoints(
                ctx.out_dir / "checkpoints", rc, force=bool(ctx.options.get("force"))
            )
        dist.barrier()
    result = train(
        model,
        objective,
        cfg,
        run_dir=ctx.out_dir,
        device=device,
        seed=project.seed,
        model_io=HFModelIO(config, tokenizer_dir, tok_info.generation_config()),
        run_config=rc,
        resume=resume,
        description="pretrain",
        env=env,
    )
    final = ctx.out_dir / "final"
    if env.is_main:
        if result.checkpoint is None:
            raise StageInputError("training produced no checkpoint")  # unreachable: the last step saves
        with atomic_dir(final) as tmp:
            link_or_copy_tree(result.checkpoint, tmp)
            share_dir(tmp)
        log.info("final model: %s", final)
    dist.barrier()

    metrics: dict[str, Any] = {
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "val_ppl": result.val_ppl,
        "tokens": result.tokens_seen,
        "tokens_per_s": result.tokens_per_s,
        "params": result.num_parameters,
        "steps": result.step,
        "skipped_steps": result.skipped_steps,
        "train_time_s": round(result.train_time, 3),
        "world_size": env.world_size,
    }
    summary = [
        ("model", f"{result.num_parameters / 1e6:.2f}M parameters ({config.num_hidden_layers} layers)"),
        ("steps", f"{result.step:,} ({result.tokens_seen:,} tokens)"),
        ("train loss", _fmt(result.train_loss)),
        ("val loss / ppl", f"{_fmt(result.val_loss)} / {_fmt(result.val_ppl)}"),
        ("throughput", f"{result.tokens_per_s:,.0f} tok/s" if result.tokens_per_s else "-"),
        ("final model", os.path.relpath(final, ctx.project_dir)),
    ]
    if result.resumed_from is not None:
        summary.append(("resumed from", os.path.relpath(result.resumed_from, ctx.project_dir)))
    if result.skipped_steps:
        summary.append(("skipped steps", str(result.skipped_steps)))
    return StageResult(outputs={"model": final}, metrics=metrics, summary=summary)


def _fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-" if x is None else str(x)
    return f"{x:.4f}"
