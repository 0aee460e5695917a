"""Batched generation in one call: a thin wrapper over the inference engine (``llmforge.infer``).

``generate(model, prompts, n)`` runs every prompt through ``llmforge.infer.Engine`` (per-sequence KV slots,
no padding, continuous batching) and returns the new tokens. Each prompt generates what it would generate
alone. Callers that want streaming, text, stop strings, penalties or logprobs use the engine directly.
``sample_next`` is the old single-distribution sampler, kept for callers that sample from logits they
computed themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from ..errors import ModelError
from .llama import Llama

StopCriterion = Sequence[Sequence[int]] | Callable[[list[int]], bool]


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V]: argmax at temperature 0, else sample.

    Sampling divides by ``temperature``, keeps the ``top_k`` most likely tokens, then the smallest set whose
    probability reaches ``top_p`` (nucleus sampling; the most likely token always survives).
    """
    if temperature < 0:
        raise ModelError(f"temperature must be >= 0 (got {temperature})")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k <= 0:
            raise ModelError(f"top_k must be >= 1 (got {top_k})")
        if top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ModelError(f"top_p must be in (0, 1] (got {top_p})")
        if top_p < 1:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # Drop a token when the tokens ranked above it already reach top_p.
            drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _as_prompt_lists(
    input_ids: torch.Tensor | Sequence[Sequence[int]], attention_mask: torch.Tensor | None
) -> list[list[int]]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ModelError(f"input_ids must be [batch, tokens] (got shape {list(input_ids.shape)})")
        if attention_mask is None:
            return [row.tolist() for row in input_ids]
        if attention_mask.shape != input_ids.shape:
            raise ModelError("attention_mask must have the shape of input_ids")
        return [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask, strict=True)]
    if attention_mask is not None:
        raise ModelError("attention_mask is only meaningful with a tensor of input_ids")
    return [list(map(int, p)) for p in input_ids]


def _stopped(tokens: list[int], stop: StopCriterion | None) -> bool:
    if stop is None:
        return False
    if callable(stop):
        return bool(stop(tokens))
    return any(len(s) > 0 and len(tokens) >= len(s) and tokens[-len(s) :] == list(s) for s in stop)


@torch.no_grad()
def generate(
    model: Llama,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_ids: Iterable[int] | None = None,
    stop: StopCriterion | None = None,
    attention_mask: torch.Tensor | None = None,
) -> list[list[int]]:
    """Continue each prompt; return only the new tokens, one list per prompt.

    input_ids: a list of token-id lists (any lengths), or a LongTensor [B, T] (with ``attention_mask`` [B, T]
    marking real tokens when it is padded, on either side). temperature 0 is greedy decoding. seed makes
    sampling reproducible: prompt ``i`` samples from its own generator seeded ``seed + i`` (the global RNG is
    untouched), so its output does not depend on the other prompts; without a seed draws come from the
    global torch RNG. eos_token_ids: default the model config's EOS ids; pass ``()`` to never stop early.
    stop: token-id sequences that end a sequence, or a callable ``(new_tokens) -> bool``. A sequence's
    stopping EOS or stop sequence is included in its output, so callers can tell "finished" from "cut at
    max_new_tokens".
    """
    from ..infer.engine import Engine, Request
    from ..infer.params import SamplingParams

    prompts = _as_prompt_lists(input_ids, attention_mask)
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ModelError("every prompt needs at least one token (e.g. the BOS id)")
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    cfg = model.config
    vocab = cfg.vocab_size
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ModelError(f"prompt {i}: token id {bad[0]} is outside the model's vocabulary [0, {vocab})")
    if temperature < 0:
        raise ModelError(f"temperature must be >= 0 (got {temperature})")
    if top_k is not None and top_k <= 0:
        raise ModelError(f"top_k must be >= 1 (got {top_k})")
    if top_p is not None and not 0 < top_p <= 1:
        raise ModelError(f"top_p must be in (0, 1] (got {top_p})")
    P = max(len(p) for p in prompts)
    total = P + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ModelError(
            f"longest prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
            f"(max_position_embeddings={cfg.max_position_embeddings}); shorten the prompt or max_new_tokens"
        )
    eos = list(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
    criterion = None
    if stop is not None:
        criterion = stop if callable(stop) else (lambda toks: _stopped(toks, stop))

    was_training = model.training
    model.eval()
    try:
        engine = Engine(
            model,
            max_batch=min(len(prompts), 256),
            max_model_len=total,
            max_queue=len(prompts),
            eos_token_ids=eos,
        )
        requests = [
            Request(
                str(i),
                p,
                SamplingParams(
                    max_tokens=max_new_tokens,
                    temperature=float(temperature),
                    top_k=top_k or 0,
                    top_p=1.0 if top_p is None else float(top_p),
                    seed=None if seed is None else seed + i,
                ),
                stop_criterion=criterion,
            )
            for i, p in enumerate(prompts)
        ]
        return [out.token_ids for out in engine.run(requests)]
    finally:
        model.train(was_training)
