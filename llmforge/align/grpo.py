"""Group Relative Policy Optimisation (Shao et al., 2024, DeepSeekMath §4.1), with DAPO's token-level loss.

For each prompt q, G completions o_1..o_G are sampled from the current policy and scored (``rewards``).
The advantage of every token of o_i is its completion's group-normalised reward

    Â_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + ε)        (std with Bessel's correction, ε = 1e-4, as TRL)

— no value model: the group is the baseline. The loss is PPO's clipped surrogate per token, with the ratio
taken against the policy that sampled (``old``) and an optional k3 KL estimate to a frozen reference:

    ρ_t = π_θ(o_t | q, o_<t) / π_old(o_t | q, o_<t)
    ℓ_t = -min(ρ_t Â_i, clip(ρ_t, 1 - ε_low, 1 + ε_high) Â_i) + β (π_ref/π_θ - log(π_ref/π_θ) - 1)
    L   = Σ_{i,t} m_{i,t} ℓ_t / Σ_{i,t} m_{i,t}

Normalisation: DAPO's (Yu et al., 2025, eq. 8; TRL's default ``loss_type="dapo"``) — one mean over *every
completion token of the batch*, not GRPO's mean of per-sequence means, so long completions are not
down-weighted per token. It is exactly the core's ``LossOutput(loss = Σ ℓ / n, weight = n)`` contract, hence
independent of how the batch is split into micro-batches (and ranks).

The recipe (``run``) composes the core's pieces rather than copying its loop: ``setup`` (model, AdamW,
schedule, resume), then per step a rollout batch from the engine (``rollout.Sampler``), its rewards and
advantages, the old log-probs recomputed by the training model, and ``updates_per_batch`` (μ) calls of
``optimizer_step`` over that batch's micro-batches; ``save_checkpoint``; ``recipe.export_model``. With μ = 1
the old policy *is* the current one, so ρ = 1 and the old log-probs are the current ones, detached (TRL does
the same). The held-out mean reward of greedy answers is measured before and after.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import console
from ..errors import StageInputError, UserInputError
from ..stage import StageContext, StageResult
from ..train.loop import LossOutput
from .rollout import IGNORE_INDEX

log = console.get_logger(__name__)

ADV_EPS = 1e-4


# ----------------------------------------------------------------------------------------------------
# the maths: pure functions
# ----------------------------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = ADV_EPS
) -> torch.Tensor:
    """(r - mean_group) / (std_group + ε) for rewards laid out as consecutive groups of ``group_size``.

    ``scale=False`` gives Dr. GRPO's unscaled r - mean_group (no bias toward low-variance groups).
    A group whose completions all scored the same has advantage 0: it teaches nothing.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    g = rewards.float().view(-1, group_size)
    adv = g - g.mean(-1, keepdim=True)
    if scale:
        adv = adv / (g.std(-1, keepdim=True) + eps)  # torch.std: Bessel-corrected, as TRL's nanstd
    return adv.reshape(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π_θ ‖ π_ref) (Schulman, 2020): exp(Δ) - Δ - 1 with Δ = log π_ref - log π_θ;
    unbiased, always ≥ 0."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


