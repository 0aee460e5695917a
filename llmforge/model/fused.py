"""Fused output projection + loss kernels: what training needs from the head without [tokens, vocab] logits.

Every function here takes the final-norm hidden states ``h`` [N, hidden] and the output head ``weight``
[vocab, hidden] instead of logits, and works a chunk of rows at a time: the chunk's logits, an fp32
log-softmax, the quantity asked for and (when gradients are needed) its logit gradient multiplied straight
into the gradients of ``h`` and ``weight``, then dropped. Peak extra memory is a few chunks of logits instead
of several fp32 copies of [N, vocab], and the logits are never re-read by separate softmax / loss / backward
kernels. The matmuls run in the autocast dtype when autocast is on (as ``lm_head`` would); softmaxes and
sums are always fp32 (bf16 log-probabilities over a large vocabulary lose the differences that matter).

* ``linear_cross_entropy`` — Σ next-token CE (pretraining, SFT). Both gradients are formed in the forward
  pass (the loss is a scalar, so the backward only scales them).
* ``linear_token_logprobs`` — per-token log p(label) [N] (DPO, PPO, GRPO, reward scoring). The upstream
  gradient differs per token, so the backward recomputes each chunk's logits from the saved ``h``.
* ``linear_kd_loss`` — Σ teacher–student divergence (forward KL, reverse KL, generalised JSD) at a
  temperature, with the teacher's logits computed chunk by chunk from its hidden states or read from saved
  top-k log-probs; ``kd_divergence`` is the plain full-logits reference it is tested against.

Labels are aligned (``labels[i]`` is the target of row ``i``); ``IGNORE_INDEX`` (-100) rows count nothing and
get zero gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from ..errors import ModelError

IGNORE_INDEX = -100
_CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MiB in fp32): big enough for efficient matmuls

KDKind = Literal["forward_kl", "reverse_kl", "jsd"]
KD_KINDS: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")


def _chunk_rows(vocab: int) -> int:
    return max(256, _CHUNK_ELEMENTS // vocab)


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype the head matmul would run in: autocast's when it is on, else the activations'."""
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return h.dtype


def _grad_w_buffer(weight: torch.Tensor) -> torch.Tensor:
    # summed over chunks in fp32 even for a bf16 weight, then rounded once (as a single matmul would)
    return torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))


def _add_grad_w(grad_w: torch.Tensor, g: torch.Tensor, hc: torch.Tensor) -> None:
    """grad_w += g.T @ hc, accumulated in grad_w's (fp32) dtype."""
    if grad_w.dtype == g.dtype:
        grad_w.addmm_(g.t(), hc)
    else:  # bf16 products summed in fp32
        grad_w += torch.mm(g.t(), hc)


# ------------------------------------------------------------------------------------------------------
# Cross-entropy
# ------------------------------------------------------------------------------------------------------


def _ce_chunk(
    h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, want_grad: bool
):
    """Σ CE and, if ``want_grad``, d(Σ CE)/d logits = softmax - onehot (rows of ignored targets included;
    the caller zeroes them on the small side of the matmuls)."""
    # fp32 log-softmax whatever the matmul dtype (what F.cross_entropy(logits.float()) does)
    logp = torch.log_softmax(torch.mm(h, weight.t()).float(), dim=-1)
    t = target[:, None]
    loss = -(logp.gather(1, t).squeeze(1) * valid).sum()
    if not want_grad:
        return loss, None
    grad = logp.exp_()  # in place: the log-probabilities are not needed any more
    grad.scatter_add_(1, t, torch.full_like(t, -1, dtype=grad.dtype))
    return loss, grad


