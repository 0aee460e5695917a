"""Perplexity and size on disk: the two numbers a quantized model is judged by.

Every model (original, GPTQ, RTN) is scored by the same function on the same held-out windows in float32, the
quantized ones after dequantize-on-load (``load.py``), so differences are the quantization's alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin")


@torch.no_grad()
def perplexity(
    model, windows: list[np.ndarray], max_logits: int = 2**25, masks: list[np.ndarray] | None = None
) -> float:
    """``exp`` of the mean next-token cross-entropy over every target token of ``windows``.

    masks: per window, which targets (``window[1:]``) count — e.g. only the assistant's tokens of rendered
    conversations; default every target. Windows are batched so one batch's logits hold at most
    ``max_logits`` floats (128 MiB in float32).
    """
    total, count = 0.0, 0
    device = next(model.parameters()).device
    longest = max((len(w) for w in windows), default=1)
    batch_size = max(1, max_logits // (longest * model.config.vocab_size))
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        width = min(len(w) for w in chunk)
        batch = torch.as_tensor(np.stack([w[:width] for w in chunk]), device=device)
        targets = batch[:, 1:].clone()
        if masks is not None:
            keep = torch.as_tensor(
                np.stack([m[: width - 1] for m in masks[i : i + batch_size]]), device=device
            )
            targets[~keep] = -100
        logits = model(batch[:, :-1]).float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum", ignore_index=-100
        )
        total += float(loss)
        count += int((targets != -100).sum())
    return math.exp(total / max(count, 1))


def weights_bytes(directory: Path) -> int:
    """Bytes of the weight files of a checkpoint directory (what a server downloads and maps)."""
    return sum(
        f.stat().st_size for f in Path(directory).iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES
    )
