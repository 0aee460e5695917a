import logging
import math

import pytest
import torch

from llmforge.errors import CheckpointError, TrainingError
from llmforge.manifest import Manifest
from llmforge.model import Llama, preset_config
from llmforge.train.checkpoint import list_checkpoints
from llmforge.train.data import PackedBatches, ShardIndex, eval_batches
from llmforge.train.loop import param_groups, train
from llmforge.train.metrics import read_metrics
from llmforge.train.pretrain import pretrain_objective

from .helpers import TINY_MODEL, VOCAB, make_shards, pretrain_section


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    make_shards(root)
    return ShardIndex.load(root)


def _model(seed=0):
    fields = {k: v for k, v in TINY_MODEL.items() if k != "preset"}
    torch.manual_seed(seed)
    return Llama(preset_config("tiny", vocab_size=VOCAB, **fields))


def _cfg(**over):
    return Manifest.model_validate({"pretrain": pretrain_section(**over)}).pretrain


def _objective(index, cfg, val=True):
    data = PackedBatches(index.open("train"), seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=5)
    vb = eval_batches(index.open("val"), seq_len=cfg.seq_len, batch_size=cfg.batch_size, num_batches=4)
    return pretrain_objective(data, vb if val else None, cfg)


def _run(tmp_path, index, model=None, hook=None, **over):
    cfg = _cfg(**over)
    model = model or _model()
    res = train(model, _objective(index, cfg), cfg, run_dir=tmp_path, seed=1, loss_hook=hook)
    return model, res


def test_loss_decreases_on_a_learnable_pattern(tmp_path, shards):
    _, res = _run(tmp_path, shards, max_steps=60, lr=1e-2, warmup_steps=5, eval_every=30)
    losses = [r["loss"] for r in res.history if "loss" in r]
    assert losses[0] > math.log(VOCAB) - 0.5  # starts near uniform
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]
    assert res.val_loss is not None and res.val_loss < 0.7 * math.log(VOCAB)
    assert res.val_ppl == pytest.approx(math.exp(res.val_loss))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 61))
    assert {"lr", "grad_norm", "tokens", "tok_per_s"} <= set(rows[0])
    assert "mfu" not in rows[0]  # peak FLOPs of a CPU are unknown
    assert [r["step"] for r in rows if "val_loss" in r] == [30, 60]


def test_every_parameter_changes_after_one_step(tmp_path, shards):
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _run(tmp_path, shards, model=model, max_steps=1, warmup_steps=0)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


def test_weight_decay_groups():
    model = _model()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    nd = {names[id(p)] for p in no_decay["params"]}
    assert "model.embed_tokens.weight" in nd  # tied with lm_head: one tensor, no decay
    assert all(n.endswith("norm.weight") or n == "model.embed_tokens.weight" for n in nd)
    assert all(p.ndim == 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_accumulation_invariance(tmp_path, shards):
    # batch 8 x accumulation 1 == batch 1 x accumulation 8: same data, same loss, same weights
    m1, r1 = _run(tmp_path / "a", shards, max_steps=4, batch_size=8, grad_accum=1)
    m2, r2 = _run(tmp_path / "b", shards, max_steps=4, batch_size=1, grad_accum=8)
    l1 = [r["loss"] for r in r1.history if "loss" in r]
    l2 = [r["loss"] for r in r2.history if "loss" in r]
    assert l1 == pytest.approx(l2, rel=1e-5)
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        # Adam normalises each update, so round-off in tiny gradients shows up at ~1e-5 of a weight;
        # one step moves a weight by up to lr = 3e-3
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)
    assert r1.tokens_seen == r2.tokens_seen == 4 * 8 * 16


def _nan_at(*steps):
    def hook(step, loss):
        return loss * float("nan") if step in steps else loss

    return hook


