"""The training core's pieces: weighted metric reduction, frozen models, opt-in spike detection and
trainable-only (adapter) checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

from llmforge.errors import CheckpointError
from llmforge.manifest import Manifest
from llmforge.model import Llama, preset_config
from llmforge.train import dist
from llmforge.train.checkpoint import list_checkpoints
from llmforge.train.data import PackedBatches, ShardIndex
from llmforge.train.loop import Objective, WeightedSums, train
from llmforge.train.metrics import read_metrics
from llmforge.train.pretrain import causal_lm_loss

from .helpers import TINY_MODEL, VOCAB, make_shards, pretrain_section


def _model(seed=0):
    fields = {k: v for k, v in TINY_MODEL.items() if k != "preset"}
    torch.manual_seed(seed)
    return Llama(preset_config("tiny", vocab_size=VOCAB, **fields))


def _cfg(**over):
    base = {"max_steps": 3, "warmup_steps": 0, "log_every": 1, "eval_every": 0, "save_every": 0}
    return Manifest.model_validate({"pretrain": pretrain_section(**{**base, **over})}).pretrain


def metric_loss(model, batch):
    """CE plus two metrics that differ between micro-batches: one weighted by target tokens, one by
    sequences. Only a weighted reduction over every micro-batch (and rank) logs the same values whatever
    the split."""
    out = causal_lm_loss(model, batch)
    labels = batch["labels"]
    valid = labels != -100
    out.metrics = {
        "label_mean": labels[valid].float().mean(),  # per target token: same weight as the loss
        "first_id": (batch["input_ids"][:, 0].float().mean(), labels.shape[0]),  # per sequence
    }
    return out


def _rows(run_dir):
    return [r for r in read_metrics(run_dir) if "loss" in r]


def _train_split(run_dir, shards_root, batch_size, grad_accum, env=None, rank=0, world=1):
    index = ShardIndex.load(shards_root)
    cfg = _cfg(batch_size=batch_size, grad_accum=grad_accum)
    data = PackedBatches(
        index.open("train"), seq_len=cfg.seq_len, batch_size=batch_size, rank=rank, world_size=world, seed=3
    )
    return train(_model(), Objective("m", metric_loss, data), cfg, run_dir=run_dir, seed=1, env=env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, run_dir, shards_root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    env = dist.setup("cpu")
    try:
        _train_split(run_dir, shards_root, 2, 2, env=env, rank=rank, world=world)
    finally:
        dist.cleanup()


def test_metrics_are_reduced_weighted_over_micro_batches_and_ranks(tmp_path):
    shards_root = make_shards(tmp_path / "shards")
    _train_split(tmp_path / "1x8", shards_root, batch_size=8, grad_accum=1)
    _train_split(tmp_path / "8x1", shards_root, batch_size=1, grad_accum=8)
    mp.spawn(_rank_main, args=(2, _free_port(), tmp_path / "2r", shards_root), nprocs=2, join=True)
    a, b, c = _rows(tmp_path / "1x8"), _rows(tmp_path / "8x1"), _rows(tmp_path / "2r")
    assert len(a) == len(b) == len(c) == 3
    for ra, rb, rc in zip(a, b, c, strict=True):
        for key in ("loss", "label_mean", "first_id"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), key
            assert rc[key] == pytest.approx(ra[key], rel=1e-5), key
        assert ra["tokens"] == rb["tokens"] == rc["tokens"]
    # the metrics really vary between micro-batches: the last micro-batch alone would log something else
    index = ShardIndex.load(shards_root)
    data = PackedBatches(index.open("train"), seq_len=32, batch_size=1, seed=3)
    last = [next(data) for _ in range(8)][-1]
    assert last["input_ids"][0, 0].item() != pytest.approx(a[0]["first_id"])


def test_weighted_sums_single_process():
    s = WeightedSums(torch.device("cpu"))
    s.add("x", 1.0, 1)
    s.add("x", torch.tensor(4.0), 3)
    s.add("empty", 5.0, 0)
    s.count("tokens", 7)
    s.count("tokens", torch.tensor(3))
    means, totals = s.reduce()
    assert means == {"empty": None, "x": pytest.approx(13 / 4)}
    assert totals == {"tokens": 10.0}


def test_tokens_come_from_the_loss_when_it_reports_them(tmp_path):
    shards_root = make_shards(tmp_path / "shards")
    index = ShardIndex.load(shards_root)
    cfg = _cfg(batch_size=2)

    def half_tokens(model, batch):
        out = causal_lm_loss(model, batch)
        out.tokens = batch["input_ids"].numel() // 2  # e.g. half the row is padding
        return out

    data = PackedBatches(index.open("train"), seq_len=cfg.seq_len, batch_size=2)
    res = train(_model(), Objective("t", half_tokens, data), cfg, run_dir=tmp_path / "r")
    assert res.tokens_seen == 3 * 2 * cfg.seq_len // 2


def test_frozen_models_are_placed_evaluated_and_kept_out(tmp_path):
    shards_root = make_shards(tmp_path / "shards")
    index = ShardIndex.load(shards_root)
    cfg = _cfg(batch_size=2, save_every=3)
    teacher = _model(seed=7)
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = {}

    def loss(model, batch):
        seen["teacher_training"] = teacher.training
        seen["teacher_grad"] = any(p.requires_grad for p in teacher.parameters())
        with torch.no_grad():
            t = teacher(batch["input_ids"], labels=batch["labels"])
        out = causal_lm_loss(model, batch)
        out.metrics = {"teacher_ce": t}
        return out

    data = PackedBatches(index.open("train"), seq_len=cfg.seq_len, batch_size=2)
    res = train(
        _model(), Objective("kd", loss, data, frozen={"teacher": teacher}), cfg, run_dir=tmp_path / "r"
    )
    assert seen == {"teacher_training": False, "teacher_grad": False}
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert res.trainable_parameters == res.num_parameters  # the teacher is not counted as the model's
    ckpt = list_checkpoints(tmp_path / "r" / "checkpoints")[-1][1]
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    n_student = len([p for p in _model().parameters()])
    assert sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == n_student
    assert "teacher" not in json.dumps(state["config"])


def test_spike_detection_is_opt_in(tmp_path):
    shards_root = make_shards(tmp_path / "shards")
    index = ShardIndex.load(shards_root)
    cfg = _cfg(batch_size=2, max_steps=8)
    hook = lambda s, x: x * 10 if s == 6 else x  # noqa: E731

    def run(name, **kw):
        data = PackedBatches(index.open("train"), seq_len=cfg.seq_len, batch_size=2)
        return train(_model(), Objective("o", causal_lm_loss, data, **kw), cfg, run_dir=tmp_path / name,
                     loss_hook=hook)  # fmt: skip

    assert run("off").skipped_steps == 0  # an objective that did not opt in applies every update
    assert run("on", spike_factor=2.0, spike_warmup_steps=3).skipped_steps == 1


class _AdapterIO:
    """A ModelIO that stores only the trainable weights (what LoRA's adapter IO does)."""

    trainable_only = True

    def save(self, state_dict, directory):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(directory / "adapter.safetensors"))

    def load(self, directory):
        from safetensors.torch import load_file

        return load_file(str(directory / "adapter.safetensors"))


