"""GRPO and PPO resume exactly: a run that dies after N optimizer steps and is started again (``resume: auto``)
ends with the same metrics, the same weights and the same held-out numbers as a run that never stopped.

The "kill" is an exception raised from inside the optimizer step after N calls, so nothing after it runs (no
checkpoint, no export, no lineage) — what a SIGKILL leaves, minus the half-written file the atomic writes
already guard against (tests/train/test_resume.py kills a real process for the core loop)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmforge.align import grpo, ppo
from llmforge.train import loop
from llmforge.train.checkpoint import list_checkpoints
from tests.align.rl_fixtures import align_project, cached_sft, prompt_rows, write_jsonl

# fields that are wall-clock measurements, not results
TIMING = {"completions_per_s", "tokens_per_s", "step_time_s", "elapsed_s", "train_time_s"}


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    return cached_sft(tmp_path_factory)


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows if "loss" in r]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def _die_after(monkeypatch, module, calls: int) -> list[int]:
    """Make ``module.optimizer_step`` raise on call ``calls + 1``; returns the call counter."""
    real = module.optimizer_step
    count = [0]

    def step(*a, **k):
        if count[0] == calls:
            raise Killed(f"killed after {calls} optimizer steps")
        count[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(module, "optimizer_step", step)
    return count


def _assert_same_run(a, b, ctx_a, ctx_b):
    assert _rows(ctx_b.out_dir) == _rows(ctx_a.out_dir)  # every step's loss, reward, grad norm, ... bitwise
    wa, wb = _weights(a.outputs["model"]), _weights(b.outputs["model"])
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    for key in ("held_out_reward_before", "held_out_reward_after", "steps", "completions", "reward_last"):
        assert b.metrics[key] == a.metrics[key], key


def _grpo_project(root: Path, sft, prompts: Path, **grpo_over):
    base, model = sft
    return align_project(
        root, base["tok"], model,
        align={
            "method": "grpo", "max_steps": 6, "save_every": 2, "eval_prompts": 6, "schedule": "cosine",
            "warmup_steps": 1,
            "grpo": {"prompts": [str(prompts)], "group_size": 4, "prompts_per_step": 4, "max_new_tokens": 8,
                     "temperature": 1.0, **grpo_over},
        },
    )  # fmt: skip


@pytest.mark.parametrize("mu", [1, 2])
def test_grpo_killed_then_resumed_equals_an_uninterrupted_run(tmp_path, sft, monkeypatch, mu):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(2))
    over = {"updates_per_batch": mu, "track_kl": True}
    ctx_a, policy = _grpo_project(tmp_path / "a", sft, prompts, **over)
    a = grpo.run(ctx_a, policy)

    ctx_b, policy = _grpo_project(tmp_path / "b", sft, prompts, **over)
    _die_after(monkeypatch, grpo, 5)  # steps 1-5 done, checkpoints at 2 and 4, step 5 logged but not saved
    with pytest.raises(Killed):
        grpo.run(ctx_b, policy)
    assert [s for s, _ in list_checkpoints(ctx_b.out_dir / "checkpoints")] == [2, 4]
    assert not (ctx_b.out_dir / "model").exists()
    assert len(_rows(ctx_b.out_dir)) == 5
    monkeypatch.undo()

    calls = _die_after(monkeypatch, grpo, 99)
    b = grpo.run(ctx_b, policy)  # resume: auto
    assert calls[0] == 2  # only steps 5 and 6 were trained again
    assert b.metrics["steps"] == 6
    _assert_same_run(a, b, ctx_a, ctx_b)


def test_grpo_does_not_resume_a_run_from_another_start_model(tmp_path, sft, monkeypatch):
    """The SFT stage rewrites runs/sft/model in place: checkpoints of a run that started from its previous
    weights must be set aside, not continued (the run config records the start weights' hash)."""
    base, model = sft
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(2))
    start = tmp_path / "start"
    import shutil

    shutil.copytree(model, start)
    ctx, policy = align_project(
        tmp_path / "p", base["tok"], start,
        align={"method": "grpo", "max_steps": 4, "save_every": 2, "eval_prompts": 4,
               "grpo": {"prompts": [str(prompts)], "group_size": 4, "prompts_per_step": 2, "max_new_tokens": 8}},
    )  # fmt: skip
    _die_after(monkeypatch, grpo, 3)
    with pytest.raises(Killed):
        grpo.run(ctx, policy)
    monkeypatch.undo()
    # "the SFT stage ran again": same path, other weights
    w = load_file(start / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v + 0.01 for k, v in w.items()}, start / "model.safetensors", metadata={"format": "pt"})
    calls = _die_after(monkeypatch, grpo, 99)
    res = grpo.run(ctx, policy)
    assert calls[0] == 4 and res.metrics["steps"] == 4  # started over
    assert (ctx.out_dir / "checkpoints.previous").is_dir()


def _ppo_project(root: Path, sft, prompts: Path):
    base, model = sft
    return align_project(
        root, base["tok"], model,
        align={
            "method": "ppo", "max_steps": 6, "save_every": 2, "eval_prompts": 6, "schedule": "cosine",
            "warmup_steps": 1,
            "ppo": {"prompts": [str(prompts)], "prompts_per_step": 8, "max_new_tokens": 8, "temperature": 1.0,
                    "ppo_epochs": 2},
        },
    )  # fmt: skip


def test_ppo_killed_then_resumed_equals_an_uninterrupted_run(tmp_path, sft, monkeypatch):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(2))
    ctx_a, policy = _ppo_project(tmp_path / "a", sft, prompts)
    a = ppo.run(ctx_a, policy)
    rows_a = _rows(ctx_a.out_dir)
    assert {"value_loss", "kl"} <= set(rows_a[0])

    ctx_b, policy = _ppo_project(tmp_path / "b", sft, prompts)
    # PPO steps the actor then the value model: die on the value model's 5th step, after the actor's 5th —
    # the two are out of step in memory, and only the checkpoints (both at step 4) may be trusted
    _die_after(monkeypatch, loop, 9)
    with pytest.raises(Killed):
        ppo.run(ctx_b, policy)
    assert [s for s, _ in list_checkpoints(ctx_b.out_dir / "checkpoints")] == [2, 4]
    assert [s for s, _ in list_checkpoints(ctx_b.out_dir / "value" / "checkpoints")] == [2, 4]
    assert not (ctx_b.out_dir / "model").exists()
    monkeypatch.undo()

    calls = _die_after(monkeypatch, loop, 99)
    b = ppo.run(ctx_b, policy)
    assert calls[0] == 4  # steps 5 and 6, actor and value
    _assert_same_run(a, b, ctx_a, ctx_b)
    va = load_file(next((ctx_a.out_dir / "value" / "checkpoints").glob("step_000006/model.safetensors")))
    vb = load_file(next((ctx_b.out_dir / "value" / "checkpoints").glob("step_000006/model.safetensors")))
    assert all(torch.equal(va[k], vb[k]) for k in va)