@dataclass
class PolicyLossTerms:
    loss_sum: torch.Tensor  # Σ m·ℓ (differentiable)
    tokens: torch.Tensor  # Σ m
    clipped: torch.Tensor  # Σ m·[the clip was active]
    kl_sum: torch.Tensor | None  # Σ m·k3 (detached), when a reference is given


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float,
    clip_eps_high: float | None = None,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
) -> PolicyLossTerms:
    """Σ over masked tokens of -min(ρÂ, clip(ρ)Â) (+ β·k3), see the module docstring.

    ``advantages`` is [B] (one per sequence: GRPO) or [B, T] (per token: PPO). ``clip_eps_high`` is DAPO's
    "clip-higher" upper bound (default ``clip_eps``).
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    clipped_ratio = torch.clamp(ratio, 1 - clip_eps, 1 + high)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)
    kl_sum = None
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, ref_logprobs)
        kl_sum = (kl.detach() * mask).sum()
        if beta:
            per_token = per_token + beta * kl
    is_clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    return PolicyLossTerms(
        loss_sum=(per_token * mask).sum(),
        tokens=mask.sum(),
        clipped=(is_clipped.to(mask.dtype) * mask).sum().detach(),
        kl_sum=kl_sum,
    )


def grpo_loss_fn(*, clip_eps: float, clip_eps_high: float | None, beta: float):
    """The core's loss function over a micro-batch of a rollout batch.

    The micro-batch holds ``input_ids``, ``labels`` (the completion tokens), ``advantages`` [B] and, when
    μ > 1 or with a reference, ``old_logprobs`` / ``ref_logprobs`` [B, T].
    """

    def loss_fn(model, batch: dict[str, torch.Tensor]) -> LossOutput:
        labels = batch["labels"]
        lp = model(batch["input_ids"], labels=labels, output="logprobs")
        mask = labels != IGNORE_INDEX
        old = batch.get("old_logprobs")
        terms = clipped_policy_loss(
            lp,
            lp.detach() if old is None else old,
            batch["advantages"],
            mask,
            clip_eps=clip_eps,
            clip_eps_high=clip_eps_high,
            beta=beta,
            ref_logprobs=batch.get("ref_logprobs"),
        )
        n = terms.tokens
        metrics: dict[str, Any] = {"clip_ratio": terms.clipped / n.clamp(min=1)}
        if terms.kl_sum is not None:
            metrics["kl"] = terms.kl_sum / n.clamp(min=1)
        return LossOutput(
            loss=terms.loss_sum / n.clamp(min=1), weight=n, tokens=int(mask.sum()), metrics=metrics
        )

    return loss_fn


# ----------------------------------------------------------------------------------------------------
# the recipe's plumbing, shared with PPO and rejection sampling
# ----------------------------------------------------------------------------------------------------


class PromptOrder:
    """An endless seeded shuffle of the training prompts, reshuffled every epoch; a checkpointed position."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 7919 + self.epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("n") != self.n:
            raise StageInputError(
                f"the checkpoint was trained on {state.get('n')} prompts, the prompt files now hold {self.n}; "
                "set align.resume: false to start over"
            )
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._shuffle()


