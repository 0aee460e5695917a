"""The reward model: Bradley–Terry loss (hand values, TRL's RewardTrainer formula), the scalar head saved as
``LlamaForSequenceClassification`` (transformers gives the same scores), preference data and its bad input,
the `reward` stage and file scoring."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmforge.align.preference_data import PreferenceStats, tokenize_pairs
from llmforge.align.reward import (
    RewardModel,
    bradley_terry_loss,
    load_reward_model,
    run_reward,
    save_reward_model,
    score,
    score_file,
)
from llmforge.errors import StageInputError
from llmforge.model import load_pretrained
from llmforge.tokenizer.info import load_tokenizer

from .conftest import make_ctx, write_jsonl

# ----------------------------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------------------------


def test_bradley_terry_hand_values():
    c, r = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 3.0])
    want = [math.log1p(math.exp(-1.0)), math.log(2.0), math.log1p(math.exp(4.0))]
    assert torch.allclose(bradley_terry_loss(c, r), torch.tensor(want), atol=1e-6)
    # with a margin m: -log σ(r_c - r_r - m)
    got = bradley_terry_loss(c, r, torch.tensor([1.0, -2.0, 0.5]))
    want_m = [math.log(2.0), math.log1p(math.exp(-2.0)), math.log1p(math.exp(4.5))]
    assert torch.allclose(got, torch.tensor(want_m), atol=1e-6)
    # stable for huge gaps (no inf/NaN) and differentiable
    big = bradley_terry_loss(torch.tensor([1e4]), torch.tensor([-1e4]))
    assert big.item() == 0.0
    assert bradley_terry_loss(torch.tensor([-1e4]), torch.tensor([1e4])).item() == pytest.approx(2e4)


def test_bradley_terry_matches_trl_reward_trainer():
    """TRL 1.16 trl/trainer/reward_trainer.py:789-792 (RewardTrainer.compute_loss):
    ``-logsigmoid(rewards_chosen - rewards_rejected [- margin]).mean()``; identical scores → identical loss."""
    pytest.importorskip("trl")
    from trl.trainer import reward_trainer

    src = Path(reward_trainer.__file__).read_text()
    assert '-nn.functional.logsigmoid(rewards_chosen - rewards_rejected - inputs["margin"]).mean()' in src
    g = torch.Generator().manual_seed(0)
    c, r, m = torch.randn(64, generator=g) * 3, torch.randn(64, generator=g) * 3, torch.rand(64, generator=g)
    trl_plain = -torch.nn.functional.logsigmoid(c - r).mean()
    trl_margin = -torch.nn.functional.logsigmoid(c - r - m).mean()
    assert torch.allclose(bradley_terry_loss(c, r).mean(), trl_plain, atol=1e-7)
    assert torch.allclose(bradley_terry_loss(c, r, m).mean(), trl_margin, atol=1e-7)


# ----------------------------------------------------------------------------------------------------
# the model and its transformers interop
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["model", "untied"])
def test_saved_reward_model_loads_in_transformers_with_same_scores(align_base, tmp_path, which):
    transformers = pytest.importorskip("transformers")
    info = align_base["info"]
    lm = load_pretrained(align_base[which], dtype=torch.float32)
    rm = RewardModel.from_causal_lm(lm, seed=0)
    assert not hasattr(rm, "lm_head") and rm.score.weight.shape == (1, lm.config.hidden_size)
    # the backbone was copied, not shared
    assert torch.equal(rm.model.layers[0].mlp.up_proj.weight, lm.model.layers[0].mlp.up_proj.weight)
    assert (
        rm.model.layers[0].mlp.up_proj.weight.data_ptr() != lm.model.layers[0].mlp.up_proj.weight.data_ptr()
    )
    out = save_reward_model(
        rm, tmp_path / "rm", config=rm.config, pad_token_id=info.pad_id, tokenizer_dir=align_base["tok"]
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["pad_token_id"] == info.pad_id
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.num_labels == 1 and type(hf).__name__ == "LlamaForSequenceClassification"

    tok = load_tokenizer(align_base["tok"])
    convs = [
        [
            {"role": "user", "content": "What is 2 plus 3?"},
            {"role": "assistant", "content": "The answer is 5."},
        ],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, how can I help?"}],
        [{"role": "user", "content": "What is 9 plus 9?"}, {"role": "assistant", "content": "18"}],
    ]
    ours = score(rm, tok, convs, batch_size=3)  # one right-padded batch
    seqs = [tok.encode_chat(c)[0] for c in convs]
    T = max(map(len, seqs))
    ids = torch.full((3, T), info.pad_id, dtype=torch.long)
    att = torch.zeros((3, T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], att[i, : len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=att).logits.squeeze(-1)
    assert torch.allclose(torch.tensor(ours), theirs, atol=1e-5, rtol=1e-5), (ours, theirs)
    # one at a time gives the same scores as the padded batch (padding never leaks in)
    alone = [score(rm, tok, [c])[0] for c in convs]
    assert torch.allclose(torch.tensor(alone), torch.tensor(ours), atol=1e-5)
    # and our loader reads the directory back exactly
    back, _ = load_reward_model(out)
    assert torch.allclose(torch.tensor(score(back, tok, convs)), theirs, atol=1e-5)
    # prompts + completions form is the same as whole conversations
    assert score(out, None, ["What is 2 plus 3?"], ["The answer is 5."])[0] == pytest.approx(
        ours[0], abs=1e-5
    )


def test_load_reward_model_rejects_a_causal_lm(align_base):
    from llmforge.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not a reward model"):
        load_reward_model(align_base["model"])


# ----------------------------------------------------------------------------------------------------
# preference data and bad input
# ----------------------------------------------------------------------------------------------------


def test_preference_rows_render_with_the_chat_template(align_base, tmp_path):
    tok = load_tokenizer(align_base["tok"])
    rows = [
        {"prompt": "What is 1 plus 1?", "chosen": "The answer is 2.", "rejected": "The answer is 3."},
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "What is 2 plus 2?"},
            ],
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
            "margin": 1.5,
        },
    ]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    train, val, stats = tokenize_pairs([f], tok, max_len=96, val_fraction=0.0, seed=0)
    assert stats.kept == 2 and not val and stats.num_skipped == 0
    p = train[0]
    full = tok.encode_chat(
        [
            {"role": "user", "content": "What is 1 plus 1?"},
            {"role": "assistant", "content": "The answer is 2."},
        ]
    )[0]
    assert p.chosen_ids == full
    resp = tok.decode([t for t, m in zip(p.chosen_ids, p.chosen_mask, strict=True) if m])
    assert resp == "The answer is 2.<|im_end|>"
    # the assistant turn inside the prompt is context, not a target
    q = train[1]
    assert tok.decode([t for t, m in zip(q.chosen_ids, q.chosen_mask, strict=True) if m]) == "4<|im_end|>"
    assert q.margin == 1.5


def test_bad_pairs_are_counted_with_the_offending_record(align_base, tmp_path):
    tok = load_tokenizer(align_base["tok"])
    good = {"prompt": "What is 1 plus 1?", "chosen": "The answer is 2.", "rejected": "The answer is 3."}
    rows = [
        good,
        {"prompt": "Same?", "chosen": "yes", "rejected": "yes"},
        {"prompt": "Empty?", "chosen": "  ", "rejected": "no"},
        {"prompt": "Long? " + "word " * 200, "chosen": "a", "rejected": "b"},
        {"prompt": "No turn?", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
    ]
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    stats = PreferenceStats()
    train, _, stats = tokenize_pairs([f], tok, max_len=96, val_fraction=0.0, seed=0, stats=stats)
    assert len(train) == 1 and stats.rows_read == 5
    assert stats.skipped == {"identical": 1, "empty_response": 1, "too_long": 1, "no_response_tokens": 1}
    assert any(e.startswith(f"{f}:2: identical") and '"Same?"' in e for e in stats.examples)
    assert any(f"{f}:4: too_long" in e for e in stats.examples)
    # nothing usable at all: an error that says why, never an empty run
    only_bad = write_jsonl(tmp_path / "allbad.jsonl", rows[1:3])
    with pytest.raises(StageInputError, match=r"no usable training pairs.*identical"):
        tokenize_pairs([only_bad], tok, max_len=96, val_fraction=0.0, seed=0)


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ('{"chosen": "a", "rejected": "b"}', "neither 'prompt' nor 'messages'"),
        ('{"prompt": "p", "chosen": "a"}', "field 'rejected' is missing"),
        ('{"prompt": "p", "chosen": 3, "rejected": "b"}', "'chosen' must be a string or a list"),
        (
            '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}',
            "'margin' must be a finite number",
        ),
        (
            '{"prompt": "p", "chosen": [{"role": "bot", "content": "a"}], "rejected": "b"}',
            "chosen\\[0\\].role",
        ),
        ("not json", "not valid JSON"),
    ],
)
def test_malformed_rows_are_errors_naming_file_and_line(align_base, tmp_path, row, match):
    tok = load_tokenizer(align_base["tok"])
    f = write_jsonl(tmp_path / "m.jsonl", ['{"prompt": "p", "chosen": "a", "rejected": "b"}', row])
    with pytest.raises(StageInputError, match=match) as err:
        tokenize_pairs([f], tok, max_len=96, val_fraction=0.0, seed=0)
    assert f"{f}:2" in str(err.value)


# ----------------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------------


def reward_section(align_base, **kw) -> dict:
    s = {
        "enabled": True,
        "from": str(align_base["model"]),
        "data": [str(align_base["pairs"])],
        "max_steps": 40,
        "batch_size": 8,
        "seq_len": 64,
        "lr": 3e-3,
        "warmup_steps": 2,
        "eval_every": 0,
        "save_every": 0,
        "log_every": 10,
        "val_fraction": 0.2,
    }
    s.update(kw)
    return s


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, align_base):
    ctx = make_ctx(
        tmp_path_factory.mktemp("reward"),
        "reward",
        {"reward": reward_section(align_base)},
        upstream={"tokenizer": {"tokenizer": align_base["tok"]}},
    )
    return ctx, run_reward(ctx)


def test_reward_stage_learns_to_rank_held_out_pairs(reward_run, align_base):
    transformers = pytest.importorskip("transformers")
    ctx, res = reward_run
    m = res.metrics
    assert res.outputs == {"model": ctx.out_dir / "model"}
    assert m["val_pairs"] > 20 and m["skipped_pairs"] == 0 and m["steps"] == 40
    assert m["accuracy_after"] >= 0.8 > m["accuracy_before"] + 0.1, m
    assert m["margin_after"] > 0.5
    labels = dict(res.summary)
    assert "reward.from" in labels["started from"] and "held-out pairs" in labels["val accuracy"]
    assert f"{m['accuracy_before']:.0%} before → {m['accuracy_after']:.0%} after" in labels["val accuracy"]
    assert m["val_pairs_evaluated"] == m["val_pairs"] or "eval_batches caps it" in labels["val accuracy"]
    out = ctx.out_dir / "model"
    assert not (out / "trainer_state.pt").exists() and (out / "tokenizer.json").is_file()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = load_tokenizer(out)
    conv = [
        {"role": "user", "content": "What is 4 plus 4?"},
        {"role": "assistant", "content": "The answer is 8."},
    ]
    ids = torch.tensor([tok.encode_chat(conv)[0]])
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits.squeeze().item()
    assert score(out, None, [conv])[0] == pytest.approx(theirs, abs=1e-4)


def test_score_file_writes_scores(reward_run, tmp_path):
    ctx, _ = reward_run
    f = write_jsonl(
        tmp_path / "s.jsonl",
        [
            {"prompt": "What is 4 plus 4?", "completion": "The answer is 8."},
            {"prompt": "What is 4 plus 4?", "completion": "No idea, sorry."},
            {"prompt": "What is 2 plus 2?", "chosen": "The answer is 4.", "rejected": "I do not know."},
        ],
    )
    res = score_file(ctx, f, tmp_path / "out" / "scores.jsonl")
    rows = [json.loads(x) for x in res.out.read_text().splitlines()]
    assert res.rows == 3 and rows[0]["prompt"] == "What is 4 plus 4?"
    assert rows[0]["score"] > rows[1]["score"]  # the trained model prefers an answer to a refusal
    assert rows[2]["chosen_score"] > rows[2]["rejected_score"]
    bad = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "x"}])
    with pytest.raises(StageInputError, match=r"b.jsonl:1: no response to score"):
        score_file(ctx.out_dir / "model", bad, tmp_path / "o.jsonl")


def test_reward_training_step_changes_every_parameter(align_base):
    """TRL's check: after one step every trainable parameter (backbone and head) has moved."""
    from llmforge.align.preference_data import PairBatches
    from llmforge.align.reward import make_reward_loss
    from llmforge.manifest.align import RewardSection
    from llmforge.train.loop import optimizer_step, setup

    tok = load_tokenizer(align_base["tok"])
    train, _, _ = tokenize_pairs([align_base["pairs"]], tok, max_len=64, val_fraction=0.0, seed=0)
    rm = RewardModel.from_causal_lm(load_pretrained(align_base["untied"], dtype=torch.float32), seed=0)
    cfg = RewardSection(max_steps=2, warmup_steps=0, lr=1e-2, batch_size=8)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        session = setup(rm, cfg, run_dir=d, description="reward")
        before = {n: p.detach().clone() for n, p in rm.named_parameters()}
        data = PairBatches(train, batch_size=8, pad_id=tok.info.pad_id, seed=0)
        optimizer_step(session, lambda: next(data), make_reward_loss(False))
    for n, p in rm.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} did not change"
    assert F is not None


