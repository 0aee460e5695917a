"""Supervised fine-tuning: the SFT loss and the `sft` stage (full fine-tuning or LoRA).

    L = -(1/N) Σ_t m_t · log p_θ(x_{t+1} | x_{≤t})

over the N target positions with ``m_t = 1``: assistant tokens of conversations rendered with the project
tokenizer's chat template (every token with ``train_on_prompt``). Conversations are packed into rows with
positions restarting and attention confined to each conversation (``document_ids``), or padded one per row;
both give the same loss on the same data (``sft_data``).

The stage reads the model the resolver picks (``recipe.resolve_model``: the newest enabled upstream model or
``sft.from``), tokenizes ``sft.data`` once into masked shards under ``runs/sft/data/``, trains through the
core's ``train()``, and writes ``runs/sft/model`` (a full HF checkpoint; for LoRA the adapter merged into the
base) and, for LoRA, ``runs/sft/adapter`` in PEFT's format (``peft`` and vLLM's ``--lora-modules`` load it).
``runs/sft/report.json`` holds the data counts, packing fill, and greedy answers to held-out prompts before and
after fine-tuning, with the share that follows ``sft.answer_format``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import console
from ..errors import StageInputError, UserInputError
from ..stage import StageContext, StageResult
from .loop import LossOutput

log = console.get_logger(__name__)

IGNORE_INDEX = -100


def _llama(model: nn.Module):
    from ..model.llama import Llama

    inner = getattr(model, "module", model)
    return inner if isinstance(inner, Llama) else None


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
    """Mean CE over the labelled targets; weight = their number, tokens = the non-padding tokens."""
    labels = batch["labels"]
    doc = batch.get("document_ids")
    tokens = (doc >= 0).sum() if doc is not None else batch["input_ids"].numel()
    if _llama(model) is not None:
        out = model(
            batch["input_ids"],
            labels=labels,
            position_ids=batch.get("position_ids"),
            document_ids=doc,
            output="ce_sum",
        )
        n = out.num_tokens
        return LossOutput(loss=out.loss_sum / n.clamp(min=1), weight=n, tokens=tokens)
    # any other causal LM (transformers, for benchmarks): padded rows only, with an attention mask
    import torch.nn.functional as F

    kwargs: dict[str, Any] = {}
    if doc is not None:
        if (doc > 0).any():
            raise UserInputError(
                "packed SFT batches need llmforge's model (document_ids); use packing: false"
            )
        kwargs["attention_mask"] = (doc >= 0).long()
    out = model(batch["input_ids"], **kwargs)
    logits = getattr(out, "logits", out)
    n = (labels != IGNORE_INDEX).sum()
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return LossOutput(loss=loss_sum / n.clamp(min=1), weight=n, tokens=tokens)


class AdapterIO:
    """``ModelIO`` of a LoRA run: checkpoints hold only the adapter, in PEFT's format (the frozen base is the
    resolved input model, hashed into the run config). ``trainable_only`` tells the core to save and load
    exactly the trainable weights, strictly."""

    trainable_only = True

    def __init__(self, model: nn.Module, base_model: Path):
        self.model = model
        self.base_model = base_model

    def save(self, state_dict: dict[str, torch.Tensor], directory: Path) -> None:
        from safetensors.torch import save_file

        from ..model.lora import PEFT_PREFIX, adapter_config, lora_spec

        tensors = {f"{PEFT_PREFIX}{k}": v.detach().contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg = adapter_config(lora_spec(self.model), base_model_name_or_path=str(self.base_model))
        (directory / "adapter_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")

    def load(self, directory: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        from ..errors import CheckpointError
        from ..model.lora import PEFT_PREFIX

        f = directory / "adapter_model.safetensors"
        if not f.is_file():
            raise CheckpointError(f"{directory}: no adapter_model.safetensors; this is not a LoRA checkpoint")
        return {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(f)).items()}


# ------------------------------------------------------------------------------------------------------
# held-out answers: does the model follow the data's format?
# ------------------------------------------------------------------------------------------------------


def eval_conversations(files, val_files, *, val_fraction: float, seed: int, limit: int) -> list[list[dict]]:
    """Up to ``limit`` held-out conversations (the validation split's rule), for sample answers."""
    from .sft_data import conversation_hash, read_conversations

    out: list[list[dict]] = []
    if limit <= 0:
        return out
    source = read_conversations(val_files) if val_files else read_conversations(files)
    for _, conv in source:
        if val_files or conversation_hash(conv, seed) < val_fraction:
            out.append(conv)
            if len(out) >= limit:
                break
    return out


def _prompt_and_reference(conv: list[dict]) -> tuple[list[dict], str]:
    """The conversation up to its last assistant turn, and that turn's text."""
    last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
    return conv[:last], conv[last]["content"]


@torch.no_grad()
def answer(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, device) -> list[str]:
    """Greedy answers to chat prompts, rendered with the tokenizer's template, stopping at its stop ids."""
    from ..infer.engine import Engine, Request
    from ..infer.params import SamplingParams
    from ..model.checkpoint import unwrap

    if not prompts:
        return []
    model = unwrap(model)
    ids = [tokenizer.encode_chat(p, add_generation_prompt=True)[0] for p in prompts]
    limit = model.config.max_position_embeddings
    ids = [p[-(limit - max_new_tokens) :] if len(p) + max_new_tokens > limit else p for p in ids]
    # the engine batches the prompts continuously; a request's answer does not depend on its neighbours
    engine = Engine(model, tokenizer, max_batch=min(len(ids), 32))
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    outs = engine.run([Request(str(i), p, params) for i, p in enumerate(ids)])
    return [o.text.strip() for o in outs]


def format_rate(answers: list[str], pattern: str | None) -> float | None:
    if pattern is None or not answers:
        return None
    rx = re.compile(pattern, re.DOTALL)
    return sum(1 for a in answers if rx.search(a)) / len(answers)


def check_answer_format(pattern: str | None, field: str) -> None:
    if pattern is None:
        return
    try:
        re.compile(pattern)
    except re.error as err:
        raise UserInputError(f"{field}: not a valid regular expression ({err})") from None


# ------------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------------


def data_files(ctx: StageContext, paths: list[str], field: str) -> list[Path]:
    from .sft_data import list_sft_files

    if not paths:
        raise UserInputError(
            f"{field}: no data files; list JSONL or Parquet files of conversations (`messages` or "
            "`prompt`/`completion` rows)"
        )
    return list_sft_files([ctx.resolve(p) for p in paths])


def prepare_data(files, tokenizer_dir, data_dir: Path, cfg, seed: int, env, *, val_files=()):
    """Tokenize conversations once into masked shards under ``data_dir`` (rank 0; reused while the inputs
    are unchanged); every rank gets the counts. ``cfg`` is a section with SFT's data knobs."""
    from . import dist
    from .sft_data import SFTDataStats, tokenize_sft

    stats = None
    if env.is_main:
        stats = tokenize_sft(
            files,
            tokenizer_dir,
            data_dir,
            seq_len=cfg.seq_len,
            truncation=cfg.truncation,
            val_fraction=cfg.val_fraction,
            val_files=val_files,
            seed=seed,
        )
    dist.barrier()
    if stats is None:
        stats = SFTDataStats.from_dict(json.loads((data_dir / "index.json").read_text())["sft"]["stats"])
    return stats


def run_sft(ctx: StageContext) -> StageResult:
    from .recipe import relaunch_under_torchrun

    result = relaunch_under_torchrun(ctx, ctx.manifest.sft)
    return result if result is not None else _sft_here(ctx)


def _sft_here(ctx: StageContext) -> StageResult:
    from ..model import save_pretrained
    from ..shards import ShardIndex
    from ..tokenizer.info import load_tokenizer
    from . import dist
    from .loop import Objective, train
    from .recipe import (
        base_identity,
        export_model,
        load_start_model,
        resolve_model,
        train_metrics,
        train_summary,
        training_env,
    )
    from .sft_data import SFTBatches, sft_eval_batches

    m = ctx.manifest
    cfg, project = m.sft, m.project
    check_answer_format(cfg.answer_format, "sft.answer_format")
    tokenizer_dir = ctx.input("tokenizer", "tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir)
    source = resolve_model(ctx, cfg.from_, "sft.from")
    files = data_files(ctx, cfg.data, "sft.data")
    val_files = data_files(ctx, cfg.val_data, "sft.val_data") if cfg.val_data else []
    env, device = training_env(project)

    # -- data: tokenized once into masked shards (rank 0), reused while the inputs are unchanged ---------
    data_dir = ctx.out_dir / "data"
    stats = prepare_data(files, tokenizer_dir, data_dir, cfg, project.seed, env, val_files=val_files)
    index = ShardIndex.load(data_dir)
    pad_id = tokenizer.info.pad_id if tokenizer.info.pad_id is not None else tokenizer.info.eos_id
    data = SFTBatches(
        index.open("train"),
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        rank=env.rank,
        world_size=env.world_size,
        packing=cfg.packing,
        seed=project.seed,
        pad_id=pad_id,
        train_on_prompt=cfg.train_on_prompt,
    )
    val = []
    if index.num_tokens("val"):
        val = sft_eval_batches(
            index.open("val"),
            seq_len=cfg.seq_len,
            batch_size=cfg.batch_size,
            num_batches=cfg.eval_batches,
            rank=env.rank,
            world_size=env.world_size,
            packing=cfg.packing,
            pad_id=pad_id,
            train_on_prompt=cfg.train_on_prompt,
        )
    if not val:
        log.warning(
            "no SFT validation data (the val split is smaller than one batch); val loss is not reported"
        )

    # -- model ---------------------------------------------------------------------------------------------
    torch.manual_seed(project.seed)
    model = load_start_model(source.path, tokenizer_dir)
    config = model.config
    if config.vocab_size < tokenizer.info.vocab_size:
        raise StageInputError(
            f"{source.path}: the model's vocabulary ({config.vocab_size}) is smaller than the tokenizer's "
            f"({tokenizer.info.vocab_size}); it was trained with another tokenizer"
        )
    if cfg.seq_len > config.max_position_embeddings:
        raise UserInputError(
            f"sft.seq_len ({cfg.seq_len}) is longer than the model's max_position_embeddings "
            f"({config.max_position_embeddings}); lower sft.seq_len"
        )
    held_out = eval_conversations(
        files, val_files, val_fraction=cfg.val_fraction, seed=project.seed, limit=cfg.eval_prompts
    )
    prompts = [_prompt_and_reference(c) for c in held_out]
    before = (
        answer(model, tokenizer, [p for p, _ in prompts], cfg.max_new_tokens, "cpu") if env.is_main else []
    )

    lora = cfg.lora.enabled
    model_io: Any
    if lora:
        from ..errors import ModelError
        from ..model.lora import apply_lora, quantize_base_nf4

        try:
            wrapped = apply_lora(model, cfg.lora)
        except ModelError as err:
            raise UserInputError(f"sft.lora.target_modules: {err}") from None
        if cfg.lora.quantize_base == "nf4":
            quantize_base_nf4(model)
        log.info("LoRA: r=%d on %d linear layers", cfg.lora.r, len(wrapped))
        model_io = AdapterIO(model, source.path)
    else:
        from .stage import HFModelIO

        model_io = HFModelIO(config, tokenizer_dir, tokenizer.info.generation_config())

    cfg = cfg.model_copy(update={"lr": cfg.resolved_lr()})
    if cfg.wandb.enabled and cfg.wandb.project is None:
        cfg = cfg.model_copy(update={"wandb": cfg.wandb.model_copy(update={"project": project.name})})
    rc = {
        "sft": cfg.semantic_dump(),
        "seed": project.seed,
        "base": {**base_identity(ctx, source.path), "config": config.to_dict()},
        "data": json.loads((data_dir / "index.json").read_text()).get("fingerprint"),
    }
    resume: str | Path = cfg.resume
    if resume not in ("auto", "false"):
        resume = ctx.resolve(resume)
    if resume == "auto":
        from .recipe import set_aside_foreign_checkpoints

        if env.is_main:
            force = bool(ctx.options.get("force"))
            set_aside_foreign_checkpoints(ctx.out_dir / "checkpoints", rc, force=force, field="sft.resume")
        dist.barrier()
    objective = Objective("sft", sft_loss, data, val_data=(lambda: val) if val else None)
    result = train(
        model,
        objective,
        cfg,
        run_dir=ctx.out_dir,
        device=device,
        seed=project.seed,
        model_io=model_io,
        run_config=rc,
        resume=resume,
        description="sft",
        env=env,
    )

    # -- outputs ---------------------------------------------------------------------------------------------
    outputs: dict[str, Path] = {}
    if lora:
        from ..model.lora import load_adapter, merge_lora
        from ..utils.atomic import atomic_dir
        from .checkpoint import link_or_copy_tree, share_dir

        adapter_dir = ctx.out_dir / "adapter"
        final = ctx.out_dir / "model"
        if env.is_main:
            with atomic_dir(adapter_dir) as tmp:
                link_or_copy_tree(result.checkpoint, tmp)
                share_dir(tmp)
            # the merged model: a fresh fp32 base plus the saved adapter, folded in (also for an NF4 base)
            merged = load_start_model(source.path)
            load_adapter(merged, adapter_dir)
            merge_lora(merged)
            with atomic_dir(final) as tmp:
                save_pretrained(
                    merged,
                    tmp,
                    tokenizer_dir=tokenizer_dir,
                    generation_config=tokenizer.info.generation_config(),
                )
                share_dir(tmp)
            trained = merged
        dist.barrier()
        outputs["adapter"] = adapter_dir
    else:
        final = export_model(result.checkpoint, ctx.out_dir, env)
        trained = model
    outputs["model"] = final

    metrics = train_metrics(result, env)
    metrics.update(
        {
            "conversations": stats.kept,
            "skipped_rows": stats.num_skipped,
            "truncated": stats.truncated,
            "packing_fill": round(data.epoch_stats(0).fill, 4) if cfg.packing else None,
            "lora": lora,
        }
    )
    report: dict[str, Any] = {"model": source.describe(ctx), "data": stats.to_dict(), "samples": []}
    if env.is_main:
        after = answer(trained.to("cpu"), tokenizer, [p for p, _ in prompts], cfg.max_new_tokens, "cpu")
        rate_before, rate_after = (
            format_rate(before, cfg.answer_format),
            format_rate(after, cfg.answer_format),
        )
        metrics["format_rate_before"], metrics["format_rate_after"] = rate_before, rate_after
        report["format"] = {"pattern": cfg.answer_format, "before": rate_before, "after": rate_after}
        report["samples"] = [
            {"prompt": p, "reference": ref, "before": b, "after": a}
            for (p, ref), b, a in zip(prompts, before, after, strict=True)
        ]
        from ..utils.atomic import write_json

        write_json(ctx.out_dir / "report.json", report)
    summary = train_summary(ctx, result, config, final)
    summary.insert(0, ("started from", source.describe(ctx)))
    summary.insert(
        1,
        (
            "data",
            f"{stats.kept:,} conversations ({stats.num_skipped:,} skipped, {stats.truncated:,} truncated)"
            + (f", packing fill {metrics['packing_fill']:.0%}" if metrics.get("packing_fill") else ""),
        ),
    )
    if lora:
        summary.append(("adapter (PEFT)", str(outputs["adapter"].relative_to(ctx.project_dir))))
    if metrics.get("format_rate_after") is not None:
        summary.append(
            (
                "follows format",
                f"{metrics['format_rate_before']:.0%} before → {metrics['format_rate_after']:.0%} after "
                f"({len(prompts)} held-out prompts)",
            )
        )
    return StageResult(outputs=outputs, metrics=metrics, summary=summary)