def test_nan_step_is_skipped_and_counted(tmp_path, shards, caplog):
    model = _model()
    snapshots = []

    def hook(step, loss):
        snapshots.append((step, {n: p.detach().clone() for n, p in model.named_parameters()}))
        return loss * float("nan") if step == 2 else loss

    with caplog.at_level(logging.WARNING, logger="llmforge"):
        _, res = _run(tmp_path, shards, model=model, hook=hook, max_steps=5, nan_policy="skip")
    assert res.skipped_steps == 1
    assert "non-finite loss" in caplog.text
    # the update of step 2 (0-based) was skipped: weights at step 3 equal weights at step 2
    w2, w3 = dict(snapshots)[2], dict(snapshots)[3]
    assert all(torch.equal(w2[n], w3[n]) for n in w2)
    assert not all(torch.equal(dict(snapshots)[1][n], w2[n]) for n in w2)
    rows = read_metrics(tmp_path)
    assert rows[2]["loss"] == "nan" and rows[2]["skipped"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert list_checkpoints(tmp_path / "checkpoints")[-1][0] == 5


def test_nan_stop_policy_and_skip_limit(tmp_path, shards):
    with pytest.raises(TrainingError, match="nan_policy: stop"):
        _run(tmp_path / "a", shards, hook=_nan_at(1), nan_policy="stop")
    with pytest.raises(TrainingError, match="max_skipped_steps"):
        _run(tmp_path / "b", shards, hook=_nan_at(1, 2, 3), nan_policy="skip", max_skipped_steps=2)


def test_never_checkpoints_nan_weights(tmp_path, shards):
    model = _model()

    def poison(step, loss):
        if step == 1:  # behind autograd's back, like a corrupted update would
            model.model.norm.weight.data[0] = float("nan")
        return loss

    with pytest.raises(TrainingError, match="refusing to write a checkpoint"):
        _run(tmp_path, shards, model=model, hook=poison, max_steps=6, save_every=3)
    assert list_checkpoints(tmp_path / "checkpoints") == []


def test_keep_last_k(tmp_path, shards):
    _run(tmp_path, shards, max_steps=10, save_every=2, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [8, 10]


def test_resume_auto_and_resume_false(tmp_path, shards):
    _run(tmp_path, shards, max_steps=6, save_every=3)
    # auto with the run complete: nothing left to train
    _, res = _run(tmp_path, shards, max_steps=6, save_every=3)
    assert res.resumed_from.name == "step_000006" and res.tokens_seen == 6 * 4 * 16
    # auto with more steps: continues from step 6
    _, res = _run(tmp_path, shards, max_steps=8, save_every=3)
    assert res.resumed_from.name == "step_000006"
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == list(range(1, 9))
    # false: starts over, old checkpoints and metrics gone
    _, res = _run(tmp_path, shards, max_steps=3, save_every=0, resume="false")
    assert res.resumed_from is None
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [3]
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [1, 2, 3]


def test_resume_warns_when_config_differs(tmp_path, shards, caplog):
    _run(tmp_path, shards, max_steps=4, save_every=2)
    with caplog.at_level(logging.WARNING, logger="llmforge"):
        _run(tmp_path, shards, max_steps=6, save_every=2, lr=1e-3)
    assert "different configuration" in caplog.text and "lr" in caplog.text


def test_resume_from_an_explicit_checkpoint_path(tmp_path, shards):
    m_ref, _ = _run(tmp_path / "ref", shards, max_steps=6, save_every=3)
    m_new, res = _run(
        tmp_path / "new", shards, max_steps=6, resume=str(tmp_path / "ref/checkpoints/step_000003")
    )
    assert res.resumed_from.name == "step_000003"
    assert all(torch.equal(a, b) for a, b in zip(m_ref.parameters(), m_new.parameters(), strict=True))
    with pytest.raises(Exception, match="not a directory"):
        _run(tmp_path / "bad", shards, resume=str(tmp_path / "nowhere"))


def test_loss_spike_is_skipped_then_stop_policy(tmp_path, shards, caplog):
    model = _model()
    snapshots = []

    def spike_at_6(step, loss):
        snapshots.append((step, {n: p.detach().clone() for n, p in model.named_parameters()}))
        return loss * 10 if step == 6 else loss

    with caplog.at_level(logging.WARNING, logger="llmforge"):
        _, res = _run(tmp_path / "a", shards, model=model, hook=spike_at_6, max_steps=8, spike_warmup_steps=3)
    assert res.skipped_steps == 1
    assert "loss spike" in caplog.text and "pretrain.spike_factor" in caplog.text
    w6, w7 = dict(snapshots)[6], dict(snapshots)[7]
    assert all(torch.equal(w6[n], w7[n]) for n in w6)  # the spiking update was not applied
    # a normal run of the same length skips nothing (no false positives while the loss falls fast)
    _, res = _run(tmp_path / "b", shards, max_steps=30, lr=1e-2, warmup_steps=2, spike_warmup_steps=3)
    assert res.skipped_steps == 0
    with pytest.raises(TrainingError, match="loss spike"):
        _run(
            tmp_path / "c",
            shards,
            hook=lambda s, x: x * 10 if s == 6 else x,
            max_steps=8,
            spike_warmup_steps=3,
            nan_policy="stop",
        )
    # off switch
    _, res = _run(
        tmp_path / "d",
        shards,
        hook=lambda s, x: x * 10 if s == 6 else x,
        max_steps=8,
        spike_warmup_steps=3,
        spike_factor=0,
    )
    assert res.skipped_steps == 0


def test_resume_from_a_checkpoint_of_another_shape_is_a_clear_error(tmp_path, shards):
    _run(tmp_path / "a", shards, max_steps=3, save_every=3)
    ckpt = list_checkpoints(tmp_path / "a" / "checkpoints")[-1][1]
    fields = {k: v for k, v in TINY_MODEL.items() if k not in ("preset", "hidden_size", "intermediate_size")}
    wider = Llama(preset_config("tiny", vocab_size=VOCAB, hidden_size=96, intermediate_size=192, **fields))
    with pytest.raises(CheckpointError, match="weights do not fit the model"):
        _run(tmp_path / "b", shards, model=wider, max_steps=3, resume=str(ckpt))
