"""GRPO: advantages by hand, the loss against TRL's GRPOTrainer on identical log-probs, TRL-style invariance
(batch x accumulation, every parameter changes), and an end-to-end run that raises the held-out reward."""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from llmforge.align import grpo
from llmforge.align.grpo import clipped_policy_loss, group_advantages, grpo_loss_fn, k3_kl
from llmforge.align.rollout import IGNORE_INDEX, Sample, collate, micro_batches
from llmforge.manifest.align import AlignSection
from llmforge.model import Llama, load_pretrained, preset_config
from llmforge.train.loop import optimizer_step, setup
from tests.align.rl_fixtures import align_project, cached_sft, prompt_rows, write_jsonl


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(r, 4)
    std = (((0.75**2) + 3 * 0.25**2) / 3) ** 0.5  # Bessel-corrected: 0.5
    torch.testing.assert_close(adv[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))  # equal rewards teach nothing
    torch.testing.assert_close(
        group_advantages(r, 4, scale=False)[:4], torch.tensor([0.75, -0.25, -0.25, -0.25])
    )


def _trl_loss(lp, old, ref, adv, mask, *, beta, eps, eps_high):
    """TRL 1.16 ``GRPOTrainer._compute_loss`` (trl/trainer/grpo_trainer.py:3020-3297, loss_type "dapo",
    token-level importance sampling) run on our log-probs: the trainer's state is a stub and its per-token
    log-prob helper returns ``lp``, so every line of the loss is TRL's own."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    acc = SimpleNamespace(
        num_processes=1, sync_gradients=True, gather=lambda x: x, gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction="sum": x,
    )  # fmt: skip
    stub = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type="dapo", epsilon_low=eps, epsilon_high=eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, accelerator=acc, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros_like(lp), None),
    )  # fmt: skip
    B, T = lp.shape
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    return GRPOTrainer._compute_loss(stub, None, inputs), stub._metrics["train"]


@pytest.mark.parametrize(("beta", "eps_high"), [(0.0, 0.2), (0.04, 0.28)])
def test_loss_equals_trls_grpo_trainer(beta, eps_high):
    g = torch.Generator().manual_seed(0)
    B, T = 6, 9
    old = -torch.rand(B, T, generator=g) * 3
    lp = (old + torch.randn(B, T, generator=g) * 0.3).requires_grad_(True)  # ratios well outside the clip
    ref = old + torch.randn(B, T, generator=g) * 0.2
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    ours = clipped_policy_loss(
        lp, old, adv, mask, clip_eps=0.2, clip_eps_high=eps_high, beta=beta, ref_logprobs=ref
    )
    theirs, trl_metrics = _trl_loss(lp, old, ref, adv, mask, beta=beta, eps=0.2, eps_high=eps_high)
    mine = ours.loss_sum / ours.tokens
    torch.testing.assert_close(mine, theirs)
    (g_ours,) = torch.autograd.grad(mine, lp)
    (g_trl,) = torch.autograd.grad(theirs, lp)
    torch.testing.assert_close(g_ours, g_trl)
    assert float(ours.clipped / ours.tokens) == pytest.approx(trl_metrics["clip_ratio/region_mean"][0])
    if beta:
        assert float(ours.kl_sum / ours.tokens) == pytest.approx(trl_metrics["kl"][0], rel=1e-5)
    assert torch.all(k3_kl(lp.detach(), ref) >= 0)


def _tiny_model() -> Llama:
    torch.manual_seed(0)
    return Llama(
        preset_config(
            "tiny", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )
    )  # fmt: skip


def _rollout_batch(n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    samples = []
    for i in range(n):
        p = torch.randint(3, 64, (3 + i % 3,), generator=g).tolist()
        c = torch.randint(3, 64, (2 + (i * 5) % 7,), generator=g).tolist()  # different completion lengths
        samples.append(Sample(i // 4, p, c, "", "stop"))
    batch = collate(samples, pad_id=0)
    batch["advantages"] = group_advantages(torch.randn(n, generator=g), 4)
    batch["old_logprobs"] = -torch.rand(batch["labels"].shape, generator=g) * (
        batch["labels"] != IGNORE_INDEX
    )
    return batch


def _session(tmp_path, batch_size: int):
    cfg = AlignSection(
        max_steps=2, warmup_steps=0, lr=1e-2, batch_size=batch_size, grad_clip=0.0, resume="false"
    )
    return setup(_tiny_model(), cfg, run_dir=tmp_path, description="grpo-test")


def _grads_of_one_step(tmp_path, batch, batch_size: int) -> list[torch.Tensor]:
    session = _session(tmp_path, batch_size)
    parts = micro_batches(batch, batch_size)
    feed = iter(parts)
    seen: list[list[torch.Tensor]] = []
    session.optimizer.step = lambda: seen.append([p.grad.clone() for p in session.params])
    loss_fn = grpo_loss_fn(clip_eps=0.2, clip_eps_high=None, beta=0.0)
    optimizer_step(session, lambda: next(feed), loss_fn, grad_accum=len(parts))
    return seen[0]


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_batch_times_accumulation_invariance(tmp_path):
    """Batch 8 x accumulation 1 == batch 1 x accumulation 8 == batch 3 x 3 (uneven micro-batches, different
    token counts): DAPO's one mean over every token of the batch is what the core's token weighting gives."""
    batch = _rollout_batch(8)
    ref = _grads_of_one_step(tmp_path / "a", batch, 8)
    for bs in (1, 3):
        for x, y in zip(ref, _grads_of_one_step(tmp_path / f"b{bs}", batch, bs), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)


def test_every_trainable_parameter_changes_after_a_step(tmp_path):
    batch = _rollout_batch(8)
    session = _session(tmp_path, 8)
    before = {n: p.detach().clone() for n, p in session.model.named_parameters()}
    feed = iter(micro_batches(batch, 8))
    st = optimizer_step(
        session, lambda: next(feed), grpo_loss_fn(clip_eps=0.2, clip_eps_high=None, beta=0.0), grad_accum=1
    )
    assert st.applied and st.grad_norm > 0
    for n, p in session.model.named_parameters():
        assert not torch.equal(before[n], p.detach()), f"{n} did not change"


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    return cached_sft(tmp_path_factory)


GRPO = {"group_size": 8, "prompts_per_step": 4, "max_new_tokens": 10, "temperature": 0.8}


def test_grpo_raises_the_held_out_reward(tmp_path, sft):
    base, model = sft
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows())
    ctx, policy = align_project(
        tmp_path / "p", base["tok"], model,
        align={"method": "grpo", "grpo": {**GRPO, "prompts": [str(prompts)], "track_kl": True}},
    )  # fmt: skip
    res = grpo.run(ctx, policy)
    m = res.metrics
    assert m["held_out_reward_after"] >= m["held_out_reward_before"] + 0.5, m
    assert m["steps"] == 20 and m["completions"] == 20 * 32 and m["reward_errors"] == 0
    rows = [json.loads(line) for line in (ctx.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert {"reward", "reward_regex", "reward_exact_match", "kl", "completion_length", "clip_ratio"} <= set(
        rows[0]
    )
    assert sum(r["reward"] for r in rows[-5:]) > sum(r["reward"] for r in rows[:5])
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["kl"] > 0  # moves away from the start
    out = res.outputs["model"]
    assert out == ctx.out_dir / "model" and (out / "tokenizer.json").is_file()
    trained = load_pretrained(out, dtype=torch.float32)
    start = load_pretrained(model, dtype=torch.float32)
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters(), strict=True))
    report = json.loads((ctx.out_dir / "report.json").read_text())
    assert report["before"]["samples"] and report["after"]["mean_reward"] == m["held_out_reward_after"]
    assert "held-out reward" in dict(res.summary)


def test_mu_updates_and_a_broken_reward_never_make_a_nan_model(tmp_path, sft):
    base, model = sft
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(1))
    calls = []
    real = grpo.optimizer_step
    ctx, policy = align_project(
        tmp_path / "p", base["tok"], model,
        align={
            "method": "grpo", "max_steps": 4, "eval_prompts": 4,
            "grpo": {**GRPO, "prompts": [str(prompts)], "updates_per_batch": 2, "prompts_per_step": 2},
            "rewards": {"functions": [{"name": "tests.align.rl_fixtures:nan_reward"}, {"name": "tests.align.rl_fixtures:raising_reward"}]},
        },
    )  # fmt: skip
    grpo.optimizer_step = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        res = grpo.run(ctx, policy)
    finally:
        grpo.optimizer_step = real
    assert len(calls) == 4  # 2 rollout batches x μ = 2
    m = res.metrics
    assert m["reward_errors"] >= 2 and m["reward_non_finite"] >= 2  # every batch, counted
    trained = load_pretrained(res.outputs["model"], dtype=torch.float32)
    assert all(torch.isfinite(p).all() for p in trained.parameters())
    report = json.loads((ctx.out_dir / "report.json").read_text())
    assert {b["problem"] for b in report["bad_rewards"]} == {"error", "non_finite"}
    assert "bad rewards" in dict(res.summary)


def test_bad_prompt_rows_name_the_line(tmp_path, sft):
    base, model = sft
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "What is 1 plus 1?", "answer": 2}\n{"question": "x"}\n')
    ctx, policy = align_project(
        tmp_path / "p", base["tok"], model, align={"method": "grpo", "grpo": {"prompts": [str(bad)]}}
    )
    from llmforge.errors import LLMForgeError

    with pytest.raises(LLMForgeError, match=r"bad.jsonl:2: a prompt row needs `prompt`"):
        grpo.run(ctx, policy)


def test_prompts_too_long_for_the_context_are_skipped_and_counted(sft):
    from llmforge.align.rollout import PromptRecord, Sampler
    from llmforge.tokenizer.info import load_tokenizer

    base, model = sft
    sampler = Sampler(
        load_pretrained(model, dtype=torch.float32), load_tokenizer(base["tok"]), max_new_tokens=10
    )
    long = "What is " + "1 plus " * 80 + "1?"
    recs = [
        PromptRecord(long, [{"role": "user", "content": long}], {}, "p.jsonl:1"),
        PromptRecord(
            "What is 1 plus 1?", [{"role": "user", "content": "What is 1 plus 1?"}], {}, "p.jsonl:2"
        ),
    ]
    out = sampler.sample(recs, 3, temperature=1.0, seed=1)
    assert [s.prompt_index for s in out] == [1, 1, 1]
    assert sampler.stats.too_long == 1 and sampler.stats.examples == ["p.jsonl:1"]
    again = sampler.sample(recs, 3, temperature=1.0, seed=1)
    assert [s.completion_ids for s in again] == [s.completion_ids for s in out]  # seeded: reproducible
    assert sampler.stats.too_long == 1  # counted once per prompt
