"""PPO for language models (Ouyang et al., 2022; Ziegler et al., 2019): actor, frozen reference, reward, value
model, GAE, clipped policy and value losses, and a KL penalty to the reference inside the reward.

Per rollout batch (one completion per prompt, sampled from the current actor):

    per-token reward   r_t = -β_KL (log π_old(o_t) - log π_ref(o_t))  + [t = last] · R(q, o)
    GAE                δ_t = r_t + γ V(s_{t+1}) - V(s_t),   Â_t = Σ_l (γλ)^l δ_{t+l},   R̂_t = Â_t + V(s_t)
    policy loss        -min(ρ_t Â_t, clip(ρ_t, 1 ± ε) Â_t)   with Â whitened over the batch's tokens
    value loss         ½ max((V_t - R̂_t)², (V_old,t + clip(V_t - V_old,t, ±ε_v) - R̂_t)²)

(V(s_t) is the value of the state *before* token t; the value after the last token is 0.) ``R`` is the
weighted sum of the reward functions and/or the reward model (``rewards``), as for GRPO. Losses are means
over the batch's completion tokens (the core's token-weighted ``LossOutput``).

The value model is **a separate model**: the policy's trunk copied at the start plus a zero-initialised scalar
head on its final hidden states. Why not a head on the actor's trunk: the value regression's gradients would
then move the policy's weights (the two losses pull the shared features apart and need a tuned ``vf_coef``),
and the actor's checkpoints would no longer be a plain ``LlamaForCausalLM``. Two models cost a second
forward/backward — cheap at the sizes PPO is used on CPU, and the usual choice (TRL's ``PPOTrainer`` and
OpenAI's summarisation work keep separate value networks). The actor trains through one core session
(``setup``/``optimizer_step``/``save_checkpoint``) and the value model through a second one, so each has its
own AdamW, schedule, checkpoints (``runs/align/value/checkpoints``) and exact resume.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .. import console
from ..errors import StageInputError
from ..stage import StageContext, StageResult
from ..train.loop import LossOutput
from .grpo import clipped_policy_loss
from .rollout import IGNORE_INDEX

log = console.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------
# the maths
# ----------------------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016, eq. 16) over each row's masked tokens.

    ``rewards``, ``values``, ``mask``: [B, T]; a row's masked positions are one contiguous completion. Returns
    (advantages, returns = advantages + values), 0 outside the mask. The value after a row's last token is 0
    (the episode ends there).
    """
    B, T = rewards.shape
    m = mask.to(rewards.dtype)
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        nxt_m = m[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        nxt_v = values[:, t + 1] * nxt_m if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt_v - values[:, t]
        last = (delta + gamma * lam * last * nxt_m) * m[:, t]
        adv[:, t] = last
    return adv, (adv + values) * m


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (the advantages of a PPO batch), 0 elsewhere."""
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * m


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ masked ½·max((V - R̂)², (V_old + clip(V - V_old, ±clip) - R̂)²), Σ masked [the clip was active])."""
    m = mask.to(values.dtype)
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    a, b = (values - returns) ** 2, (clipped - returns) ** 2
    return (0.5 * torch.max(a, b) * m).sum(), ((b > a).to(m.dtype) * m).sum().detach()


# ----------------------------------------------------------------------------------------------------
# the value model
# ----------------------------------------------------------------------------------------------------


class ValueModel(nn.Module):
    """A Llama trunk and a scalar head: V(s_t) for every position (see the module docstring)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.backbone.hidden_states(input_ids)
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()


def policy_loss_fn(clip_eps: float):
    def loss_fn(model, batch) -> LossOutput:
        labels = batch["labels"]
        mask = labels != IGNORE_INDEX
        lp = model(batch["input_ids"], labels=labels, output="logprobs")
        t = clipped_policy_loss(lp, batch["old_logprobs"], batch["advantages"], mask, clip_eps=clip_eps)
        n = t.tokens.clamp(min=1)
        return LossOutput(
            t.loss_sum / n, weight=t.tokens, tokens=int(mask.sum()), metrics={"clip_ratio": t.clipped / n}
        )

    return loss_fn


def value_loss_fn(clip: float, coef: float):
    def loss_fn(model, batch) -> LossOutput:
        mask = batch["labels"] != IGNORE_INDEX
        v = model(batch["input_ids"])
        s, clipped = clipped_value_loss(v, batch["old_values"], batch["returns"], mask, clip=clip)
        n = mask.sum().clamp(min=1)
        return LossOutput(
            coef * s / n, weight=mask.sum(), tokens=int(mask.sum()), metrics={"value_clip_ratio": clipped / n}
        )

    return loss_fn


@torch.no_grad()
def _values(model, batch, micro: int, device) -> torch.Tensor:
    out = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
    for s in range(0, out.shape[0], micro):
        out[s : s + micro] = model(batch["input_ids"][s : s + micro].to(device)).cpu()
    return out


# ----------------------------------------------------------------------------------------------------
# the recipe
# ----------------------------------------------------------------------------------------------------


def run(ctx: StageContext, policy) -> StageResult:
    """PPO on ``policy``: writes ``runs/align/model`` (the actor), ``runs/align/value`` (the value model's
    checkpoints), ``metrics.jsonl`` and ``report.json``."""
    from ..train.loop import optimizer_step, place_frozen, save_checkpoint, setup
    from ..train.metrics import MetricsWriter
    from ..train.recipe import export_model, load_start_model, training_env
    from ..train.stage import HFModelIO
    from ..utils.atomic import write_json
    from .grpo import (
        PromptOrder,
        RolloutTally,
        _ckpt_step,
        held_out_before,
        held_out_reward,
        prepare,
        report,
        resolve_resume,
        rl_metrics,
        rl_summary,
        run_config,
        score,
        single_process,
    )
    from .rollout import Sampler, collate, completion_lengths, micro_batches, token_logprobs

    m = ctx.manifest
    cfg, p, project = m.align, m.align.ppo, m.project
    inp = prepare(ctx, p.prompts, "align.ppo.prompts")
    env, device = training_env(project)
    single_process(env, "ppo")
    tokenizer = inp.tokenizer

    torch.manual_seed(project.seed)
    actor = load_start_model(policy.path, inp.tokenizer_dir)
    reference = load_start_model(policy.path)
    value = ValueModel(load_start_model(policy.path))
    place_frozen({"reference": reference}, device)
    rc = run_config(ctx, policy, "ppo")
    order = PromptOrder(len(inp.train), project.seed)
    tally = RolloutTally()
    resume = resolve_resume(ctx, cfg, rc, ctx.out_dir, env)
    session = setup(
        actor,
        cfg,
        run_dir=ctx.out_dir,
        device=device,
        seed=project.seed,
        model_io=HFModelIO(actor.config, inp.tokenizer_dir, tokenizer.info.generation_config()),
        run_config=rc,
        resume=resume,
        env=env,
        description="align.ppo",
        objective_name="ppo",
        stateful={"prompts": order, "rollouts": tally},
    )
    vsession = setup(
        value,
        cfg,
        run_dir=ctx.out_dir / "value",
        device=device,
        seed=project.seed + 1,
        run_config=rc,
        resume=resume if resume in ("auto", "false") else "auto",
        env=env,
        description="align.ppo.value",
        objective_name="ppo_value",
    )
    if vsession.step != session.step:
        raise StageInputError(
            f"the actor's checkpoint is at step {session.step} but the value model's at {vsession.step}; "
            "set align.resume: false to start over"
        )
    sampler = Sampler(
        session.model, tokenizer, max_new_tokens=p.max_new_tokens, max_batch=min(256, p.prompts_per_step)
    )
    pad = tokenizer.info.pad_id if tokenizer.info.pad_id is not None else tokenizer.info.eos_id
    before = held_out_before(sampler, inp.rewards, inp.held_out, ctx.out_dir, session)
    log.info("ppo: held-out mean reward before %s", before["mean_reward"])

    MetricsWriter.truncate(ctx.out_dir, session.step if session.resumed_from else None)
    writer = MetricsWriter(ctx.out_dir, enabled=env.is_main, config=session.run_config)
    pol_loss, val_loss = policy_loss_fn(p.clip_eps), value_loss_fn(p.value_clip, p.vf_coef)
    ckpt = session.resumed_from
    with console.progress("align.ppo", total=cfg.max_steps - session.step, unit="step") as bar:
        while session.step < cfg.max_steps:
            t0 = time.perf_counter()
            records = [inp.train[i] for i in order.take(p.prompts_per_step)]
            samples = sampler.sample(records, 1, temperature=p.temperature, seed=project.seed + session.step)
            if not samples:
                raise StageInputError(
                    "align.ppo: no prompt of this step fits the model's context with max_new_tokens; shorten "
                    "the prompts or lower align.ppo.max_new_tokens"
                )
            scores, parts = score(inp.rewards, records, samples)
            batch = collate(samples, pad)
            rollout_s = time.perf_counter() - t0
            mask = batch["labels"] != IGNORE_INDEX
            old_lp = token_logprobs(session.model, batch, micro_batch=cfg.batch_size, device=device)
            ref_lp = token_logprobs(reference, batch, micro_batch=cfg.batch_size, device=device)
            old_v = _values(vsession.model, batch, cfg.batch_size, device) * mask
            kl = (old_lp - ref_lp) * mask
            rewards = -p.kl_coef * kl
            last = mask.long().cumsum(-1).argmax(-1)  # each row's last completion position
            rewards[torch.arange(len(samples)), last] += scores
            adv, returns = gae(rewards, old_v, mask, gamma=p.gamma, lam=p.lam)
            batch.update(old_logprobs=old_lp, advantages=whiten(adv, mask), old_values=old_v, returns=returns)
            parts_mb = micro_batches(batch, cfg.batch_size)
            for _ in range(p.ppo_epochs):
                if session.step >= cfg.max_steps:
                    break
                feed, vfeed = iter(parts_mb), iter(parts_mb)
                st = optimizer_step(session, lambda f=feed: next(f), pol_loss, grad_accum=len(parts_mb))
                vst = optimizer_step(vsession, lambda f=vfeed: next(f), val_loss, grad_accum=len(parts_mb))
                row = {
                    "step": st.step,
                    "loss": st.loss,
                    "value_loss": vst.loss,
                    "lr": st.lr,
                    "grad_norm": st.grad_norm,
                    "reward": float(scores.mean()),
                    **parts,
                    "kl": float(kl.sum(-1).mean()),
                    "completion_length": float(completion_lengths(batch).float().mean()),
                    "completions_per_s": len(samples) / rollout_s if rollout_s > 0 else None,
                    **st.metrics,
                    **vst.metrics,
                }
                writer.log(row)
                bar.advance(1, reward=round(row["reward"], 3))
            tally.add(len(samples), rollout_s, float(scores.mean()))
            if (
                cfg.save_every
                and session.step % cfg.save_every < p.ppo_epochs
                and session.step < cfg.max_steps
            ):
                ckpt = save_checkpoint(session)
                save_checkpoint(vsession)
    writer.close()
    if ckpt is None or _ckpt_step(ckpt) != session.step:
        ckpt = save_checkpoint(session)
        save_checkpoint(vsession)
    final = export_model(ckpt, ctx.out_dir, env)
    after = held_out_reward(sampler, inp.rewards, inp.held_out)
    log.info("ppo: held-out mean reward after %s", after["mean_reward"])
    metrics = rl_metrics(before, after, inp, sampler, session, tally)
    metrics["value_model"] = "separate (policy trunk + scalar head)"
    if env.is_main:
        write_json(ctx.out_dir / "report.json", report(before, after, inp, sampler))
    summary = rl_summary(
        ctx, policy, before, after, session.step, [("rollouts", f"{tally.completions:,} completions")]
    )
    return StageResult(outputs={"model": final}, metrics=metrics, summary=summary)