def _freeze_all_but_norms(model):
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("norm.weight"))
    return model


def test_trainable_only_checkpoints_save_and_resume_exactly(tmp_path):
    shards_root = make_shards(tmp_path / "shards")
    index = ShardIndex.load(shards_root)

    def run(name, max_steps, model=None, resume="auto"):
        cfg = _cfg(batch_size=2, max_steps=max_steps, save_every=2, lr=1e-2)
        data = PackedBatches(index.open("train"), seq_len=cfg.seq_len, batch_size=2, seed=4)
        model = model or _freeze_all_but_norms(_model())
        res = train(model, Objective("a", causal_lm_loss, data), cfg, run_dir=tmp_path / name, seed=2,
                    model_io=_AdapterIO(), resume=resume)  # fmt: skip
        return model, res

    full, _ = run("full", 4)
    # an interrupted run: only the step-2 checkpoint of the same configuration exists
    shutil.copytree(tmp_path / "full/checkpoints/step_000002", tmp_path / "part/checkpoints/step_000002")
    resumed, res = run("part", 4)
    assert res.resumed_from is not None and res.resumed_from.name == "step_000002"
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    ckpt = list_checkpoints(tmp_path / "part" / "checkpoints")[-1][1]
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "adapter.safetensors"))
    assert set(saved) == {n for n, p in resumed.named_parameters() if p.requires_grad}
    # strict on the adapter: a checkpoint whose trainable set differs is refused, naming the mismatch
    other = _model()
    for n, p in other.named_parameters():
        p.requires_grad_(n.endswith("input_layernorm.weight"))
    with pytest.raises(CheckpointError, match="adapter weights do not match"):
        run("other", 4, model=other, resume=str(ckpt))