@dataclass
class RolloutTally:
    """Running totals of a run's rollouts, checkpointed (``stateful``) so a resumed run reports the whole run."""

    completions: int = 0
    rollout_time: float = 0.0
    curve: list[float] = field(default_factory=list)  # mean training reward of each rollout batch

    def add(self, completions: int, seconds: float, mean_reward: float) -> None:
        self.completions += completions
        self.rollout_time += seconds
        self.curve.append(mean_reward)

    def state_dict(self) -> dict[str, Any]:
        return {"completions": self.completions, "rollout_time": self.rollout_time, "curve": list(self.curve)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.completions = int(state["completions"])
        self.rollout_time = float(state["rollout_time"])
        self.curve = [float(x) for x in state["curve"]]


@dataclass
class RLInputs:
    """What every RL recipe of the align stage starts from."""

    cfg: Any  # the AlignSection
    tokenizer: Any
    tokenizer_dir: Path
    train: list  # PromptRecords
    held_out: list
    rewards: Any  # rewards.Rewards
    reward_model: Path | None


def prepare(ctx: StageContext, prompts: list[str], field: str) -> RLInputs:
    """Tokenizer, prompts (split into train / held-out), reward sources: checked before any model loads."""
    from ..tokenizer.info import load_tokenizer
    from .rewards import Rewards, reward_model_scorer
    from .rollout import read_prompts, split_held_out

    cfg = ctx.manifest.align
    tokenizer_dir = ctx.input("tokenizer", "tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir)
    records = read_prompts([ctx.resolve(p) for p in prompts], field)
    train, held = split_held_out(records, cfg.eval_prompts, ctx.manifest.project.seed)
    rm_path, scorer = None, None
    if cfg.rewards.reward_model:
        if not ctx.has_input("reward", "model"):
            raise StageInputError(
                "align.rewards.reward_model is true but there is no reward model: enable the `reward` stage "
                "(and run it), or set align.rewards.reward_model: false"
            )
        rm_path = ctx.input("reward", "model")
        scorer = reward_model_scorer(rm_path)
    rewards = Rewards.from_config(cfg.rewards, scorer=scorer)
    return RLInputs(cfg, tokenizer, tokenizer_dir, train, held, rewards, rm_path)


def score(rewards, records, samples) -> tuple[torch.Tensor, dict[str, float]]:
    """Rewards [N] of ``samples`` (their prompts' fields passed on), and each source's mean."""
    from .rollout import fields_of

    recs = [records[s.prompt_index] for s in samples]
    out = rewards([r.prompt for r in recs], [s.text for s in samples], fields_of(recs))
    parts = {f"reward_{k}": sum(v) / len(v) for k, v in out.parts.items()} if samples else {}
    return torch.tensor(out.total, dtype=torch.float32), parts


def held_out_reward(sampler, rewards, records, *, limit: int = 8) -> dict[str, Any]:
    """Mean reward of greedy answers to the held-out prompts (and some samples for the report)."""
    if not records:
        return {"mean_reward": None, "samples": []}
    samples = sampler.sample(records, 1, temperature=0.0)
    r, parts = score(rewards, records, samples)
    return {
        "mean_reward": float(r.mean()) if len(r) else None,
        **parts,
        "samples": [
            {"prompt": records[s.prompt_index].prompt, "completion": s.text, "reward": float(x)}
            for s, x in zip(samples[:limit], r[:limit].tolist(), strict=False)
        ],
    }


def held_out_before(sampler, rewards, records, run_dir: Path, session) -> dict[str, Any]:
    """``held_out_reward`` of the *start* policy, kept in ``held_out_before.json`` beside the checkpoints.

    A resumed run's model is its checkpoint, not the start policy, so measuring "before" again would compare
    the end with the middle; the first measurement is reused when it belongs to this run's configuration.
    """
    import json

    from ..train.checkpoint import config_hash
    from ..utils.atomic import write_json

    path = run_dir / "held_out_before.json"
    key = config_hash(session.run_config)
    if session.resumed_from is not None and path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            saved = {}
        if saved.get("config_hash") == key:
            return saved["before"]
    before = held_out_reward(sampler, rewards, records)
    if session.resumed_from is None:
        write_json(path, {"config_hash": key, "before": before})
    return before


def run_config(ctx: StageContext, policy, method: str) -> dict[str, Any]:
    """What ``resume: auto`` compares: the settings, the seed and the start policy (path and weights)."""
    from ..train.recipe import base_identity

    cfg = ctx.manifest.align
    return {
        "align": cfg.semantic_dump(),
        "method": method,
        "seed": ctx.manifest.project.seed,
        "base": base_identity(ctx, policy.path),
    }


def resolve_resume(ctx: StageContext, cfg, rc: dict, run_dir: Path, env) -> str | Path:
    from ..train import dist
    from ..train.recipe import set_aside_foreign_checkpoints

    resume: str | Path = cfg.resume
    if resume not in ("auto", "false"):
        return ctx.resolve(resume)
    if resume == "auto":
        if env.is_main:
            force = bool(ctx.options.get("force"))
            set_aside_foreign_checkpoints(run_dir / "checkpoints", rc, force=force, field="align.resume")
        dist.barrier()
    return resume


def single_process(env, method: str) -> None:
    if env.world_size > 1:
        raise UserInputError(
            f"align.method: {method} runs in one process (rollouts come from one engine); set "
            "align.launcher: none and align.nproc: 1"
        )


def rl_summary(ctx, policy, before, after, steps, extra: list[tuple[str, str]]) -> list[tuple[str, str]]:
    from ..train.recipe import fmt

    rows = [("started from", policy.describe(ctx))]
    rows.append(
        (
            "held-out reward",
            f"{fmt(before['mean_reward'], 3)} before → {fmt(after['mean_reward'], 3)} after (greedy)",
        )
    )
    parts = [k for k in before if k.startswith("reward_") and k in after]
    if len(parts) > 1:  # one row per reward source, so a gain in one is not hidden by another
        rows.append(
            (
                "held-out by reward",
                ", ".join(
                    f"{k.removeprefix('reward_')} {fmt(before[k], 3)} → {fmt(after[k], 3)}" for k in parts
                ),
            )
        )
    rows.append(("steps", str(steps)))
    return rows + extra


# ----------------------------------------------------------------------------------------------------
# the recipe
# ----------------------------------------------------------------------------------------------------


def run(ctx: StageContext, policy) -> StageResult:
    """GRPO on ``policy`` (a ``recipe.ResolvedModel``): writes ``runs/align/model``, ``metrics.jsonl`` (one
    row per optimizer step: reward, advantages, KL, completion length, clip ratio, loss) and ``report.json``
    (held-out samples before/after)."""
    from ..train.loop import place_frozen, save_checkpoint, setup
    from ..train.metrics import MetricsWriter
    from ..train.recipe import export_model, load_start_model, training_env
    from ..train.stage import HFModelIO
    from ..utils.atomic import write_json
    from .rollout import Sampler, collate, completion_lengths, micro_batches, token_logprobs

    m = ctx.manifest
    cfg, g, project = m.align, m.align.grpo, m.project
    inp = prepare(ctx, g.prompts, "align.grpo.prompts")
    if g.prompts_per_step > len(inp.train):
        log.warning(
            "align.grpo.prompts_per_step (%d) is more than the %d training prompts; prompts repeat in a step",
            g.prompts_per_step,
            len(inp.train),
        )
    env, device = training_env(project)
    single_process(env, "grpo")
    tokenizer = inp.tokenizer

    torch.manual_seed(project.seed)
    model = load_start_model(policy.path, inp.tokenizer_dir)
    reference = None
    if g.kl_beta > 0 or g.track_kl:
        reference = load_start_model(policy.path)
        place_frozen({"reference": reference}, device)
    rc = run_config(ctx, policy, "grpo")
    run_dir = ctx.out_dir
    order = PromptOrder(len(inp.train), project.seed)
    tally = RolloutTally()
    session = setup(
        model,
        cfg,
        run_dir=run_dir,
        device=device,
        seed=project.seed,
        model_io=HFModelIO(model.config, inp.tokenizer_dir, tokenizer.info.generation_config()),
        run_config=rc,
        resume=resolve_resume(ctx, cfg, rc, run_dir, env),
        env=env,
        description="align.grpo",
        objective_name="grpo",
        stateful={"prompts": order, "rollouts": tally},
    )
    policy_model = session.model
    G, mu = g.group_size, g.updates_per_batch
    sampler = Sampler(
        policy_model, tokenizer, max_new_tokens=g.max_new_tokens, max_batch=min(256, g.prompts_per_step * G)
    )
    pad = tokenizer.info.pad_id if tokenizer.info.pad_id is not None else tokenizer.info.eos_id
    before = held_out_before(sampler, inp.rewards, inp.held_out, run_dir, session)
    log.info("grpo: held-out mean reward before %s", before["mean_reward"])

    MetricsWriter.truncate(run_dir, session.step if session.resumed_from else None)
    writer = MetricsWriter(run_dir, enabled=env.is_main, config=session.run_config)
    loss_fn = grpo_loss_fn(clip_eps=g.clip_eps, clip_eps_high=g.clip_eps_high, beta=g.kl_beta)
    ckpt = session.resumed_from
    with console.progress("align.grpo", total=cfg.max_steps - session.step, unit="step") as bar:
        while session.step < cfg.max_steps:
            step0 = session.step
            t0 = time.perf_counter()
            idx = order.take(g.prompts_per_step)
            records = [inp.train[i] for i in idx]
            samples = sampler.sample(
                records, G, temperature=g.temperature, top_p=g.top_p, seed=project.seed + step0
            )
            if not samples:
                raise StageInputError(
                    "align.grpo: no prompt of this step fits the model's context with max_new_tokens; shorten "
                    "the prompts or lower align.grpo.max_new_tokens"
                )
            # a prompt too long for the context is skipped whole, so groups stay complete
            rewards, parts = score(inp.rewards, records, samples)
            adv = group_advantages(rewards, G, scale=g.scale_rewards)
            batch = collate(samples, pad)
            batch["advantages"] = adv
            rollout_s = time.perf_counter() - t0
            if mu > 1:
                batch["old_logprobs"] = token_logprobs(
                    policy_model, batch, micro_batch=cfg.batch_size, device=device
                )
            if reference is not None:
                batch["ref_logprobs"] = token_logprobs(
                    reference, batch, micro_batch=cfg.batch_size, device=device
                )
            parts_mb = micro_batches(batch, cfg.batch_size)
            lengths = completion_lengths(batch).float()
            for _ in range(mu):
                if session.step >= cfg.max_steps:
                    break
                feed = iter(parts_mb)
                st = optimizer_step(session, lambda feed=feed: next(feed), loss_fn, grad_accum=len(parts_mb))
                row = {
                    "step": st.step,
                    "loss": st.loss,
                    "lr": st.lr,
                    "grad_norm": st.grad_norm,
                    "reward": float(rewards.mean()),
                    "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
                    **parts,
                    "completion_length": float(lengths.mean()),
                    "stopped": sum(s.finish_reason == "stop" for s in samples) / len(samples),
                    "zero_std_groups": float((rewards.view(-1, G).std(-1) == 0).float().mean()),
                    "completions_per_s": len(samples) / rollout_s if rollout_s > 0 else None,
                    **st.metrics,
                }
                if not st.applied:
                    row["skipped"] = session.skipped
                writer.log(row)
                bar.advance(1, reward=round(row["reward"], 3))
            tally.add(len(samples), rollout_s, float(rewards.mean()))
            if cfg.save_every and session.step % cfg.save_every < mu and session.step < cfg.max_steps:
                ckpt = save_checkpoint(session)
    writer.close()
    if ckpt is None or session.step != _ckpt_step(ckpt):
        ckpt = save_checkpoint(session)
    final = export_model(ckpt, ctx.out_dir, env)
    after = held_out_reward(sampler, inp.rewards, inp.held_out)
    log.info("grpo: held-out mean reward after %s", after["mean_reward"])
    metrics = rl_metrics(before, after, inp, sampler, session, tally)
    if env.is_main:
        write_json(run_dir / "report.json", report(before, after, inp, sampler))
    summary = rl_summary(
        ctx,
        policy,
        before,
        after,
        session.step,
        [
            ("rollouts", f"{tally.completions:,} completions ({G} per prompt), {_rate(metrics)}"),
            (
                "final model",
                str(final.relative_to(ctx.project_dir))
                if final.is_relative_to(ctx.project_dir)
                else str(final),
            ),
        ],
    )
    if inp.rewards.stats.errors or inp.rewards.stats.non_finite:
        summary.append(
            (
                "bad rewards",
                f"{inp.rewards.stats.errors} failed batches, {inp.rewards.stats.non_finite} NaN/Inf values (see report.json)",
            )
        )
    return StageResult(outputs={"model": final}, metrics=metrics, summary=summary)


def optimizer_step(*args, **kwargs):
    """The core's ``optimizer_step`` (a module-level name so tests can count the updates)."""
    from ..train.loop import optimizer_step as step

    return step(*args, **kwargs)


def _ckpt_step(path: Path) -> int:
    try:
        return int(Path(path).name.removeprefix("step_"))
    except ValueError:
        return -1


def _rate(metrics: dict[str, Any]) -> str:
    r = metrics.get("completions_per_s")
    return f"{r:,.1f} completions/s" if r else "-"


def rl_metrics(before, after, inp, sampler, session, tally: RolloutTally) -> dict[str, Any]:
    completions, rollout_time, curve = tally.completions, tally.rollout_time, tally.curve
    per_source = {
        f"held_out_{k}_{when}": d[k]
        for when, d in (("before", before), ("after", after))
        for k in d
        if k.startswith("reward_")
    }
    return {
        "held_out_reward_before": before["mean_reward"],
        "held_out_reward_after": after["mean_reward"],
        # the names `llmforge status` shows for the align stage (DPO's reward-model scores use them too)
        "reward_before": before["mean_reward"],
        "reward_after": after["mean_reward"],
        **per_source,
        "held_out_prompts": len(inp.held_out),
        "train_prompts": len(inp.train),
        "steps": session.step,
        "skipped_steps": session.skipped,
        "completions": completions,
        "completions_per_s": completions / rollout_time if rollout_time > 0 else None,
        "reward_first": curve[0] if curve else None,
        "reward_last": curve[-1] if curve else None,
        "prompts_too_long": sampler.stats.too_long,
        "train_time_s": round(session.train_time, 3),
        **inp.rewards.stats.as_metrics(),
    }


def report(before, after, inp, sampler) -> dict[str, Any]:
    return {
        "before": before,
        "after": after,
        "rewards": inp.rewards.names,
        "bad_rewards": inp.rewards.stats.examples,
        "prompts_too_long": sampler.stats.examples,
    }