def _linear_ce(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    compute_dtype: torch.dtype,
    need_h: bool,
    need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(Σ CE, d/dh, d/dweight) a chunk of rows at a time; h [N, hidden], weight [vocab, hidden], labels [N]."""
    w = weight.to(compute_dtype)
    valid = labels != IGNORE_INDEX
    target = labels.masked_fill(~valid, 0)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = _grad_w_buffer(weight) if need_w else None
    rows = _chunk_rows(weight.shape[0])
    for s in range(0, h.shape[0], rows):
        e = min(s + rows, h.shape[0])
        hc, m = h[s:e].to(compute_dtype), valid[s:e]
        loss_c, g = _ce_chunk(hc, w, target[s:e], m, need_h or need_w)
        loss += loss_c
        if g is None:
            continue
        g = g.to(compute_dtype)
        m = m[:, None].to(compute_dtype)
        if grad_h is not None:
            grad_h[s:e] = torch.mm(g, w) * m
        if grad_w is not None:  # ignored rows contribute nothing: zero them in h, [rows, hidden], not in g
            _add_grad_w(grad_w, g, hc * m)
    return loss, grad_h, None if grad_w is None else grad_w.to(weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """``_linear_ce`` as an autograd node: both gradients are formed in the forward pass, while the logits
    chunk is at hand, and the backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, h, weight, labels, compute_dtype):
        loss, grad_h, grad_w = _linear_ce(
            h, weight, labels, compute_dtype, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(grad_h, grad_w)
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # scaled in place: the buffers belong to this node alone, so it can be backpropagated through once
        if ctx.used:
            raise RuntimeError("linear_cross_entropy: backward through the same loss twice is not supported")
        ctx.used = True
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h.mul_(grad_loss) if grad_h is not None else None,
            grad_w.mul_(grad_loss) if grad_w is not None else None,
            None,
            None,
        )


def _wants_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(F.linear(h, weight).float(), labels, ignore_index=-100, reduction="sum")`` without
    the full logits.

    h: [..., hidden] (the final-norm hidden states), weight: [vocab, hidden] (the output head), labels: [...].
    Returns a float32 scalar. Both gradients are formed in the forward pass while each logits chunk is at
    hand (``softmax - onehot`` multiplied into d/dh and d/dweight), so the backward is two scalings; the
    loss can therefore be backpropagated through once.
    """
    h = h.reshape(-1, h.shape[-1])
    labels = labels.reshape(-1)
    compute_dtype = _compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        if not _wants_grad(h, weight):
            return _linear_ce(h, weight, labels, compute_dtype, need_h=False, need_w=False)[0]  # evaluation
        return _LinearCrossEntropy.apply(h, weight, labels, compute_dtype)


# ------------------------------------------------------------------------------------------------------
# Per-token log-probabilities
# ------------------------------------------------------------------------------------------------------


def _token_logprobs(
    h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, compute_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) [N], logsumexp [N]) in fp32, 0 at invalid rows; ``w`` already in ``compute_dtype``."""
    n = h.shape[0]
    logp = torch.empty(n, dtype=torch.float32, device=h.device)
    lse = torch.empty(n, dtype=torch.float32, device=h.device)
    rows = _chunk_rows(w.shape[0])
    for s in range(0, n, rows):
        e = min(s + rows, n)
        z = torch.mm(h[s:e].to(compute_dtype), w.t()).float()
        lse[s:e] = torch.logsumexp(z, dim=-1)
        logp[s:e] = z.gather(1, target[s:e, None]).squeeze(1) - lse[s:e]
    return logp.masked_fill_(~valid, 0.0), lse


