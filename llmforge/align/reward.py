"""The reward model: a scalar head on the Llama backbone, trained with a Bradley–Terry loss (stage ``reward``).

    r_θ(x, y) = w · h_L(x ⊕ y)[last]          (w ∈ R^{1 × hidden}, no bias)

the final-norm hidden state of the last real token of the rendered conversation, projected to one number —
``transformers``' ``LlamaForSequenceClassification`` with ``num_labels = 1`` (same parameter names: the
backbone under ``model.``, the head ``score.weight``), which it is saved as, so ``transformers``
(``AutoModelForSequenceClassification``), TRL and vLLM's reward-model runner load it unchanged and give the
same scores.

Training (``bradley_terry_loss``) maximises the likelihood that chosen beats rejected under the
Bradley–Terry model, P(y_c ≻ y_r | x) = σ(r(x, y_c) − r(x, y_r)) (InstructGPT, Ouyang et al. 2022, eq. 1),
optionally asking for a per-pair margin (Llama 2, Touvron et al. 2023, eq. 2). Its own stage, so that
changing the policy optimisation never retrains it.

Scoring (``score``, ``score_file``) renders prompt + response with the chat template exactly as training
did and reads the head at the last token: what GRPO/PPO rewards, rejection sampling and
``llmforge align reward --score FILE`` use.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import console
from ..errors import CheckpointError, StageInputError
from ..model.llama import Llama, RMSNorm, rope_tables
from ..stage import StageContext, StageResult
from ..train.loop import LossOutput

log = console.get_logger(__name__)

ARCHITECTURE = "LlamaForSequenceClassification"


# ------------------------------------------------------------------------------------------------------
# the loss
# ------------------------------------------------------------------------------------------------------


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Per-pair Bradley–Terry negative log-likelihood:

        L = −log σ(r_c − r_r − m)

    with ``r_c``, ``r_r`` the scores of the chosen and rejected responses and ``m`` an optional margin
    (Llama 2's margin loss: pairs rated "significantly better" must be separated by more; ``m = 0`` is the
    InstructGPT loss). Computed as ``softplus(−(r_c − r_r − m))``, exact for any score gap. Returns [B].
    """
    delta = chosen.float() - rejected.float()
    if margin is not None:
        delta = delta - (margin.float() if isinstance(margin, torch.Tensor) else float(margin))
    return -F.logsigmoid(delta)


# ------------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------------


