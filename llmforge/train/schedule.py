"""Learning-rate schedules: linear warmup, then cosine / linear / warmup-stable-decay (WSD) / constant.

``lr_multiplier(step, ...)`` is a pure function of the optimizer step (0-based: the multiplier applied to the
update made *at* that step), so it is trivially resumable and testable at key steps:

* warmup (``step < warmup``): ``(step + 1) / warmup`` — the first update already moves (a zero LR would
  waste a step and make "every parameter changes after one step" false), the last warmup step hits the peak;
* ``cosine``: ``min + (1 - min) * (1 + cos(pi * p)) / 2`` with ``p`` going 0 → 1 from the first step after
  warmup to the *last* step, so the final update uses exactly ``min_lr_ratio`` (nanoGPT/litgpt convention);
* ``linear``: ``1 - (1 - min) * p`` over the same span;
* ``wsd`` (warmup-stable-decay, Hu et al. 2024 "MiniCPM"): the peak until the last ``decay_fraction`` of
  all steps, then linear decay to ``min`` at the last step — checkpoints taken during the stable phase are
  good starting points for continued training;
* ``constant``: the peak after warmup.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Schedule = Literal["cosine", "linear", "wsd", "constant"]


def lr_multiplier(
    step: int,
    *,
    max_steps: int,
    warmup_steps: int = 0,
    schedule: Schedule = "cosine",
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
) -> float:
    """Factor (of the peak LR) for optimizer step ``step`` (0-based). See the module docstring."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    last = max_steps - 1
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * max_steps))
        start = max(warmup_steps, last - decay_steps)
    else:
        start = warmup_steps
    if step <= start or last <= start:
        # `last <= start`: no room to decay (e.g. warmup ends on the last step)
        return 1.0 if step <= start else min_lr_ratio
    p = min(1.0, (step - start) / (last - start))
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    # linear, and the decay phase of wsd
    return 1.0 - (1.0 - min_lr_ratio) * p


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` driven by ``lr_multiplier`` with the knobs of a ``TrainSection``-like ``cfg``.

    The scheduler is stepped once per optimizer step (skipped steps included), so after ``k`` steps the
    optimizer holds the LR for step ``k``; its state (``last_epoch``) goes into ``trainer_state.pt``.
    """

    def fn(step: int) -> float:
        return lr_multiplier(
            step,
            max_steps=cfg.max_steps,
            warmup_steps=cfg.warmup_steps,
            schedule=cfg.schedule,
            min_lr_ratio=cfg.min_lr_ratio,
            decay_fraction=cfg.decay_fraction,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