class _LinearTokenLogprobs(torch.autograd.Function):
    """Forward keeps only ``h``, ``weight`` and the per-row logsumexp; the backward recomputes each chunk's
    logits and applies d log p_y / d z = onehot(y) - softmax(z), scaled by that row's incoming gradient."""

    @staticmethod
    def forward(ctx, h, weight, target, valid, compute_dtype):
        logp, lse = _token_logprobs(h, weight.to(compute_dtype), target, valid, compute_dtype)
        ctx.save_for_backward(h, weight, target, valid, lse)
        ctx.compute_dtype = compute_dtype
        return logp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        h, weight, target, valid, lse = ctx.saved_tensors
        cd = ctx.compute_dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(cd)
        g = grad_out.float() * valid  # ignored rows: no gradient whatever comes in
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = _grad_w_buffer(weight) if need_w else None
        rows = _chunk_rows(weight.shape[0])
        for s in range(0, h.shape[0], rows):
            e = min(s + rows, h.shape[0])
            hc = h[s:e].to(cd)
            gc = g[s:e, None]
            dz = torch.mm(hc, w.t()).float().sub_(lse[s:e, None]).exp_().mul_(-gc)  # -g · softmax
            dz.scatter_add_(1, target[s:e, None], gc)  # + g · onehot
            dz = dz.to(cd)
            if grad_h is not None:
                grad_h[s:e] = torch.mm(dz, w)
            if grad_w is not None:
                _add_grad_w(grad_w, dz, hc)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def linear_token_logprobs(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token ``log_softmax(F.linear(h, weight).float())[label]`` without the full logits.

    h: [..., hidden], weight: [vocab, hidden], labels: [...] (-100 = ignored). Returns float32 [...], 0 at
    ignored positions, differentiable w.r.t. ``h`` and ``weight`` (any upstream gradient per token, as DPO,
    PPO and GRPO apply): the backward recomputes each chunk's logits (one extra head matmul) rather than
    keeping [N, vocab] probabilities alive between forward and backward.
    """
    shape = labels.shape
    h = h.reshape(-1, h.shape[-1])
    labels = labels.reshape(-1)
    valid = labels != IGNORE_INDEX
    target = labels.masked_fill(~valid, 0)
    compute_dtype = _compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        if not _wants_grad(h, weight):
            out = _token_logprobs(h, weight.to(compute_dtype), target, valid, compute_dtype)[0]
        else:
            out = _LinearTokenLogprobs.apply(h, weight, target, valid, compute_dtype)
    return out.view(shape)


# ------------------------------------------------------------------------------------------------------
# Knowledge distillation: teacher–student divergences
# ------------------------------------------------------------------------------------------------------


def _check_kd_args(kind: str, temperature: float, jsd_beta: float) -> None:
    if kind not in KD_KINDS:
        raise ModelError(f"unknown distillation divergence {kind!r}; use one of {', '.join(KD_KINDS)}")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ModelError(f"distillation temperature must be a positive number, got {temperature}")
    if not 0.0 <= jsd_beta <= 1.0:
        raise ModelError(f"jsd_beta must lie in [0, 1], got {jsd_beta}")


def _effective_kind(kind: str, jsd_beta: float) -> str:
    """TRL's convention: JSD with beta 0 is the forward KL and with beta 1 the reverse KL (the formula itself
    goes to 0 at both ends; these are its limits divided by beta and by 1 - beta)."""
    if kind == "jsd" and jsd_beta == 0.0:
        return "forward_kl"
    if kind == "jsd" and jsd_beta == 1.0:
        return "reverse_kl"
    return kind


def kd_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: KDKind = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """Reference T²·D(teacher, student) per position on full logits [..., V] → float32 [...].

    With ``p = softmax(teacher_logits / T)`` and ``q = softmax(student_logits / T)``:

    * ``forward_kl``: KL(p ‖ q) = Σ_v p_v (log p_v - log q_v)  (mean-seeking; Hinton et al. 2015)
    * ``reverse_kl``: KL(q ‖ p) = Σ_v q_v (log q_v - log p_v)  (mode-seeking; MiniLLM, Gu et al. 2024)
    * ``jsd``: the generalised JSD of GKD (Agarwal et al. 2024, eq. 1) in TRL's ``generalized_jsd_loss``
      convention: m = β p + (1-β) q, JSD_β = β KL(p ‖ m) + (1-β) KL(q ‖ m); β = 0 is taken as the forward KL
      and β = 1 as the reverse KL, as TRL does.

    The result is multiplied by T² (Hinton et al.) so the gradient's size does not shrink as 1/T². Equals
    TRL's ``generalized_jsd_loss(..., reduction="none").sum(-1) * T²`` on the same logits. Plain autograd
    operations on the whole tensors: for tests and small inputs, not for training.
    """
    _check_kd_args(kind, temperature, jsd_beta)
    kind = _effective_kind(kind, jsd_beta)
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        d = (t.exp() * (t - s)).sum(-1)
    elif kind == "reverse_kl":
        d = (s.exp() * (s - t)).sum(-1)
    else:
        m = torch.logsumexp(torch.stack([t + math.log(jsd_beta), s + math.log1p(-jsd_beta)]), dim=0)
        d = jsd_beta * (t.exp() * (t - m)).sum(-1) + (1 - jsd_beta) * (s.exp() * (s - m)).sum(-1)
    return d * temperature**2


def kd_divergence_topk(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    *,
    kind: KDKind = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """Reference top-k divergence per position: the full divergence restricted to the teacher's top-k set S.

    Both distributions are renormalised over S: p̃ = softmax(topk_logprobs / T) (the teacher's tempered
    distribution conditioned on S, exact at any T from log-probs saved at T = 1, since log-probs differ from
    logits by a per-row constant) and q̃ = softmax(student_logits[S] / T); the result is
    ``kd_divergence`` of those, i.e. ``kd_divergence(student_logits.gather(-1, topk_ids), topk_logprobs)``.
    It is finite for all three divergences (reverse KL against a teacher that is zero outside S would be
    infinite) and equals the full-vocabulary divergence when S is the whole vocabulary. What it does not do is
    push down the student's mass outside S: the CE term (α < 1) or a larger k does that.
    """
    return kd_divergence(
        student_logits.gather(-1, topk_ids),
        topk_logprobs,
        kind=kind,
        temperature=temperature,
        jsd_beta=jsd_beta,
    )


def _kd_rows(
    us: torch.Tensor, ut: torch.Tensor, kind: str, beta: float, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row D(teacher, student) of tempered logits ``us``/``ut`` [n, K] (fp32) and dD/d us.

    Gradients w.r.t. the student's tempered logits u (q = softmax(u)), from dq_j/du_k = q_j (δ_jk - q_k):
    forward KL: q - p; reverse KL: q ⊙ (a - Σ q a) with a = log q - log p; JSD_β: the same form with
    a = (1-β)(log q - log m) (the p/m terms of dJSD/dq cancel).
    """
    s = torch.log_softmax(us, dim=-1)
    t = torch.log_softmax(ut, dim=-1)
    q = s.exp()
    if kind == "forward_kl":
        p = t.exp()
        d = (p * (t - s)).sum(-1)
        return d, (q - p) if want_grad else None
    if kind == "reverse_kl":
        a = s - t
        d = (q * a).sum(-1)
        return d, q * (a - d[:, None]) if want_grad else None
    m = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))
    d = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (q * (s - m)).sum(-1)
    if not want_grad:
        return d, None
    a = (1 - beta) * (s - m)
    return d, q * (a - (q * a).sum(-1, keepdim=True))