class RewardModel(Llama):
    """A ``Llama`` whose LM head is replaced by a scalar ``score`` head (``LlamaForSequenceClassification``).

    Subclassing keeps the one implementation of the backbone (attention, RoPE, packing, gradient
    checkpointing, FSDP's block list) and the parameter names transformers uses for the same architecture.
    ``forward(input_ids, last=...)`` returns float32 scores [B]; right-padded rows need no attention mask.
    """

    def __init__(self, config):
        device = torch.get_default_device()
        with torch.device("meta"):
            super().__init__(config)
            del self.lm_head  # a reward model has no vocabulary head (and no tied one to keep)
            self.score = nn.Linear(config.hidden_size, 1, bias=False)
        if device.type != "meta":
            self.to_empty(device=device)
            self.init_weights()

    def tie_weights(self) -> None:  # no LM head to tie
        return None

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) matrices (the head included, as transformers), unit norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        self.reset_rope()

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        device = device if device is not None else self.model.embed_tokens.weight.device
        self.rope_cos, self.rope_sin = rope_tables(self.config, device=device)

    @classmethod
    def from_causal_lm(cls, lm: Llama, *, seed: int | None = None) -> RewardModel:
        """A reward model with ``lm``'s backbone weights (copied) and a fresh head."""
        with torch.device("meta"):
            rm = cls(lm.config)
        state = {k: v for k, v in lm.state_dict().items() if not k.startswith("lm_head.")}
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        head = torch.empty(1, lm.config.hidden_size, dtype=lm.model.norm.weight.dtype)
        head.normal_(0.0, lm.config.initializer_range, generator=gen)
        state["score.weight"] = head
        rm.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
        rm.reset_rope(lm.model.embed_tokens.weight.device)
        return rm

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        *,
        last: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores [B] (float32) read at ``last`` (index of each row's last real token; default T − 1).

        Only the hidden state of one position per row reaches the head. Right padding needs no
        ``attention_mask`` (causal attention never looks ahead); left padding does.
        """
        h = self.hidden_states(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        B, T = input_ids.shape
        if last is None:
            last = torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
        pooled = h[torch.arange(B, device=h.device), last.to(h.device)]
        return self.score(pooled).squeeze(-1).float()

    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embed_tokens.weight.numel() if exclude_embeddings else n

    def flops_per_token(self, seq_len: int) -> float:
        cfg = self.config
        n = self.num_parameters(exclude_embeddings=True)
        return 6.0 * n + 12.0 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len


def hf_config(config, pad_token_id: int | None) -> dict[str, Any]:
    """``config.json`` of the equivalent ``LlamaForSequenceClassification`` with one label."""
    d = config.to_hf_dict()
    d["architectures"] = [ARCHITECTURE]
    d["num_labels"] = 1
    d["id2label"] = {"0": "LABEL_0"}
    d["label2id"] = {"LABEL_0": 0}
    # transformers reads the score at the rightmost token that is not padding: it needs the pad id
    d["pad_token_id"] = pad_token_id
    d["torch_dtype"] = d["dtype"] = "float32"
    return d


def save_reward_model(
    model: RewardModel | dict[str, torch.Tensor],
    directory: str | os.PathLike,
    *,
    config,
    pad_token_id: int | None,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Write a reward model (or its state dict) as a HF ``LlamaForSequenceClassification`` dir, atomically."""
    from safetensors.torch import save_file

    from ..model.checkpoint import TOKENIZER_FILES
    from ..utils.atomic import atomic_dir

    state = model.state_dict() if isinstance(model, nn.Module) else model
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state.items()}
    cfg = hf_config(config, pad_token_id)
    out = Path(directory)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        if tokenizer_dir is not None:
            import shutil

            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
    return out


