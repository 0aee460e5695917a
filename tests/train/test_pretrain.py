"""The pretraining loss: llmforge's Llama computes it in its forward (chunked, no logits); other models through
their logits. Both must give the same loss, weight and gradients."""

import torch
from torch import nn

from llmforge.model import Llama, preset_config
from llmforge.train.pretrain import causal_lm_loss

from .helpers import TINY_MODEL, VOCAB


class _LogitsOnly(nn.Module):
    """Hides the Llama class, so ``causal_lm_loss`` takes the generic logits path."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, input_ids):
        return self.inner(input_ids)


class _DDPLike(nn.Module):
    """Exposes the model as ``.module``, as DistributedDataParallel does."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.module = model

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _loss_and_grads(wrapper: nn.Module, model: Llama, batch):
    model.zero_grad(set_to_none=True)
    out = causal_lm_loss(wrapper, batch)
    (out.loss * out.weight).backward()
    return out, {k: p.grad.clone() for k, p in model.named_parameters()}


def test_fused_and_logits_paths_agree():
    fields = {k: v for k, v in TINY_MODEL.items() if k != "preset"}
    torch.manual_seed(0)
    model = Llama(preset_config("tiny", vocab_size=VOCAB, **fields))
    ids = torch.randint(0, VOCAB, (2, 17))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:].clone()}
    batch["labels"][1, :4] = -100
    ref, ref_grads = _loss_and_grads(_LogitsOnly(model), model, batch)
    for wrapper in (model, _DDPLike(model)):
        out, grads = _loss_and_grads(wrapper, model, batch)
        assert int(out.weight) == int(ref.weight) == 32 - 4
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
        for k in grads:
            torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-6, rtol=1e-5, msg=k)
