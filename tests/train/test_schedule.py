import itertools
import math

import pytest
import torch

from llmforge.manifest import Manifest
from llmforge.train.schedule import build_scheduler, lr_multiplier


def m(step, **kw):
    kw.setdefault("max_steps", 100)
    kw.setdefault("warmup_steps", 10)
    kw.setdefault("min_lr_ratio", 0.1)
    return lr_multiplier(step, **kw)


def test_warmup_is_linear_and_reaches_peak():
    assert m(0) == pytest.approx(0.1)  # the first update already moves
    assert m(4) == pytest.approx(0.5)
    assert m(9) == pytest.approx(1.0)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_first_step_after_warmup_is_peak(schedule):
    assert m(10, schedule=schedule) == pytest.approx(1.0)


def test_cosine_key_steps():
    # decay spans steps 10..99: midpoint 54.5, last step exactly min
    assert m(99, schedule="cosine") == pytest.approx(0.1)
    mid = 10 + (99 - 10) / 2
    assert lr_multiplier(int(mid), max_steps=100, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (54 - 10) / 89))
    )
    vals = [m(s) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(vals))


def test_linear_key_steps():
    assert m(99, schedule="linear") == pytest.approx(0.1)
    assert m(10 + 89 // 2, schedule="linear") == pytest.approx(1 - 0.9 * (44 / 89))


def test_wsd_stable_then_linear_decay():
    # decay_fraction 0.2 of 100 steps: stable through step 79, then linear to min at step 99
    assert m(50, schedule="wsd", decay_fraction=0.2) == 1.0
    assert m(79, schedule="wsd", decay_fraction=0.2) == 1.0
    assert m(89, schedule="wsd", decay_fraction=0.2) == pytest.approx(1 - 0.9 * 10 / 20)
    assert m(99, schedule="wsd", decay_fraction=0.2) == pytest.approx(0.1)


def test_constant_and_no_warmup():
    assert m(99, schedule="constant") == 1.0
    assert lr_multiplier(0, max_steps=10, warmup_steps=0) == 1.0
    assert lr_multiplier(9, max_steps=10, warmup_steps=0) == pytest.approx(0.1)


def test_scheduler_drives_optimizer_lr():
    cfg = Manifest.model_validate({"pretrain": {"max_steps": 20, "warmup_steps": 4, "lr": 1e-3}}).pretrain
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(2.5e-4)
    assert seen[3] == pytest.approx(1e-3)
    assert seen[-1] == pytest.approx(1e-4)