class _Teacher(NamedTuple):
    """Where the teacher's next-token distribution comes from: hidden states @ head, or saved top-k."""

    hidden: torch.Tensor | None  # [N, H_t]
    weight: torch.Tensor | None  # [V, H_t]
    topk_ids: torch.Tensor | None  # [N, k] int64
    topk_logprobs: torch.Tensor | None  # [N, k] fp32
    compute_dtype: torch.dtype  # of the teacher's head matmul: autocast's, else the teacher's own


def _linear_kd(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    teacher: _Teacher,
    kind: str,
    temperature: float,
    beta: float,
    compute_dtype: torch.dtype,
    need_h: bool,
    need_w: bool,
    ce_grad: bool,
):
    """Σ T²·D and Σ CE over valid rows with their gradients w.r.t. h and weight, a chunk at a time.

    Returns (kd_sum, ce_sum, kd_grad_h, kd_grad_w, ce_grad_h, ce_grad_w); CE gradients only if ``ce_grad``.
    """
    T = temperature
    w = weight.to(compute_dtype)
    valid = labels != IGNORE_INDEX
    target = labels.masked_fill(~valid, 0)
    n = h.shape[0]
    kd = torch.zeros((), dtype=torch.float32, device=h.device)
    ce = torch.zeros((), dtype=torch.float32, device=h.device)
    want = need_h or need_w
    g_kd_h = torch.empty_like(h) if need_h else None
    g_kd_w = _grad_w_buffer(weight) if need_w else None
    g_ce_h = torch.empty_like(h) if need_h and ce_grad else None
    g_ce_w = _grad_w_buffer(weight) if need_w and ce_grad else None
    if teacher.hidden is not None:
        t_dtype = teacher.compute_dtype
        t_w = teacher.weight.to(t_dtype)
    rows = _chunk_rows(weight.shape[0])
    for s in range(0, n, rows):
        e = min(s + rows, n)
        hc, m = h[s:e].to(compute_dtype), valid[s:e]
        mf = m.float()
        z = torch.mm(hc, w.t()).float()  # [n, V]
        # CE at T = 1 from the same logits chunk
        logp = torch.log_softmax(z, dim=-1)
        ce += -(logp.gather(1, target[s:e, None]).squeeze(1) * mf).sum()
        if teacher.hidden is not None:
            zt = torch.mm(teacher.hidden[s:e].to(t_dtype), t_w.t()).float()
            d, gu = _kd_rows(z / T, zt / T, kind, beta, want)
        else:
            ids = teacher.topk_ids[s:e]
            d, gk = _kd_rows(z.gather(1, ids) / T, teacher.topk_logprobs[s:e] / T, kind, beta, want)
            gu = None
            if gk is not None:
                gu = torch.zeros_like(z).scatter_add_(1, ids, gk)
        kd += (d * mf).sum() * (T * T)
        if not want:
            continue
        mc = m[:, None].to(compute_dtype)
        # d(T² D)/dz = T² · (dD/du) / T
        g = gu.mul_(T).to(compute_dtype)
        if g_kd_h is not None:
            g_kd_h[s:e] = torch.mm(g, w) * mc
        if g_kd_w is not None:
            _add_grad_w(g_kd_w, g, hc * mc)
        if ce_grad:
            gce = logp.exp_()
            t = target[s:e, None]
            gce.scatter_add_(1, t, torch.full_like(t, -1, dtype=gce.dtype))
            gce = gce.to(compute_dtype)
            if g_ce_h is not None:
                g_ce_h[s:e] = torch.mm(gce, w) * mc
            if g_ce_w is not None:
                _add_grad_w(g_ce_w, gce, hc * mc)

    def cast(g):
        return None if g is None else g.to(weight.dtype)

    return kd, ce, g_kd_h, cast(g_kd_w), g_ce_h, cast(g_ce_w)


