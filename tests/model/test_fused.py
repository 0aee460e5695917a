"""The fused head kernels (llmforge.model.fused) against plain full-logits references, hand-computed values
and TRL's GKD loss; and the post-training outputs of ``Llama.forward``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmforge.errors import ModelError
from llmforge.model import Llama, fused
from llmforge.model.fused import (
    DistillOutput,
    DistillTarget,
    LossSum,
    kd_divergence,
    kd_divergence_topk,
    linear_kd_loss,
    linear_token_logprobs,
)

from .conftest import randomize, tiny_config

KINDS = ["forward_kl", "reverse_kl", "jsd"]


@pytest.fixture(params=[7, None], ids=["chunks-of-7", "one-chunk"])
def chunk_rows(request, monkeypatch):
    """Several chunks (the last one ragged) or the default single chunk."""
    if request.param is not None:
        monkeypatch.setattr(fused, "_chunk_rows", lambda vocab: request.param)
    return request.param


def _inputs(n=30, hidden=16, vocab=53, seed=0, ignore=(0, 1, 2, 17, 29)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=torch.float64).float()
    w = (torch.randn(vocab, hidden, generator=g) * 0.5).float()
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[list(ignore)] = -100
    return h, w, labels


def _grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    return out, tensors


# -- per-token log-probs ------------------------------------------------------------------------------------


def _reference_logprobs(h, w, labels):
    logp = torch.log_softmax(F.linear(h, w).float(), dim=-1)
    valid = labels != -100
    return logp.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1) * valid


def test_token_logprobs_values_and_gradients_equal_the_full_logits_path(chunk_rows):
    h, w, labels = _inputs()
    upstream = torch.randn(labels.shape[0], generator=torch.Generator().manual_seed(5))

    ref, (rh, rw) = _grads(lambda a, b: _reference_logprobs(a, b, labels), h, w)
    (ref * upstream).sum().backward()
    got, (gh, gw) = _grads(lambda a, b: linear_token_logprobs(a, b, labels), h, w)
    (got * upstream).sum().backward()

    assert got.dtype == torch.float32 and got.shape == labels.shape
    assert torch.all(got[labels == -100] == 0) and torch.all(got[labels != -100] < 0)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gh.grad, rh.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw.grad, rw.grad, atol=1e-6, rtol=1e-5)
    assert torch.all(gh.grad[labels == -100] == 0)  # ignored rows get no gradient whatever flows in


def test_token_logprobs_keep_the_batch_shape_and_work_without_grad():
    h, w, labels = _inputs(n=24, ignore=(0, 5, 23))
    got = linear_token_logprobs(h.view(4, 6, -1), w, labels.view(4, 6))
    assert got.shape == (4, 6)
    torch.testing.assert_close(got.flatten(), _reference_logprobs(h, w, labels))
    # only the head needs a gradient (a frozen backbone): d/dh is skipped, d/dweight still exact
    upstream = torch.randn(24)
    wr = w.clone().requires_grad_(True)
    (_reference_logprobs(h, wr, labels) * upstream).sum().backward()
    wg = w.clone().requires_grad_(True)
    (linear_token_logprobs(h, wg, labels) * upstream).sum().backward()
    torch.testing.assert_close(wg.grad, wr.grad, atol=1e-6, rtol=1e-5)


def test_token_logprobs_under_bf16_autocast_are_close_to_the_logits_path():
    h, w, labels = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.log_softmax(F.linear(h, w).float(), dim=-1)
        ref = ref.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1) * (labels != -100)
        got = linear_token_logprobs(h, w, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)  # same bf16 matmul, fp32 softmax


# -- the reference divergences ------------------------------------------------------------------------------


def test_kd_divergence_equals_hand_computed_values():
    """p = (3/4, 1/4) for the teacher, q = (1/2, 1/2) for the student, at T = 1 and at T = 2."""
    student = torch.tensor([0.0, 0.0])
    p, q = (0.75, 0.25), (0.5, 0.5)
    fkl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    rkl = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q, strict=True))
    beta = 0.3
    m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q, strict=True)]
    jsd = beta * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m, strict=True)) + (1 - beta) * sum(
        qi * math.log(qi / mi) for qi, mi in zip(q, m, strict=True)
    )
    for T in (1.0, 2.0):
        teacher = torch.tensor([T * math.log(3.0), 0.0])  # softmax(teacher / T) = (3/4, 1/4)
        for kind, expected in (("forward_kl", fkl), ("reverse_kl", rkl), ("jsd", jsd)):
            got = kd_divergence(student, teacher, kind=kind, temperature=T, jsd_beta=beta)
            assert got.item() == pytest.approx(T * T * expected, rel=1e-6), (kind, T)
    # the end points of the JSD are TRL's: beta 0 → forward KL, beta 1 → reverse KL
    teacher = torch.tensor([math.log(3.0), 0.0])
    assert kd_divergence(student, teacher, kind="jsd", jsd_beta=0.0).item() == pytest.approx(fkl, rel=1e-6)
    assert kd_divergence(student, teacher, kind="jsd", jsd_beta=1.0).item() == pytest.approx(rkl, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_kd_divergence_equals_trl_generalized_jsd_loss(beta, temperature, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd")
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 9, 31, generator=g) * 3, torch.randn(2, 9, 31, generator=g) * 3
    labels = torch.randint(0, 31, (2, 9), generator=g)
    labels[0, :4] = -100
    trl_sum = gkd.GKDTrainer.generalized_jsd_loss(
        student, teacher, labels=labels, beta=beta, temperature=temperature, reduction="sum"
    )
    ours = kd_divergence(student, teacher, kind="jsd", temperature=temperature, jsd_beta=beta)
    # TRL does not scale by T²; ours does (Hinton et al.)
    torch.testing.assert_close(ours[labels != -100].sum() / temperature**2, trl_sum, atol=1e-5, rtol=1e-5)
    if beta in (0.0, 1.0):  # TRL's end points are our forward / reverse KL
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
        named = kd_divergence(student, teacher, kind=kind, temperature=temperature)
        torch.testing.assert_close(named, ours)


def test_kd_divergence_topk_with_the_whole_vocabulary_is_the_full_divergence():
    g = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    logp = torch.log_softmax(teacher, -1)
    ids = torch.stack([torch.randperm(11, generator=g) for _ in range(5)])  # order must not matter
    for kind in KINDS:
        full = kd_divergence(student, teacher, kind=kind, temperature=1.7)
        topk = kd_divergence_topk(student, ids, logp.gather(-1, ids), kind=kind, temperature=1.7)
        torch.testing.assert_close(topk, full)


def test_kd_divergence_topk_renormalises_both_sides_over_the_teacher_set():
    """Teacher top-2 log-probs log(0.6), log(0.2) → p̃ = (3/4, 1/4); student logits 0, 0 there → q̃ = (1/2, 1/2)
    whatever its other logits are."""
    student = torch.tensor([[0.0, 5.0, 0.0, -3.0]])
    ids = torch.tensor([[2, 0]])
    lp = torch.tensor([[math.log(0.6), math.log(0.2)]])
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_divergence_topk(student, ids, lp).item() == pytest.approx(expected, rel=1e-6)


# -- the chunked divergence ---------------------------------------------------------------------------------


def _teacher(n=30, hidden_t=24, vocab=53, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, hidden_t, generator=g), torch.randn(vocab, hidden_t, generator=g) * 0.5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_linear_kd_loss_on_the_fly_equals_the_reference_in_values_and_gradients(
    kind, temperature, chunk_rows
):
    h, w, labels = _inputs()
    th, tw = _teacher()
    th.requires_grad_(True)  # must receive no gradient: the teacher is frozen
    valid = labels != -100
    kw = dict(kind=kind, temperature=temperature, jsd_beta=0.3)

    ref, (rh, rw) = _grads(
        lambda a, b: kd_divergence(F.linear(a, b), F.linear(th, tw).detach(), **kw)[valid].sum(), h, w
    )
    ref.backward()
    got, (gh, gw) = _grads(
        lambda a, b: linear_kd_loss(a, b, labels, teacher_hidden=th, teacher_weight=tw, **kw), h, w
    )
    (got * 1.0).backward()
    assert got.dtype == torch.float32 and got.shape == ()
    assert got.item() > 0
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh.grad, rh.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw.grad, rw.grad, atol=1e-6, rtol=1e-5)
    assert th.grad is None


@pytest.mark.parametrize("kind", KINDS)
def test_linear_kd_loss_from_saved_topk_equals_the_reference(kind, chunk_rows):
    h, w, labels = _inputs()
    th, tw = _teacher()
    teacher_logp = torch.log_softmax(F.linear(th, tw), -1)
    lp, ids = teacher_logp.topk(8, dim=-1)
    lp[labels == -100] = float("nan")  # padding rows may hold anything
    ids[labels == -100] = -1
    valid = labels != -100
    kw = dict(kind=kind, temperature=2.0, jsd_beta=0.7)

    ref, (rh, rw) = _grads(
        lambda a, b: kd_divergence_topk(F.linear(a, b)[valid], ids[valid], lp[valid], **kw).sum(), h, w
    )
    ref.backward()
    got, (gh, gw) = _grads(
        lambda a, b: linear_kd_loss(a, b, labels, topk_ids=ids, topk_logprobs=lp, **kw), h, w
    )
    got.backward()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh.grad, rh.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw.grad, rw.grad, atol=1e-6, rtol=1e-5)


def test_linear_kd_loss_is_zero_for_a_student_equal_to_its_teacher():
    h, w, labels = _inputs()
    for kind in KINDS:
        loss = linear_kd_loss(h, w, labels, teacher_hidden=h, teacher_weight=w, kind=kind, temperature=3.0)
        assert abs(loss.item()) < 1e-5


def test_linear_kd_loss_rejects_bad_teacher_inputs():
    h, w, labels = _inputs()
    th, tw = _teacher()
    ids = torch.zeros(30, 4, dtype=torch.long)
    lp = torch.full((30, 4), -1.0)
    with pytest.raises(ModelError, match="exactly one teacher source"):
        linear_kd_loss(h, w, labels)
    with pytest.raises(ModelError, match="exactly one teacher source"):
        linear_kd_loss(h, w, labels, teacher_hidden=th, teacher_weight=tw, topk_ids=ids, topk_logprobs=lp)
    with pytest.raises(ModelError, match="teacher vocabulary \\(50\\) differs"):
        linear_kd_loss(h, w, labels, teacher_hidden=th, teacher_weight=tw[:50])
    bad = ids.clone()
    bad[5, 0] = 53
    with pytest.raises(ModelError, match="topk_ids must lie in"):
        linear_kd_loss(h, w, labels, topk_ids=bad, topk_logprobs=lp)
    with pytest.raises(ModelError, match="unknown distillation divergence"):
        linear_kd_loss(h, w, labels, teacher_hidden=th, teacher_weight=tw, kind="kl")
    with pytest.raises(ModelError, match="temperature"):
        DistillTarget(temperature=0.0)
    with pytest.raises(ModelError, match="jsd_beta"):
        DistillTarget(kind="jsd", jsd_beta=1.5)


# -- Llama.forward's post-training outputs -------------------------------------------------------------------


@pytest.fixture
def model_and_batch():
    torch.manual_seed(0)
    m = randomize(Llama(tiny_config())).train()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (3, 20), generator=g)
    labels = torch.randint(0, 97, (3, 20), generator=g)
    labels[0, :6] = -100
    labels[2, -3:] = -100
    return m, ids, labels


def _param_grads(m):
    grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    return grads


def test_forward_logprobs_output(model_and_batch, chunk_rows):
    m, ids, labels = model_and_batch
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(9))
    logits = m(ids)
    ref = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    ref = ref * (labels != -100)
    (ref * upstream).sum().backward()
    ref_grads = _param_grads(m)

    got = m(ids, labels=labels, output="logprobs")
    assert got.shape == labels.shape and got.dtype == torch.float32
    (got * upstream).sum().backward()
    torch.testing.assert_close(got, ref.detach(), atol=1e-6, rtol=1e-6)
    for k, v in _param_grads(m).items():  # gradients reach ~10 here: fp32 rounding of the backbone's sums
        torch.testing.assert_close(v, ref_grads[k], atol=1e-5, rtol=1e-5, msg=k)


def test_forward_ce_sum_output(model_and_batch):
    m, ids, labels = model_and_batch
    with torch.no_grad():
        expected = F.cross_entropy(m(ids).flatten(0, 1), labels.flatten(), reduction="sum")
        out = m(ids, labels=labels, output="ce_sum")
        mean = m(ids, labels=labels)
    assert isinstance(out, LossSum)
    loss_sum, n = out
    assert n.dtype == torch.int64 and n.item() == (labels != -100).sum().item() == 51
    torch.testing.assert_close(loss_sum, expected)
    torch.testing.assert_close(mean, loss_sum / n)


@pytest.mark.parametrize("source", ["on-the-fly", "topk"])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_distill_matches_full_logits_losses_and_gradients(model_and_batch, kind, source, chunk_rows):
    m, ids, labels = model_and_batch
    torch.manual_seed(1)
    teacher = randomize(
        Llama(tiny_config(hidden_size=32, num_attention_heads=2, num_key_value_heads=1)), seed=7
    )
    teacher.eval()
    with torch.no_grad():
        t_hidden = teacher.hidden_states(ids)
        t_logits = teacher(ids)
    valid = labels != -100
    T, alpha = 2.0, 0.7
    if source == "on-the-fly":
        target = DistillTarget(kind, T, 0.4, teacher_hidden=t_hidden, teacher_weight=teacher.lm_head.weight)
        ref_kd = lambda logits: kd_divergence(logits, t_logits, kind=kind, temperature=T, jsd_beta=0.4)  # noqa: E731
    else:
        lp, top = torch.log_softmax(t_logits, -1).topk(10, dim=-1)
        target = DistillTarget(kind, T, 0.4, topk_ids=top, topk_logprobs=lp)
        ref_kd = lambda logits: kd_divergence_topk(logits, top, lp, kind=kind, temperature=T, jsd_beta=0.4)  # noqa: E731

    logits = m(ids)
    kd_ref = ref_kd(logits)[valid].sum()
    ce_ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    n = valid.sum()
    (alpha * kd_ref / n + (1 - alpha) * ce_ref / n).backward()
    ref_grads = _param_grads(m)

    out = m(ids, labels=labels, distill=target)
    assert isinstance(out, DistillOutput)
    assert out.num_tokens.item() == n.item()
    torch.testing.assert_close(out.kd_sum, kd_ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.ce_sum, ce_ref.detach(), atol=1e-5, rtol=1e-5)
    (alpha * out.kd_sum / out.num_tokens + (1 - alpha) * out.ce_sum / out.num_tokens).backward()
    for k, v in _param_grads(m).items():
        torch.testing.assert_close(v, ref_grads[k], atol=1e-6, rtol=1e-4, msg=k)
    assert all(p.grad is None for p in teacher.parameters())


def test_forward_distill_without_the_ce_gradient(model_and_batch):
    m, ids, labels = model_and_batch
    teacher = randomize(Llama(tiny_config()), seed=3).eval()
    with torch.no_grad():
        th = teacher.hidden_states(ids)
    target = DistillTarget(teacher_hidden=th, teacher_weight=teacher.lm_head.weight, ce_grad=False)
    out = m(ids, labels=labels, distill=target)
    assert not out.ce_sum.requires_grad and out.ce_sum.item() > 0
    out.kd_sum.backward()
    kd_only = _param_grads(m)
    full = m(
        ids, labels=labels, distill=DistillTarget(teacher_hidden=th, teacher_weight=teacher.lm_head.weight)
    )
    full.kd_sum.backward()
    for k, v in _param_grads(m).items():
        torch.testing.assert_close(kd_only[k], v, msg=k)
    with pytest.raises(RuntimeError, match="twice"):
        out2 = m(ids, labels=labels, distill=target)
        out2.kd_sum.backward(retain_graph=True)
        out2.kd_sum.backward()


def test_forward_rejects_outputs_without_labels(model_and_batch):
    m, ids, labels = model_and_batch
    with pytest.raises(ModelError, match="need labels"):
        m(ids, output="logprobs")
    with pytest.raises(ModelError, match="unknown output"):
        m(ids, labels=labels, output="logits")
    with pytest.raises(ModelError, match="shaped like input_ids"):
        m(ids, labels=labels[:, :5])


@pytest.mark.parametrize("mode", ["autocast", "bf16-weights"])
def test_kd_and_logprobs_in_bf16_are_close_to_the_fp32_reference(mode):
    h, w, labels = _inputs()
    th, tw = _teacher()
    valid = labels != -100
    ref_kd = kd_divergence(F.linear(h, w), F.linear(th, tw), kind="jsd", temperature=2.0)[valid].sum()
    ref_lp = _reference_logprobs(h, w, labels)
    if mode == "autocast":
        hs, ws = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kd = linear_kd_loss(
                hs, ws, labels, teacher_hidden=th, teacher_weight=tw, kind="jsd", temperature=2.0
            )
            lp = linear_token_logprobs(hs, ws, labels)
    else:
        hs, ws = h.bfloat16().requires_grad_(True), w.bfloat16().requires_grad_(True)
        kd = linear_kd_loss(
            hs,
            ws,
            labels,
            teacher_hidden=th.bfloat16(),
            teacher_weight=tw.bfloat16(),
            kind="jsd",
            temperature=2.0,
        )
        lp = linear_token_logprobs(hs, ws, labels)
    assert kd.dtype == lp.dtype == torch.float32
    torch.testing.assert_close(kd, ref_kd, atol=0.05, rtol=0.02)
    torch.testing.assert_close(lp, ref_lp, atol=0.05, rtol=0.02)
    (kd + lp.sum()).backward()
    assert hs.grad.dtype == hs.dtype and ws.grad.dtype == ws.dtype
    assert torch.isfinite(hs.grad.float()).all() and torch.isfinite(ws.grad.float()).all()


def test_the_old_import_path_still_works():
    from llmforge.model import llama

    assert llama.linear_cross_entropy is fused.linear_cross_entropy and llama.IGNORE_INDEX == -100
