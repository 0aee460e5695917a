"""The `align` stage: DPO end to end (held-out reward accuracy and margins, reward-model scores before and
after), precomputed vs frozen reference, dispatch to the RL methods, rejection sampling feeding DPO, and bad
input."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch

import llmforge.align as align_pkg
from llmforge.align.reward import run_reward
from llmforge.align.stage import run_align
from llmforge.errors import UserInputError
from llmforge.model import load_pretrained
from llmforge.stage import StageResult

from .conftest import make_ctx, preference_rows, write_jsonl


def align_section(align_base, **kw) -> dict:
    s = {
        "enabled": True,
        "method": "dpo",
        "max_steps": 30,
        "batch_size": 8,
        "seq_len": 64,
        "lr": 2e-3,
        "warmup_steps": 2,
        "eval_every": 0,
        "save_every": 0,
        "log_every": 10,
        "eval_prompts": 4,
        "dpo": {"data": [str(align_base["pairs"])], "beta": 0.1, "max_new_tokens": 8},
    }
    for k, v in kw.items():
        if isinstance(v, dict) and isinstance(s.get(k), dict):
            s[k] = {**s[k], **v}
        else:
            s[k] = v
    return s


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, align_base):
    ctx = make_ctx(
        tmp_path_factory.mktemp("rm"),
        "reward",
        {
            "reward": {
                "enabled": True,
                "from": str(align_base["model"]),
                "data": [str(align_base["pairs"])],
                "max_steps": 30,
                "batch_size": 8,
                "seq_len": 64,
                "lr": 3e-3,
                "warmup_steps": 2,
                "eval_every": 0,
                "save_every": 0,
            }
        },
        upstream={"tokenizer": {"tokenizer": align_base["tok"]}},
    )
    return run_reward(ctx).outputs["model"]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, align_base, reward_model):
    ctx = make_ctx(
        tmp_path_factory.mktemp("dpo"),
        "align",
        {"align": align_section(align_base)},
        upstream={
            "tokenizer": {"tokenizer": align_base["tok"]},
            "sft": {"model": align_base["model"]},
            "reward": {"model": reward_model},
        },
    )
    return ctx, run_align(ctx)


def test_dpo_raises_held_out_reward_accuracy_and_margins(dpo_run):
    ctx, res = dpo_run
    m = res.metrics
    assert res.outputs == {"model": ctx.out_dir / "model"}
    assert m["method"] == "dpo" and m["policy_source"] == "stage sft" and m["reference"] == "precomputed"
    # before training the policy is the reference: every implicit reward is 0
    assert m["accuracy_before"] == 0.0 and m["margin_before"] == pytest.approx(0.0, abs=1e-4)
    assert m["accuracy_after"] >= 0.9 and m["margin_after"] > 0.5, m
    assert m["val_pairs"] > 10 and m["skipped_pairs"] == 0
    # the reward model's view of greedy answers, before and after
    assert "reward_before" in m and "reward_after" in m
    labels = dict(res.summary)
    assert labels["method"].startswith("dpo (loss: sigmoid") and "stage sft" in labels["policy"]
    assert "reward accuracy 0% →" in labels["held-out pairs"] and "mean score" in labels["reward model"]
    report = json.loads((ctx.out_dir / "report.json").read_text())
    assert len(report["samples"]) == 4 and {"before", "after", "score_before", "score_after"} <= set(
        report["samples"][0]
    )
    # metrics.jsonl carries the DPO metrics
    rows = [json.loads(x) for x in (ctx.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"} <= set(rows[0])
    # the output is a causal LM checkpoint with the project tokenizer
    out = load_pretrained(ctx.out_dir / "model")
    assert out.config.vocab_size >= 500 and (ctx.out_dir / "model" / "tokenizer.json").is_file()


def test_frozen_reference_and_packing_give_the_same_run(tmp_path, align_base):
    """precomputed reference == frozen reference model; packed pair batches == padded ones."""
    up = {"tokenizer": {"tokenizer": align_base["tok"]}, "sft": {"model": align_base["model"]}}
    outs = []
    for i, (pre, pack) in enumerate(((True, False), (False, False), (True, True))):
        sec = align_section(
            align_base,
            max_steps=3,
            warmup_steps=0,
            eval_prompts=0,
            dpo={"precompute_reference": pre, "packing": pack},
        )
        ctx = make_ctx(tmp_path / str(i), "align", {"align": sec}, upstream=up)
        res = run_align(ctx)
        outs.append((res, load_pretrained(res.outputs["model"])))
    (a, ma), *others = outs
    assert a.metrics["reference"] == "precomputed" and others[0][0].metrics["reference"] == "frozen"
    for b, mb in others:
        assert a.metrics["train_loss"] == pytest.approx(b.metrics["train_loss"], rel=1e-5)
        assert a.metrics["accuracy_after"] == pytest.approx(b.metrics["accuracy_after"])
        for (n, p), q in zip(ma.named_parameters(), mb.parameters(), strict=True):
            assert torch.allclose(p, q, atol=1e-5), n


@pytest.mark.parametrize("loss", ["ipo", "simpo", "orpo"])
def test_variants_train_and_raise_accuracy(tmp_path, align_base, loss):
    up = {"tokenizer": {"tokenizer": align_base["tok"]}, "sft": {"model": align_base["model"]}}
    sec = align_section(
        align_base, max_steps=15, eval_prompts=0, dpo={"loss": loss, "beta": 2.0 if loss == "simpo" else 0.1}
    )
    res = run_align(make_ctx(tmp_path, "align", {"align": sec}, upstream=up))
    m = res.metrics
    assert m["loss_type"] == loss and m["accuracy_after"] > m["accuracy_before"], m
    assert m["reference"] == ("precomputed" if loss == "ipo" else "none")


def test_bad_pairs_are_reported_in_the_stage(tmp_path, align_base):
    rows = [
        *preference_rows(40),
        {"prompt": "Same?", "chosen": "yes", "rejected": "yes"},
        {"prompt": "Empty?", "chosen": "", "rejected": "no"},
        {"prompt": "x " * 200, "chosen": "a", "rejected": "b"},
    ]
    f = write_jsonl(tmp_path / "pairs.jsonl", rows)
    up = {"tokenizer": {"tokenizer": align_base["tok"]}, "sft": {"model": align_base["model"]}}
    sec = align_section(align_base, max_steps=2, warmup_steps=0, eval_prompts=0, dpo={"data": [str(f)]})
    res = run_align(make_ctx(tmp_path / "p", "align", {"align": sec}, upstream=up))
    assert res.metrics["skipped"] == {"identical": 1, "empty_response": 1, "too_long": 1}
    assert "1 identical, 1 empty_response, 1 too_long" in dict(res.summary)["data"]
    report = json.loads((tmp_path / "p" / "runs" / "align" / "report.json").read_text())
    assert any(":41: identical" in e for e in report["data"]["examples"])


def test_dispatch_to_rl_methods_and_rejection_sampling_feeds_dpo(tmp_path, align_base, monkeypatch):
    calls = []
    fake_grpo = SimpleNamespace(
        run=lambda ctx, policy: (
            calls.append(("grpo", policy.source)) or StageResult(metrics={"reward_after": 1.0})
        )
    )
    monkeypatch.setitem(sys.modules, "llmforge.align.grpo", fake_grpo)
    monkeypatch.setattr(align_pkg, "grpo", fake_grpo, raising=False)
    up = {"tokenizer": {"tokenizer": align_base["tok"]}, "sft": {"model": align_base["model"]}}
    res = run_align(
        make_ctx(tmp_path / "g", "align", {"align": align_section(align_base, method="grpo")}, upstream=up)
    )
    assert calls == [("grpo", "stage sft")] and res.metrics["method"] == "grpo"
    assert dict(res.summary)["method"] == "grpo" and "stage sft" in dict(res.summary)["policy"]

    # rejection sampling first; with no align.dpo.data its pairs are DPO's data
    pairs = write_jsonl(tmp_path / "rs" / "pairs.jsonl", preference_rows(40, seed=5))
    sft = write_jsonl(tmp_path / "rs" / "sft.jsonl", [{"prompt": "a", "completion": "b"}])
    fake_rs = SimpleNamespace(
        run=lambda ctx, policy: SimpleNamespace(sft_file=sft, pairs_file=pairs, metrics={"prompts": 40})
    )
    monkeypatch.setitem(sys.modules, "llmforge.align.rejection", fake_rs)
    monkeypatch.setattr(align_pkg, "rejection", fake_rs, raising=False)
    sec = align_section(
        align_base,
        max_steps=2,
        warmup_steps=0,
        eval_prompts=0,
        dpo={"data": []},
        rejection_sampling={"enabled": True},
    )
    res = run_align(make_ctx(tmp_path / "d", "align", {"align": sec}, upstream=up))
    assert "from rejection sampling" in dict(res.summary)["data"] and res.metrics["pairs"] == 40
    assert (
        res.outputs["pairs"] == pairs
        and res.outputs["sft_data"] == sft
        and res.metrics["rejection_prompts"] == 40
    )

    # method none without rejection sampling has nothing to do: an error that says what to change
    with pytest.raises(UserInputError, match=r"rejection_sampling\.enabled"):
        run_align(
            make_ctx(
                tmp_path / "n", "align", {"align": align_section(align_base, method="none")}, upstream=up
            )
        )


def test_reward_model_is_never_taken_as_the_policy(tmp_path, align_base, reward_model):
    from llmforge.errors import StageInputError

    up = {
        "tokenizer": {"tokenizer": align_base["tok"]},
        "sft": {"model": align_base["model"]},
        "reward": {"model": reward_model},
    }
    # the resolver skips the reward stage's model (tested end to end above: policy_source == "stage sft");
    # naming it explicitly is an error that says what to point at instead
    sec = align_section(align_base, **{"from": str(reward_model)})
    with pytest.raises(StageInputError, match=r"is a reward model .*runs/sft/model"):
        run_align(make_ctx(tmp_path, "align", {"align": sec}, upstream=up))