class _LinearKD(torch.autograd.Function):
    """``_linear_kd`` as an autograd node with two outputs (Σ KD, Σ CE); like the CE node, gradients are
    formed in the forward pass and the backward combines them with the two incoming scalars."""

    @staticmethod
    def forward(ctx, h, weight, labels, teacher, kind, temperature, beta, compute_dtype, ce_grad):
        kd, ce, gkh, gkw, gch, gcw = _linear_kd(
            h,
            weight,
            labels,
            teacher,
            kind,
            temperature,
            beta,
            compute_dtype,
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            ce_grad,
        )
        ctx.save_for_backward(gkh, gkw, gch, gcw)
        ctx.used = False
        if not ce_grad:
            ctx.mark_non_differentiable(ce)
        return kd, ce

    @staticmethod
    def backward(ctx, g_kd, g_ce):
        if ctx.used:
            raise RuntimeError("linear_kd_loss: backward through the same loss twice is not supported")
        ctx.used = True
        gkh, gkw, gch, gcw = ctx.saved_tensors

        def combine(gk, gc):
            if gk is None:
                return None
            gk.mul_(g_kd)  # in place: the buffers belong to this node alone
            if gc is not None:
                gk.add_(gc.mul_(g_ce))
            return gk

        return combine(gkh, gch), combine(gkw, gcw), None, None, None, None, None, None, None