def _reward_step(align_base, train, batch_size: int, grad_accum: int):
    import tempfile

    from llmforge.align.preference_data import PairBatches
    from llmforge.align.reward import make_reward_loss
    from llmforge.manifest.align import RewardSection
    from llmforge.train.loop import optimizer_step, setup

    tok = load_tokenizer(align_base["tok"])
    rm = RewardModel.from_causal_lm(load_pretrained(align_base["untied"], dtype=torch.float32), seed=0)
    # eps ≫ |g| makes Adam's first update lr·g, so the weights compare the gradients themselves
    cfg = RewardSection(
        max_steps=2, warmup_steps=0, lr=1.0, eps=1.0, batch_size=batch_size, grad_accum=grad_accum
    )
    data = PairBatches(train, batch_size=batch_size, pad_id=tok.info.pad_id, seed=0)
    with tempfile.TemporaryDirectory() as d:
        session = setup(rm, cfg, run_dir=d, description="reward")
        st = optimizer_step(session, lambda: next(data), make_reward_loss(True))
    return rm, st


def test_reward_batch_times_accumulation_invariance(align_base):
    """TRL's invariance: 8 pairs x accumulation 1 == 1 pair x accumulation 8 == 2 x 4 (the same update), with
    pairs of different lengths and margins — the loss is a mean over pairs, weighted by pairs."""
    tok = load_tokenizer(align_base["tok"])
    rows = [
        {"prompt": f"What is {i} plus {i % 3}?" + " Please." * (i % 4), "chosen": f"The answer is {i + i % 3}.",
         "rejected": "No idea." if i % 2 else f"The answer is {i + 5}.", "margin": 0.25 * i}
        for i in range(8)
    ]  # fmt: skip
    f = write_jsonl(Path(align_base["tok"]).parent / "inv_pairs.jsonl", rows)
    train, _, _ = tokenize_pairs([f], tok, max_len=64, val_fraction=0.0, seed=0)
    assert len(train) == 8 and len({len(p.chosen_ids) for p in train}) > 1
    a, sa = _reward_step(align_base, train, 8, 1)
    for bs, acc in ((1, 8), (2, 4)):
        b, sb = _reward_step(align_base, train, bs, acc)
        assert sa.loss == pytest.approx(sb.loss, rel=1e-5)
        assert sa.grad_norm == pytest.approx(sb.grad_norm, rel=1e-4)
        assert sa.metrics["accuracy"] == pytest.approx(sb.metrics["accuracy"])
        for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            assert torch.allclose(p, q, atol=2e-6), n
