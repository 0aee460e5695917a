"""Per-request sampling on a batch of logits: penalties, greedy, temperature, top-k, top-p, seeded draws.

Each row of a step's logits belongs to one request with its own ``SamplingParams``; the functions here work on
the whole batch at once but never mix rows, so a request samples the same token whatever shares its step.
Randomness comes from one uniform number per row drawn from that request's own CPU ``torch.Generator``
(seeded from ``SamplingParams.seed``) and turned into a token by inverting the filtered distribution's CDF:
the draw does not depend on the batch, the device or the other requests.

Log-probs are the *raw* model log-probs (``log_softmax`` of the logits before penalties, temperature and
filtering), as OpenAI and vLLM report them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .params import SamplingParams


def apply_penalties(
    logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """OpenAI's penalties: ``logit[j] - c[j] * frequency - (c[j] > 0) * presence``.

    logits [R, V] float32; counts [R, V] = how often each token occurs in the row's generated tokens (the
    prompt does not count, as in OpenAI and vLLM); presence / frequency [R]. Returns new logits.
    """
    return logits - counts * frequency[:, None] - (counts > 0).to(logits.dtype) * presence[:, None]


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside the row's top-k (k <= 0: off) and outside its nucleus (top-p).

    The nucleus is the smallest head of the sorted distribution (after top-k) whose probability reaches
    top_p: a token is dropped when the tokens ranked above it already reach top_p, so the most likely token
    always survives. Ties are ranked by token id (a stable sort), so top_k=1 keeps exactly the argmax.
    """
    V = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    ranks = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, V)[:, None]
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    drop = (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample_from_logits(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row r takes the first token whose cumulative probability exceeds ``u_r``.

    logits [R, V] (already tempered and filtered; -inf = excluded), uniforms [R] in [0, 1). Deterministic
    given the uniforms, and a row's result depends only on that row.
    """
    probs = logits.softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    target = (uniforms.to(cdf.device, cdf.dtype) * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # Rounding can leave the target at the very top of the CDF: take the last token with mass instead.
    last_kept = (probs > 0).to(torch.long).cumsum(-1).argmax(-1)
    return torch.minimum(idx, last_kept)


def draw_uniforms(generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One uniform in [0, 1) per row from the row's own CPU generator (None: the global RNG)."""
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators]).float()


def make_generator(seed: int | None) -> torch.Generator | None:
    """A request's private CPU generator (None when unseeded: draws come from the global torch RNG)."""
    if seed is None:
        return None
    return torch.Generator(device="cpu").manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)


def sample_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    *,
    counts: torch.Tensor | None = None,
    penalized: Sequence[int] = (),
    generators: Sequence[torch.Generator | None] = (),
) -> torch.Tensor:
    """Pick one token per row of ``logits`` [R, V] (float32) following each row's ``SamplingParams``.

    counts: [len(penalized), V] generated-token counts of the rows listed in ``penalized`` (rows whose
    params set a penalty). generators: one per row (only sampled rows draw from theirs).
    """
    R = logits.shape[0]
    dev = logits.device
    if counts is not None and penalized:
        pen = torch.tensor(list(penalized), device=dev)
        presence = torch.tensor([params[i].presence_penalty for i in penalized], device=dev)
        frequency = torch.tensor([params[i].frequency_penalty for i in penalized], device=dev)
        logits = logits.clone()
        logits[pen] = apply_penalties(logits[pen], counts, presence, frequency)
    out = logits.argmax(dim=-1)
    sampled = [i for i in range(R) if not params[i].greedy]
    if not sampled:
        return out
    rows = torch.tensor(sampled, device=dev)
    temps = torch.tensor([params[i].temperature for i in sampled], device=dev, dtype=logits.dtype)
    x = logits[rows] / temps[:, None]
    top_k = [params[i].top_k for i in sampled]
    top_p = [params[i].top_p for i in sampled]
    if any(k > 0 for k in top_k) or any(p < 1 for p in top_p):
        x = filter_top_k_top_p(
            x,
            torch.tensor(top_k, device=dev),
            torch.tensor(top_p, device=dev, dtype=logits.dtype),
        )
    uniforms = draw_uniforms([generators[i] if generators else None for i in sampled])
    out[rows] = sample_from_logits(x, uniforms)
    return out


def raw_logprobs(
    logits: torch.Tensor, chosen: torch.Tensor, k: int
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Raw log-probs of the chosen tokens and each row's ``k`` most likely (id, logprob) alternatives."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen_lp = lp.gather(-1, chosen[:, None]).squeeze(-1).tolist()
    if k <= 0:
        return chosen_lp, [[] for _ in chosen_lp]
    vals, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
    tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), vals.tolist(), strict=True)]
    return chosen_lp, tops
