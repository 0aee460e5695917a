"""The pretraining objective: next-token cross-entropy on packed token windows.

    L = -(1/N) Σ_t log p_θ(x_{t+1} | x_{≤t})     over the N target positions whose label is not -100

The loss function is model-agnostic: llmforge's ``Llama`` (bare, compiled, or wrapped in DDP/FSDP) computes
it inside its forward (``model(input_ids, labels=labels)``: chunked output projection + cross-entropy, no
[B, T, vocab] logits in memory); any other model returns logits or an object with ``.logits``
(``transformers``) and the loss is taken on them, so the benchmark can run both through the same loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.llama import IGNORE_INDEX, Llama
from .loop import BatchSource, LossOutput, Objective


def _computes_own_loss(model: nn.Module) -> bool:
    """True for an llmforge ``Llama``, also under DDP (``.module``); FSDP2 and ``compile()`` keep the class."""
    return isinstance(getattr(model, "module", model), Llama)


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
    """Mean next-token cross-entropy; ``batch["labels"]`` are the inputs shifted by one (-100 = ignored).

    The mean divides by ``max(N, 1)`` so a micro-batch with no target gives 0 instead of NaN; its weight is
    0, so it does not count in the step's token-normalised loss.
    """
    labels = batch["labels"]
    n = (labels != IGNORE_INDEX).sum()
    tokens = batch["input_ids"].numel()  # packed windows: every input token is real
    if _computes_own_loss(model):
        return LossOutput(loss=model(batch["input_ids"], labels=labels), weight=n, tokens=tokens)
    out = model(batch["input_ids"])
    logits = getattr(out, "logits", out)
    # fp32 softmax: bf16 log-probabilities over a large vocabulary lose the small differences that matter
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return LossOutput(loss=loss_sum / n.clamp(min=1), weight=n, tokens=tokens)


def pretrain_objective(train_data: BatchSource, val_batches: list | None, cfg) -> Objective:
    """The pretraining objective; it opts into loss-spike detection (``cfg.spike_factor``), which suits the
    smooth loss curve of next-token prediction on shuffled web text."""
    return Objective(
        "pretrain",
        causal_lm_loss,
        train_data,
        val_data=(lambda: val_batches) if val_batches else None,
        spike_factor=cfg.spike_factor,
        spike_warmup_steps=cfg.spike_warmup_steps,
    )
