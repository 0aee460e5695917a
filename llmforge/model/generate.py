"""Batched autoregressive generation with a static KV cache: greedy, temperature, top-k, top-p, seeded.

Shared by SFT evaluation, alignment sampling (GRPO/PPO/rejection sampling) and the local serving engine.
Prompts of different lengths are left-padded and masked, with each sequence's positions starting at 0, so a
batch generates what each prompt would generate alone. Every sequence stops on its own at an EOS id or stop
sequence; the batch ends when all have stopped or ``max_new_tokens`` is reached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from ..errors import ModelError
from .llama import KVCache, Llama

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
    sampling reproducible (a private generator; the global RNG is untouched). eos_token_ids: default the
    model config's EOS ids; pass ``()`` to never stop early. stop: token-id sequences that end a sequence, or a
    callable ``(new_tokens) -> bool`` (e.g. detokenize and look for stop strings). A sequence's stopping EOS
    or stop sequence is included in its output, so callers can tell "finished" from "cut at max_new_tokens".
    """
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
    eos = set(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)

    B = len(prompts)
    lengths = [len(p) for p in prompts]
    P = max(lengths)
    total = P + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ModelError(
            f"longest prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
            f"(max_position_embeddings={cfg.max_position_embeddings}); shorten the prompt or max_new_tokens"
        )

    device = model.lm_head.weight.device
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0  # any valid id: padding is masked
    ids = torch.full((B, P), pad, dtype=torch.long, device=device)
    mask = torch.ones((B, total), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
        mask[i, : P - len(p)] = 0
    ragged = min(lengths) != P  # equal lengths need no mask: the fused causal kernel path
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    was_training = model.training
    model.eval()
    try:
        cache = KVCache.for_model(model, B, total)
        outputs: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        h = model.hidden_states(ids, kv_cache=cache, attention_mask=mask[:, :P] if ragged else None)
        logits = model.lm_head(h[:, -1]).float()
        for step in range(max_new_tokens):
            next_ids = sample_next(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
            for i, t in enumerate(next_ids.tolist()):
                if done[i]:
                    continue
                outputs[i].append(t)
                if t in eos or _stopped(outputs[i], stop):
                    done[i] = True
            if all(done) or step == max_new_tokens - 1:
                break
            S = P + step + 1
            h = model.hidden_states(
                next_ids[:, None], kv_cache=cache, attention_mask=mask[:, :S] if ragged else None
            )
            logits = model.lm_head(h[:, -1]).float()
    finally:
        model.train(was_training)
    return outputs
