"""The `pretrain` stage body: token shards + model section → trained Hugging Face checkpoint.

Outputs (under ``runs/pretrain/``): ``checkpoints/step_NNNNNN/`` (HF directory + ``trainer_state.pt``, the
newest ``keep_last``), ``model/`` (output ``model``: the HF directory of the last step, tokenizer included)
and ``metrics.jsonl``. With ``launcher: torchrun`` the body re-launches itself under torchrun and returns rank
0's result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import console
from ..errors import UserInputError
from ..stage import StageContext, StageResult

log = console.get_logger(__name__)


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
    return {
        # runtime-only knobs (logging, checkpoint cadence, launcher, ...) are left out, as in fingerprints
        "pretrain": ctx.manifest.pretrain.semantic_dump(),
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


def run_pretrain(ctx: StageContext) -> StageResult:
    """Train the model of ``ctx.manifest.model`` on the tokenizer stage's shards (see the module docstring).

    ``ctx.options["nproc"]`` (from the CLI) overrides ``pretrain.nproc`` for the torchrun launcher.
    """
    from .recipe import relaunch_under_torchrun

    result = relaunch_under_torchrun(ctx, ctx.manifest.pretrain)
    return result if result is not None else _train_here(ctx)


def _train_here(ctx: StageContext) -> StageResult:
    import torch

    from ..model import Llama, config_from_manifest, load_pretrained
    from . import dist
    from .data import PackedBatches, ShardIndex, eval_batches
    from .loop import train
    from .pretrain import pretrain_objective
    from .recipe import export_model, train_metrics, train_summary, training_env

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

    env, device = training_env(project)

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
            from .recipe import set_aside_foreign_checkpoints

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
    final = export_model(result.checkpoint, ctx.out_dir, env)
    summary = train_summary(ctx, result, config, final)
    return StageResult(outputs={"model": final}, metrics=train_metrics(result, env), summary=summary)
