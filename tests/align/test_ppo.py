"""PPO: GAE against a hand computation, the value loss's clipping, and a short run that raises the reward."""

from __future__ import annotations

import json

import pytest
import torch

from llmforge.align import ppo
from llmforge.align.ppo import clipped_value_loss, gae, whiten
from llmforge.model import load_pretrained
from tests.align.rl_fixtures import align_project, cached_sft, prompt_rows, write_jsonl


def test_gae_by_hand():
    # one row: a prompt position (masked out) then a 3-token completion
    rewards = torch.tensor([[0.0, 0.1, 0.2, 1.0]])
    values = torch.tensor([[9.0, 0.5, 0.4, 0.3]])
    mask = torch.tensor([[False, True, True, True]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    a3 = 1.0 - 0.3  # the value after the last token is 0
    a2 = (0.2 + 0.9 * 0.3 - 0.4) + 0.9 * 0.8 * a3
    a1 = (0.1 + 0.9 * 0.4 - 0.5) + 0.9 * 0.8 * a2
    torch.testing.assert_close(adv, torch.tensor([[0.0, a1, a2, a3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, a1 + 0.5, a2 + 0.4, a3 + 0.3]]))
    # γ = λ = 1 and zero values: every advantage is the sum of the rewards still to come
    adv1, _ = gae(rewards, torch.zeros_like(values), mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv1, torch.tensor([[0.0, 1.3, 1.2, 1.0]]))
    # rows are independent; padding after a completion is ignored
    two = gae(
        torch.tensor([[0.0, 0.1, 0.2, 1.0], [0.0, 2.0, 5.0, 7.0]]),
        torch.tensor([[9.0, 0.5, 0.4, 0.3], [0.0, 0.0, 3.0, 3.0]]),
        torch.tensor([[False, True, True, True], [True, True, False, False]]),
        gamma=0.9,
        lam=0.8,
    )[0]
    torch.testing.assert_close(two[0], adv[0])
    torch.testing.assert_close(two[1], torch.tensor([0.0 + 0.72 * 2.0, 2.0, 0.0, 0.0]))


def test_whiten_and_value_clip():
    x, m = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[True, True, True, False]])
    w = whiten(x, m)
    assert w[0, 3] == 0 and float(w[m].mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(w[m].pow(2).mean()) == pytest.approx(1.0, rel=1e-4)
    v, old, ret = torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]])
    s, clipped = clipped_value_loss(v, old, ret, torch.tensor([[True]]), clip=0.5)
    assert float(s) == pytest.approx(0.5 * (0.5 - 2.0) ** 2) and float(clipped) == 1.0  # pessimistic max


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    return cached_sft(tmp_path_factory)


def test_ppo_raises_the_reward(tmp_path, sft):
    base, model = sft
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows())
    ctx, policy = align_project(
        tmp_path / "p", base["tok"], model,
        align={
            "method": "ppo", "max_steps": 24, "lr": 5e-4,
            "ppo": {"prompts": [str(prompts)], "prompts_per_step": 32, "max_new_tokens": 10, "temperature": 0.8,
                    "ppo_epochs": 2, "kl_coef": 0.01, "vf_coef": 0.5},
        },
    )  # fmt: skip
    res = ppo.run(ctx, policy)
    m = res.metrics
    assert m["held_out_reward_after"] >= m["held_out_reward_before"] + 0.3, m
    rows = [json.loads(line) for line in (ctx.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and {"reward", "kl", "value_loss", "clip_ratio", "completion_length"} <= set(
        rows[0]
    )
    assert sum(r["reward"] for r in rows[-6:]) > sum(r["reward"] for r in rows[:6])
    assert (ctx.out_dir / "value" / "checkpoints").is_dir()
    trained = load_pretrained(res.outputs["model"], dtype=torch.float32)
    assert all(torch.isfinite(p).all() for p in trained.parameters())