def _kd_teacher(
    n: int,
    vocab: int,
    labels: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
) -> _Teacher:
    """Validate and flatten the teacher inputs (detached: the gradient is the student's only)."""
    on_the_fly = teacher_hidden is not None or teacher_weight is not None
    saved = topk_ids is not None or topk_logprobs is not None
    if on_the_fly == saved:
        raise ModelError(
            "distillation needs exactly one teacher source: teacher_hidden + teacher_weight (logits on the "
            "fly) or topk_ids + topk_logprobs (saved top-k)"
        )
    if on_the_fly:
        if teacher_hidden is None or teacher_weight is None:
            raise ModelError("teacher_hidden and teacher_weight must be given together")
        th = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
        tw = teacher_weight.detach()
        if th.shape[0] != n:
            raise ModelError(f"teacher_hidden has {th.shape[0]} positions, the student {n}")
        if tw.dim() != 2 or tw.shape[1] != th.shape[1]:
            raise ModelError(
                f"teacher_weight must be [vocab, {th.shape[1]}] (the teacher's head), got {list(tw.shape)}"
            )
        if tw.shape[0] != vocab:
            raise ModelError(
                f"teacher vocabulary ({tw.shape[0]}) differs from the student's ({vocab}): logit "
                "distillation needs the same tokenizer and head size"
            )
        return _Teacher(th, tw, None, None, _compute_dtype(th))
    if topk_ids is None or topk_logprobs is None:
        raise ModelError("topk_ids and topk_logprobs must be given together")
    k = topk_ids.shape[-1]
    ids = topk_ids.detach().reshape(-1, k).long()
    lp = topk_logprobs.detach().reshape(-1, k).float()
    if ids.shape != lp.shape or ids.shape[0] != n:
        raise ModelError(
            f"topk_ids {list(topk_ids.shape)} and topk_logprobs {list(topk_logprobs.shape)} must both be "
            f"[positions, k] with {n} positions"
        )
    # ignored rows may hold anything (padding): neutral values keep them out of the arithmetic
    valid = (labels != IGNORE_INDEX)[:, None]
    ids = ids.masked_fill(~valid, 0)
    lp = lp.masked_fill(~valid, 0.0)
    if n and (ids.min() < 0 or ids.max() >= vocab):
        raise ModelError(f"topk_ids must lie in [0, {vocab}) at every position with a label")
    if not torch.isfinite(lp).all():
        raise ModelError("topk_logprobs must be finite at every position with a label")
    return _Teacher(None, None, ids, lp, torch.float32)