def load_reward_model(
    directory: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[RewardModel, Any]:
    """``(RewardModel in eval mode, LoadedTokenizer)`` from a reward-model directory (ours or transformers')."""
    from safetensors.torch import load_file

    from ..model.config import LlamaConfig
    from ..tokenizer.info import load_tokenizer

    d = Path(directory)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing; point at the reward stage's model (runs/reward/model)")
    raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    if ARCHITECTURE not in (raw.get("architectures") or []):
        raise CheckpointError(
            f"{cfg_path}: architectures is {raw.get('architectures')}, not [{ARCHITECTURE!r}]; this is not a "
            "reward model — use the `reward` stage's output (runs/reward/model)"
        )
    config = LlamaConfig.from_hf_dict(raw, where=str(cfg_path))
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{d}: no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    with torch.device("meta"):
        model = RewardModel(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{d}: weights do not match a {ARCHITECTURE} (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    model.reset_rope(device)
    model.to(device)
    model.eval()
    return model, load_tokenizer(d)


class RewardModelIO:
    """``ModelIO`` writing the core's checkpoints as ``LlamaForSequenceClassification`` directories."""

    def __init__(self, config, tokenizer_dir: Path | None, pad_token_id: int | None):
        self.config, self.tokenizer_dir, self.pad_token_id = config, tokenizer_dir, pad_token_id

    def save(self, state_dict: dict[str, torch.Tensor], directory: Path) -> None:
        save_reward_model(
            state_dict,
            directory,
            config=self.config,
            pad_token_id=self.pad_token_id,
            tokenizer_dir=self.tokenizer_dir,
        )

    def load(self, directory: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        f = directory / "model.safetensors"
        if not f.is_file():
            raise CheckpointError(f"{directory}: no model.safetensors")
        return load_file(str(f))


# ------------------------------------------------------------------------------------------------------
# the objective
# ------------------------------------------------------------------------------------------------------


def make_reward_loss(use_margin: bool):
    """The core's loss function: mean Bradley–Terry loss over the pairs of a batch (weight = pairs).

    Metrics (means over pairs): ``accuracy`` (share of pairs with r_c > r_r), ``margin`` (mean r_c − r_r),
    ``chosen`` and ``rejected`` (mean scores).
    """

    def reward_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        scores = model(batch["input_ids"], last=batch["last"])
        chosen, rejected = scores.chunk(2)
        losses = bradley_terry_loss(chosen, rejected, batch["margin"] if use_margin else None)
        n = chosen.shape[0]
        with torch.no_grad():
            gap = (chosen - rejected).detach()
            metrics = {
                "accuracy": (gap > 0).float().mean(),
                "margin": gap.mean(),
                "chosen": chosen.detach().mean(),
                "rejected": rejected.detach().mean(),
            }
        tokens = (batch["last"] + 1).sum()
        return LossOutput(loss=losses.mean(), weight=n, tokens=tokens, metrics=metrics)

    return reward_loss


# ------------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------------


def _conversation(prompt: Any, completion: Any) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if completion is None:
        return msgs
    if isinstance(completion, str):
        return [*msgs, {"role": "assistant", "content": completion}]
    return msgs + list(completion)


@torch.no_grad()
def score(
    model: RewardModel | str | os.PathLike,
    tokenizer: Any = None,
    prompts: Sequence[Any] = (),
    completions: Sequence[Any] | None = None,
    *,
    batch_size: int = 16,
    device: str | torch.device | None = None,
) -> list[float]:
    """Reward-model scores of ``(prompt, completion)`` pairs, rendered as the reward model was trained.

    ``model``: a ``RewardModel`` or a reward-model directory (then ``tokenizer`` defaults to the one it
    carries). ``tokenizer``: a ``LoadedTokenizer`` or a directory. ``prompts``: strings (one user turn) or
    message lists. ``completions``: assistant replies (strings) or message lists; ``None`` means every
    ``prompts[i]`` is already a whole conversation. A conversation longer than the model's context keeps its
    last ``max_position_embeddings`` tokens (where the score is read), with a warning.
    """
    if not isinstance(model, nn.Module):
        model, own_tok = load_reward_model(model, device=device or "cpu")
        tokenizer = tokenizer if tokenizer is not None else own_tok
    if tokenizer is None:
        raise StageInputError("score(): give the tokenizer (or a reward-model directory, which carries one)")
    if isinstance(tokenizer, str | os.PathLike):
        from ..tokenizer.info import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    if completions is not None and len(completions) != len(prompts):
        raise StageInputError(f"score(): {len(prompts)} prompts but {len(completions)} completions")
    convs = [_conversation(p, None if completions is None else completions[i]) for i, p in enumerate(prompts)]
    dev = next(model.parameters()).device if device is None else torch.device(device)
    model.to(dev)
    was_training = model.training
    model.eval()
    limit = model.config.max_position_embeddings
    pad = tokenizer.info.pad_id if tokenizer.info.pad_id is not None else tokenizer.info.eos_id
    seqs = [tokenizer.encode_chat(c)[0] for c in convs]
    cut = sum(1 for s in seqs if len(s) > limit)
    if cut:
        log.warning(
            "score(): %d conversation(s) longer than the context (%d); kept their last tokens", cut, limit
        )
    seqs = [s[-limit:] for s in seqs]
    out: list[float] = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        T = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, : len(s)] = torch.tensor(s, dtype=torch.long)
        last = torch.tensor([len(s) - 1 for s in chunk], dtype=torch.long)
        out += model(ids.to(dev), last=last.to(dev)).tolist()
    model.train(was_training)
    return out


@dataclass
class ScoreFileResult:
    rows: int
    mean: float | None
    out: Path


def score_file(
    source: StageContext | str | os.PathLike,
    file: str | os.PathLike,
    out: str | os.PathLike,
    *,
    batch_size: int = 16,
    device: str = "cpu",
) -> ScoreFileResult:
    """Score the prompt/response pairs of a JSONL/Parquet ``file`` and write JSONL to ``out`` (atomically).

    ``source``: a ``StageContext`` (its project's ``runs/reward/model``, or the reward stage's recorded
    output) or a reward-model directory. Rows are ``prompt`` or ``messages`` plus ``completion`` (or
    ``response``; strings or message lists) → each output row is the input row plus ``score``; rows with
    ``chosen`` and ``rejected`` get ``chosen_score`` and ``rejected_score``. A row without a response is an
    error naming its file and line.
    """
    from ..train.sft_data import iter_rows, list_sft_files
    from ..utils.atomic import write_text
    from .preference_data import _response, prompt_messages

    if isinstance(source, StageContext):
        model_dir = (
            source.input("reward", "model")
            if source.has_input("reward", "model")
            else source.runs_dir / "reward" / "model"
        )
    else:
        model_dir = Path(source)
    if not (Path(model_dir) / "config.json").is_file():
        raise StageInputError(
            f"{model_dir}: no reward model; run `llmforge align reward` (stage reward) first"
        )
    model, tokenizer = load_reward_model(model_dir, device=device)
    rows: list[dict] = []
    items: list[tuple[int, str, list[dict], list[dict]]] = []  # (row index, output key, prompt, response)
    for path in list_sft_files([file]):
        for where, raw in iter_rows(path):
            if not isinstance(raw, dict):
                raise StageInputError(f"{where}: a row must be a JSON object")
            prompt = prompt_messages(raw, where)
            idx = len(rows)
            rows.append(dict(raw))
            if raw.get("chosen") is not None or raw.get("rejected") is not None:
                for key in ("chosen", "rejected"):
                    items.append((idx, f"{key}_score", prompt, _response(raw.get(key), where, key)))
            else:
                resp = raw.get("completion", raw.get("response"))
                if resp is None:
                    raise StageInputError(
                        f"{where}: no response to score; give `completion` (or `response`), or `chosen` and "
                        "`rejected`"
                    )
                items.append((idx, "score", prompt, _response(resp, where, "completion")))
    scores = score(
        model, tokenizer, [p for _, _, p, _ in items], [r for _, _, _, r in items], batch_size=batch_size
    )
    for (idx, key, _, _), s in zip(items, scores, strict=True):
        rows[idx][key] = s
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_text(out, text)
    finite = [s for s in scores if math.isfinite(s)]
    return ScoreFileResult(rows=len(rows), mean=sum(finite) / len(finite) if finite else None, out=out)


# ------------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------------


def run_reward(ctx: StageContext) -> StageResult:
    """Stage ``reward``: train the reward model on ``reward.data`` and write ``runs/reward/model``."""
    from ..tokenizer.info import load_tokenizer
    from ..train import dist
    from ..train.loop import Objective, evaluate, train
    from ..train.recipe import (
        export_model,
        load_start_model,
        resolve_model,
        set_aside_foreign_checkpoints,
        train_metrics,
        train_summary,
        training_env,
    )
    from .preference_data import PairBatches, eval_batches, resolve_files, tokenize_pairs

    m = ctx.manifest
    cfg, project = m.reward, m.project
    tokenizer_dir = ctx.input("tokenizer", "tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir)
    source = resolve_model(ctx, cfg.from_, "reward.from")
    files = resolve_files(ctx, cfg.data, "reward.data")
    env, device = training_env(project)

    lm = load_start_model(source.path, tokenizer_dir)
    max_len = min(cfg.seq_len, lm.config.max_position_embeddings)
    train_pairs, val_pairs, stats = tokenize_pairs(
        files, tokenizer, max_len=max_len, val_fraction=cfg.val_fraction, seed=project.seed
    )
    pad_id = tokenizer.info.pad_id if tokenizer.info.pad_id is not None else tokenizer.info.eos_id
    data = PairBatches(
        train_pairs,
        batch_size=cfg.batch_size,
        pad_id=pad_id,
        seed=project.seed,
        rank=env.rank,
        world_size=env.world_size,
    )
    val = eval_batches(
        val_pairs, batch_size=cfg.batch_size, pad_id=pad_id, rank=env.rank, world_size=env.world_size,
        limit=cfg.eval_batches,
    )  # fmt: skip
    model = RewardModel.from_causal_lm(lm, seed=project.seed)
    del lm
    loss_fn = make_reward_loss(cfg.margin)
    before = evaluate(model, loss_fn, torch.device("cpu"), _no_autocast, batches=val) if val else None

    from ..train.recipe import base_identity

    rc = {
        "reward": cfg.semantic_dump(),
        "seed": project.seed,
        "base": {**base_identity(ctx, source.path), "config": model.config.to_dict()},
        "data": {"pairs": stats.to_dict(), "files": [str(f) for f in files]},
    }
    resume: str | Path = cfg.resume
    if resume not in ("auto", "false"):
        resume = ctx.resolve(resume)
    if resume == "auto":
        if env.is_main:
            set_aside_foreign_checkpoints(
                ctx.out_dir / "checkpoints", rc, force=bool(ctx.options.get("force")), field="reward.resume"
            )
        dist.barrier()
    result = train(
        model,
        Objective("reward", loss_fn, data, val_data=(lambda: val) if val else None),
        cfg,
        run_dir=ctx.out_dir,
        device=device,
        seed=project.seed,
        model_io=RewardModelIO(model.config, tokenizer_dir, pad_id),
        run_config=rc,
        resume=resume,
        description="reward",
        env=env,
    )
    final = export_model(result.checkpoint, ctx.out_dir, env)
    metrics = train_metrics(result, env)
    metrics.update(
        {
            "pairs": stats.kept,
            "train_pairs": stats.train,
            "val_pairs": stats.val,
            "skipped_pairs": stats.num_skipped,
            "skipped": {k: v for k, v in stats.skipped.items() if v},
            "accuracy_before": before.get("val_accuracy") if before else None,
            "accuracy_after": result.val_metrics.get("val_accuracy"),
            "val_pairs_evaluated": _pairs_in(val),
            "margin_after": result.val_metrics.get("val_margin"),
        }
    )
    if env.is_main:
        from ..utils.atomic import write_json

        write_json(ctx.out_dir / "report.json", {"model": source.describe(ctx), "data": stats.to_dict()})
    summary = train_summary(ctx, result, model.config, final)
    summary.insert(0, ("started from", source.describe(ctx)))
    summary.insert(1, ("data", stats.describe()))
    if metrics["accuracy_after"] is not None:
        acc_b = metrics["accuracy_before"]
        summary.append(
            (
                "val accuracy",
                (f"{acc_b:.0%} before → " if acc_b is not None else "")
                + f"{metrics['accuracy_after']:.0%} after, mean margin {metrics['margin_after']:.3f} "
                + (
                    f"({_pairs_in(val)} of {stats.val} held-out pairs; eval_batches caps it)"
                    if _pairs_in(val) < stats.val
                    else f"({stats.val} held-out pairs)"
                ),
            )
        )
    return StageResult(outputs={"model": final}, metrics=metrics, summary=summary)


def _pairs_in(batches) -> int:
    """Pairs in a list of pair batches (one ``margin`` per pair, packed or not)."""
    return sum(len(b["margin"]) for b in batches or [])


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()
