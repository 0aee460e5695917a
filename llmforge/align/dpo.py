"""Direct preference optimisation and its variants: the losses (pure functions) and the recipe on the core.

Notation: for a pair (x, y_w ≻ y_l), ``log π(y|x)`` is the sum of the response tokens' log-probs under the
policy, ``log π_ref`` the same under the frozen reference (the starting model), ``|y|`` the number of
response tokens, β > 0, and the implicit reward of DPO is r(x, y) = β (log π(y|x) − log π_ref(y|x)).
Every loss returns ``(losses [B], chosen_rewards [B], rejected_rewards [B])``: the per-pair loss and the
(implicit) rewards that the metrics report. The batch loss is the mean over pairs, so it does not depend on
how pairs are split into micro-batches.

* ``dpo_loss`` (``loss: sigmoid``) — Rafailov et al. 2023, eq. 7, with cDPO label smoothing ε (Mitchell 2023):
  L = −(1 − ε) log σ(βΔ) − ε log σ(−βΔ),  Δ = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)).
* ``ipo_loss`` — Azar et al. 2023, eq. 17: L = (Δ̄ − 1/(2β))², with the log-ratios averaged per response
  token (Δ̄ uses (log π − log π_ref)/|y|) as TRL does after confirming it with the authors: the paper's
  results correspond to the normalised form, and β stays comparable across lengths.
* ``simpo_loss`` — Meng et al. 2024, eq. 6, reference-free and length-normalised:
  L = −log σ(β/|y_w| log π(y_w) − β/|y_l| log π(y_l) − γ).
* ``orpo_loss`` — Hong et al. 2024, eqs. 2–7, reference-free: L = L_SFT + λ L_OR with
  L_SFT = −log π(y_w)/|y_w| (the chosen response's mean NLL) and
  L_OR = −log σ(log odds(y_w) − log odds(y_l)),  odds(y) = P(y)/(1 − P(y)),  P(y) = exp(log π(y)/|y|).
  (TRL normalises L_SFT per token over the whole batch; we take it per pair, so that the loss is a mean over
  pairs like every other preference loss and micro-batch splits give identical gradients.)

Reference log-probs: ``dpo.precompute_reference: true`` runs the starting model once over every pair before
training and stores the sums with the pair (no second model in memory, one forward less per step); false
keeps a frozen copy that the core places on the device (``Objective.frozen``). Both give the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import console
from ..errors import StageInputError
from ..stage import StageContext, StageResult
from ..train.loop import LossOutput
from .preference_data import IGNORE_INDEX, Pair, collate

log = console.get_logger(__name__)

REFERENCE_FREE = ("simpo", "orpo")


# ------------------------------------------------------------------------------------------------------
# the losses
# ------------------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023, eq. 7) with cDPO label smoothing ε:

        L = −(1 − ε) log σ(βΔ) − ε log σ(−βΔ)
        Δ = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]

    ε is the assumed probability that a label is flipped (ε = 0: plain DPO). Inputs are summed response
    log-probs [B]. Rewards: β (log π − log π_ref), detached.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    z = beta * (chosen_ratio - rejected_ratio)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO (Azar et al. 2023, eq. 17), β playing the role of τ, log-ratios averaged per response token:

        L = (Δ̄ − 1/(2β))²,   Δ̄ = [log π(y_w) − log π_ref(y_w)]/|y_w| − [log π(y_l) − log π_ref(y_l)]/|y_l|

    IPO regresses the gap to a finite target instead of pushing it to infinity, so it does not overfit
    deterministic preferences. Rewards: β (log π − log π_ref) (summed, as for DPO).
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    delta = chosen_ratio / chosen_len.clamp(min=1) - rejected_ratio / rejected_len.clamp(min=1)
    losses = (delta - 1.0 / (2.0 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
    *,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024, eq. 6): reference-free, the reward is the length-normalised log-likelihood:

        L = −log σ(β/|y_w| · log π(y_w|x) − β/|y_l| · log π(y_l|x) − γ)

    γ is the target reward margin (the paper tunes γ/β ≈ 0.5). Rewards: β log π(y)/|y|.
    """
    chosen = beta * policy_chosen / chosen_len.clamp(min=1)
    rejected = beta * policy_rejected / rejected_len.clamp(min=1)
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return losses, chosen.detach(), rejected.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, accurate on both sides of −log 2 (Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
    *,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024, eqs. 2–7): reference-free SFT plus an odds-ratio penalty, per pair:

        L = −log P(y_w) + λ · (−log σ(log odds(y_w) − log odds(y_l)))
        log P(y) = log π(y|x)/|y|,   log odds(y) = log P(y) − log(1 − P(y))

    The SFT term adapts the model to the chosen domain, the odds-ratio term pushes the rejected style down
    in the same step (no reference model, no separate SFT stage). Rewards (TRL's convention): λ log P(y).
    """
    lc = policy_chosen.float() / chosen_len.clamp(min=1)
    lr = policy_rejected.float() / rejected_len.clamp(min=1)
    log_odds = (lc - lr) - (_log1mexp(lc) - _log1mexp(lr))
    losses = -lc - lam * F.logsigmoid(log_odds)
    return losses, lam * lc.detach(), lam * lr.detach()


# ------------------------------------------------------------------------------------------------------
# sequence log-probs and the objective
# ------------------------------------------------------------------------------------------------------


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ response-token log-probs [2B], response lengths [2B]) of a pair batch, chosen and rejected in one
    forward pass (``model(..., output="logprobs")``: no [B, T, V] logits), padded or packed batches."""
    labels = batch["labels"]
    if "sequence" not in batch:  # padded: one sequence per row
        logps = model(batch["input_ids"], labels=labels, output="logprobs")
        return logps.sum(-1), (labels != IGNORE_INDEX).sum(-1)
    # packed: several sequences per row, kept apart by document_ids; sum each sequence's tokens
    logps = model(batch["input_ids"], labels=labels, document_ids=batch["document_ids"], output="logprobs")
    seq = batch["sequence"]
    valid = seq >= 0
    n = 2 * batch["margin"].shape[0]
    index = seq[valid]
    sums = torch.zeros(n, dtype=logps.dtype, device=logps.device).index_add(0, index, logps[valid])
    counts = torch.zeros(n, dtype=torch.long, device=logps.device).index_add(
        0, index, (labels[valid] != IGNORE_INDEX).long()
    )
    return sums, counts


def make_dpo_loss(cfg, reference: nn.Module | None = None):
    """The core's loss function for ``cfg`` (a ``DPOConfig``): mean loss over the pairs (weight = pairs).

    The reference log-probs come from the batch (``ref_logps``, precomputed) or from ``reference`` (frozen).
    Metrics, means over pairs: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (chosen −
    rejected), ``rewards/accuracies`` (share with chosen > rejected), ``logps/chosen``, ``logps/rejected``
    (summed response log-probs under the policy).
    """
    kind = cfg.loss

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        logps, lengths = sequence_logps(model, batch)
        pc, pr = logps.chunk(2)
        nc, nr = lengths.chunk(2)
        if kind in REFERENCE_FREE:
            if kind == "simpo":
                losses, rc, rr = simpo_loss(pc, pr, nc, nr, beta=cfg.beta, gamma=cfg.simpo_gamma)
            else:
                losses, rc, rr = orpo_loss(pc, pr, nc, nr, lam=cfg.orpo_lambda)
        else:
            if "ref_logps" in batch:
                ref = batch["ref_logps"].to(logps.dtype)
            elif reference is not None:
                with torch.no_grad():
                    ref, _ = sequence_logps(reference, batch)
            else:
                raise StageInputError(
                    "DPO needs reference log-probs: precompute them or pass a reference model"
                )
            refc, refr = ref.chunk(2)
            if kind == "ipo":
                losses, rc, rr = ipo_loss(pc, pr, refc, refr, nc, nr, beta=cfg.beta)
            else:
                losses, rc, rr = dpo_loss(
                    pc, pr, refc, refr, beta=cfg.beta, label_smoothing=cfg.label_smoothing
                )
        margins = rc - rr
        metrics = {
            "rewards/chosen": rc.mean(),
            "rewards/rejected": rr.mean(),
            "rewards/margins": margins.mean(),
            "rewards/accuracies": (margins > 0).float().mean(),
            "logps/chosen": pc.detach().mean(),
            "logps/rejected": pr.detach().mean(),
        }
        tokens = (batch["last"] + 1).sum()  # real tokens, padding left out
        return LossOutput(loss=losses.mean(), weight=pc.shape[0], tokens=tokens, metrics=metrics)

    return loss_fn


@torch.no_grad()
def precompute_reference(
    model: nn.Module,
    pairs: Sequence[Pair],
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device | str = "cpu",
    pack_len: int | None = None,
) -> None:
    """Fill ``ref_chosen``/``ref_rejected`` of every pair with the summed response log-probs under ``model``
    (the reference: the policy before training), in eval mode, batched as training batches them."""
    was_training = model.training
    model.eval()
    for i in range(0, len(pairs), batch_size):
        chunk = list(pairs[i : i + batch_size])
        batch = collate(chunk, pad_id, pack_len)
        logps, _ = sequence_logps(model, {k: v.to(device) for k, v in batch.items()})
        c, r = logps.float().cpu().chunk(2)
        for p, a, b in zip(chunk, c.tolist(), r.tolist(), strict=True):
            p.ref_chosen, p.ref_rejected = a, b
    model.train(was_training)


# ------------------------------------------------------------------------------------------------------
# the recipe
# ------------------------------------------------------------------------------------------------------


def _data_files(ctx: StageContext, pairs_file: Path | None) -> tuple[list[Path], str]:
    from .preference_data import resolve_files

    m = ctx.manifest
    if m.align.dpo.data:
        return resolve_files(ctx, m.align.dpo.data, "align.dpo.data"), "align.dpo.data"
    if pairs_file is not None:
        return [Path(pairs_file)], "rejection sampling"
    if m.reward.data:
        return resolve_files(ctx, m.reward.data, "reward.data"), "reward.data"
    raise StageInputError(
        "align.dpo.data: no preference data; list JSONL/Parquet files of `prompt`/`chosen`/`rejected` rows, "
        "enable align.rejection_sampling, or set reward.data"
    )


def _held_out_scores(ctx, model, tokenizer, prompts, max_new_tokens) -> tuple[list[str], list[float] | None]:
    """Greedy answers to held-out prompts and, if a reward stage ran, the reward model's scores of them."""
    from ..train.sft import answer

    answers = answer(model, tokenizer, prompts, max_new_tokens, "cpu")
    if not prompts or not ctx.has_input("reward", "model"):
        return answers, None
    from .reward import score

    return answers, score(ctx.input("reward", "model"), None, prompts, answers)


def run(ctx: StageContext, policy, *, pairs_file: Path | None = None) -> StageResult:
    """``align.method: dpo``: train ``policy`` (a ``ResolvedModel``) on preference pairs, write
    ``runs/align/model``, and report held-out reward accuracy and margins (implicit reward) before and
    after, plus the reward model's mean score of greedy answers when a reward stage ran.

    Data: ``align.dpo.data``, else ``pairs_file`` (rejection sampling's pairs), else ``reward.data``.
    """
    from ..tokenizer.info import load_tokenizer
    from ..train import dist
    from ..train.loop import Objective, evaluate, train
    from ..train.recipe import (
        export_model,
        load_start_model,
        set_aside_foreign_checkpoints,
        train_metrics,
        train_summary,
        training_env,
    )
    from ..train.stage import HFModelIO
    from .preference_data import PairBatches, eval_batches, tokenize_pairs

    m = ctx.manifest
    cfg, dcfg, project = m.align, m.align.dpo, m.project
    tokenizer_dir = ctx.input("tokenizer", "tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir)
    files, data_source = _data_files(ctx, pairs_file)
    env, device = training_env(project)

    torch.manual_seed(project.seed)
    model = load_start_model(policy.path, tokenizer_dir)
    config = model.config
    max_len = min(cfg.seq_len, config.max_position_embeddings)
    train_pairs, val_pairs, stats = tokenize_pairs(
        files, tokenizer, max_len=max_len, val_fraction=dcfg.val_fraction, seed=project.seed
    )
    pad_id = tokenizer.info.pad_id if tokenizer.info.pad_id is not None else tokenizer.info.eos_id

    frozen: dict[str, nn.Module] = {}
    reference = None
    needs_ref = dcfg.loss not in REFERENCE_FREE
    pack_len = max_len if dcfg.packing else None
    if needs_ref and dcfg.precompute_reference:
        precompute_reference(
            model, train_pairs + val_pairs, batch_size=cfg.batch_size, pad_id=pad_id, pack_len=pack_len
        )
    elif needs_ref:
        reference = load_start_model(policy.path, tokenizer_dir)
        frozen["reference"] = reference

    data = PairBatches(
        train_pairs, batch_size=cfg.batch_size, pad_id=pad_id, seed=project.seed, rank=env.rank,
        world_size=env.world_size, pack_len=pack_len,
    )  # fmt: skip
    val = eval_batches(
        val_pairs, batch_size=cfg.batch_size, pad_id=pad_id, rank=env.rank, world_size=env.world_size,
        limit=cfg.eval_batches, pack_len=pack_len,
    )  # fmt: skip
    loss_fn = make_dpo_loss(dcfg, reference)
    cpu = torch.device("cpu")
    before = evaluate(model, loss_fn, cpu, _no_autocast, batches=val) if val else None
    prompts = [p.prompt for p in val_pairs[: cfg.eval_prompts]]
    answers_before, scores_before = (
        _held_out_scores(ctx, model, tokenizer, prompts, dcfg.max_new_tokens) if env.is_main else ([], None)
    )

    from ..train.recipe import base_identity

    rc = {
        "align": cfg.semantic_dump(),
        "seed": project.seed,
        "base": {**base_identity(ctx, policy.path), "config": config.to_dict()},
        "data": {"pairs": stats.to_dict(), "files": [str(f) for f in files]},
    }
    resume: str | Path = cfg.resume
    if resume not in ("auto", "false"):
        resume = ctx.resolve(resume)
    if resume == "auto":
        if env.is_main:
            set_aside_foreign_checkpoints(
                ctx.out_dir / "checkpoints", rc, force=bool(ctx.options.get("force")), field="align.resume"
            )
        dist.barrier()
    result = train(
        model,
        Objective("dpo", loss_fn, data, val_data=(lambda: val) if val else None, frozen=frozen),
        cfg,
        run_dir=ctx.out_dir,
        device=device,
        seed=project.seed,
        model_io=HFModelIO(config, tokenizer_dir, tokenizer.info.generation_config()),
        run_config=rc,
        resume=resume,
        description="align",
        env=env,
    )
    final = export_model(result.checkpoint, ctx.out_dir, env)

    metrics = train_metrics(result, env)
    after = result.val_metrics
    metrics.update(
        {
            "method": "dpo",
            "loss_type": dcfg.loss,
            "pairs": stats.kept,
            "train_pairs": stats.train,
            "val_pairs": stats.val,
            "skipped_pairs": stats.num_skipped,
            "skipped": {k: v for k, v in stats.skipped.items() if v},
            "reference": (
                "none" if not needs_ref else "precomputed" if dcfg.precompute_reference else "frozen"
            ),
            "accuracy_before": before.get("val_rewards/accuracies") if before else None,
            "accuracy_after": after.get("val_rewards/accuracies"),
            "margin_before": before.get("val_rewards/margins") if before else None,
            "margin_after": after.get("val_rewards/margins"),
        }
    )
    report: dict[str, Any] = {
        "policy": policy.describe(ctx),
        "data": stats.to_dict(),
        "data_source": data_source,
    }
    if env.is_main:
        answers_after, scores_after = _held_out_scores(
            ctx, model.to("cpu"), tokenizer, prompts, dcfg.max_new_tokens
        )
        if scores_before is not None and scores_after is not None and prompts:
            metrics["reward_before"] = sum(scores_before) / len(scores_before)
            metrics["reward_after"] = sum(scores_after) / len(scores_after)
        report["samples"] = [
            {
                "prompt": p,
                "before": b,
                "after": a,
                **({"score_before": sb, "score_after": sa} if scores_after else {}),
            }
            for p, b, a, sb, sa in zip(
                prompts,
                answers_before,
                answers_after,
                scores_before or [None] * len(prompts),
                scores_after or [None] * len(prompts),
                strict=True,
            )
        ]
        report["metrics"] = {
            k: metrics.get(k)
            for k in (
                "accuracy_before",
                "accuracy_after",
                "margin_before",
                "margin_after",
                "reward_before",
                "reward_after",
            )
        }
        from ..utils.atomic import write_json

        write_json(ctx.out_dir / "report.json", report)
    summary = train_summary(ctx, result, config, final)
    summary.insert(
        0, ("method", f"dpo (loss: {dcfg.loss}, β={dcfg.beta:g}, reference {metrics['reference']})")
    )
    summary.insert(1, ("policy", policy.describe(ctx)))
    summary.insert(2, ("data", f"{stats.describe()} from {data_source}"))
    if metrics["accuracy_after"] is not None:
        summary.append(
            (
                "held-out pairs",
                f"reward accuracy {_pct(metrics['accuracy_before'])} → {_pct(metrics['accuracy_after'])}, "
                f"margin {_num(metrics['margin_before'])} → {_num(metrics['margin_after'])} ({stats.val} pairs)",
            )
        )
    if "reward_after" in metrics:
        summary.append(
            (
                "reward model",
                f"mean score of greedy answers {metrics['reward_before']:.3f} → {metrics['reward_after']:.3f} "
                f"({len(prompts)} held-out prompts)",
            )
        )
    return StageResult(outputs={"model": final}, metrics=metrics, summary=summary)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()