def _linear_kd_apply(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    kind: str,
    temperature: float,
    jsd_beta: float,
    ce_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ T²·D, Σ CE) over the valid rows; shared by ``linear_kd_loss`` and ``Llama.forward(distill=)``."""
    _check_kd_args(kind, temperature, jsd_beta)
    kind = _effective_kind(kind, jsd_beta)
    h = h.reshape(-1, h.shape[-1])
    labels = labels.reshape(-1)
    if labels.shape[0] != h.shape[0]:
        raise ModelError(f"labels have {labels.shape[0]} positions, the hidden states {h.shape[0]}")
    teacher = _kd_teacher(
        h.shape[0], weight.shape[0], labels, teacher_hidden, teacher_weight, topk_ids, topk_logprobs
    )
    compute_dtype = _compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        if not _wants_grad(h, weight):
            kd, ce, *_ = _linear_kd(
                h, weight, labels, teacher, kind, temperature, jsd_beta, compute_dtype, False, False, False
            )
            return kd, ce
        return _LinearKD.apply(
            h, weight, labels, teacher, kind, temperature, jsd_beta, compute_dtype, ce_grad
        )


def linear_kd_loss(
    h_s: torch.Tensor,
    w_s: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    topk_ids: torch.Tensor | None = None,
    topk_logprobs: torch.Tensor | None = None,
    kind: KDKind = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """Σ over positions with a label (labels != -100) of T²·D(teacher, student), without [N, V] logits.

    h_s: the student's final-norm hidden states [..., H], w_s: its head [V, H], labels: [...]. The student's
    distribution is ``q = softmax(h_s @ w_s.T / T)``; D is ``kd_divergence``'s (forward KL(p ‖ q), reverse
    KL(q ‖ p), or the generalised JSD_β with m = β p + (1-β) q, TRL's convention) times T² (Hinton et al.
    2015). The teacher's ``p`` comes from one of:

    * ``teacher_hidden`` [..., H_t] and ``teacher_weight`` [V, H_t]: p = softmax(teacher_hidden @
      teacher_weight.T / T), computed chunk by chunk alongside the student's (no gradient);
    * ``topk_ids`` / ``topk_logprobs`` [..., k] (teacher log-probs at T = 1 of its k most likely tokens):
      both distributions renormalised over that set, exactly ``kd_divergence_topk``.

    Returns a float32 scalar; the gradient flows to ``h_s`` and ``w_s`` only. Formed in the forward pass
    (the loss is a scalar), so backpropagate through it once.
    """
    kd, _ = _linear_kd_apply(
        h_s,
        w_s,
        labels,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        kind=kind,
        temperature=temperature,
        jsd_beta=jsd_beta,
        ce_grad=False,
    )
    return kd


# ------------------------------------------------------------------------------------------------------
# What Llama.forward takes and returns for post-training
# ------------------------------------------------------------------------------------------------------


@dataclass
class DistillTarget:
    """The teacher side of ``Llama.forward(..., distill=DistillTarget(...))``.

    Give either ``teacher_hidden`` (the teacher's ``hidden_states(input_ids)`` [B, T, H_t], taken under
    ``torch.no_grad()``) with ``teacher_weight`` (its ``lm_head.weight`` [V, H_t]), or ``topk_ids`` and
    ``topk_logprobs`` [B, T, k] saved from a teacher run (log-probs at temperature 1).
    """

    kind: KDKind = "forward_kl"  # forward_kl = KL(teacher ‖ student); reverse_kl; jsd (generalised, beta)
    temperature: float = 1.0  # both distributions at softmax(logits / T); the divergence is scaled by T²
    jsd_beta: float = 0.5  # m = β·teacher + (1-β)·student (TRL's convention); 0 → forward KL, 1 → reverse
    teacher_hidden: torch.Tensor | None = None
    teacher_weight: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    # Form the CE term's gradient too (two more head matmuls per chunk); False when the loss uses the KD term
    # alone (α = 1): ``ce_sum`` is then still returned, for logging, but carries no gradient.
    ce_grad: bool = True

    def __post_init__(self) -> None:
        _check_kd_args(self.kind, self.temperature, self.jsd_beta)


class DistillOutput(NamedTuple):
    """``Llama.forward(..., distill=...)``: sums over the positions with a label, and their number, so a loss
    forms ``α·kd_sum/n + (1-α)·ce_sum/n`` with the token count it normalises by (across micro-batches)."""

    kd_sum: torch.Tensor  # float32 scalar: Σ T²·D(teacher, student)
    ce_sum: torch.Tensor  # float32 scalar: Σ next-token CE at T = 1
    num_tokens: torch.Tensor  # int64 scalar: positions with labels != -100


class LossSum(NamedTuple):
    """``Llama.forward(..., output="ce_sum")``: Σ CE and the number of target tokens it sums over."""

    loss_sum: torch.Tensor  # float32 scalar
    num_tokens: torch.Tensor  # int64 scalar
