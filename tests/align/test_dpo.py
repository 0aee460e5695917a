"""The DPO family: losses against hand-computed values and against TRL 1.16's own code on identical log-probs,
sequence log-probs against transformers, precomputed == frozen reference, and TRL-style invariance tests
(batch x accumulation, every parameter changes)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llmforge.align.dpo import (
    dpo_loss,
    ipo_loss,
    make_dpo_loss,
    orpo_loss,
    precompute_reference,
    sequence_logps,
    simpo_loss,
)
from llmforge.align.preference_data import PairBatches, collate, tokenize_pairs
from llmforge.manifest.align import AlignSection, DPOConfig
from llmforge.model import load_pretrained
from llmforge.tokenizer.info import load_tokenizer
from llmforge.train.loop import optimizer_step, setup


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


T = torch.tensor

# ----------------------------------------------------------------------------------------------------
# hand-computed values
# ----------------------------------------------------------------------------------------------------


def test_dpo_and_cdpo_hand_values():
    pc, pr, rc, rr = T([-10.0, -4.0]), T([-12.0, -3.0]), T([-11.0, -5.0]), T([-11.0, -5.0])
    # Δ = (pc - rc) - (pr - rr) = (1 - -1, 1 - 2) = (2, -1); β = 0.5 → z = (1, -0.5)
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert losses.tolist() == pytest.approx([-math.log(_sig(1.0)), -math.log(_sig(-0.5))], abs=1e-6)
    assert cr.tolist() == pytest.approx([0.5, 0.5]) and rj.tolist() == pytest.approx([-0.5, 1.0])
    eps = 0.2
    smooth, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=eps)
    want = [-(1 - eps) * math.log(_sig(z)) - eps * math.log(_sig(-z)) for z in (1.0, -0.5)]
    assert smooth.tolist() == pytest.approx(want, abs=1e-6)
    # at Δ = 0 (policy == reference) DPO is log 2 and its gradient points to widen the gap
    p = T([-3.0], requires_grad=True)
    loss, _, _ = dpo_loss(p, T([-3.0]), T([-3.0]), T([-3.0]), beta=0.1)
    loss.sum().backward()
    assert loss.item() == pytest.approx(math.log(2)) and p.grad.item() == pytest.approx(-0.05)


def test_ipo_simpo_orpo_hand_values():
    pc, pr, rc, rr = T([-6.0]), T([-8.0]), T([-7.0]), T([-7.0])
    nc, nr = T([2]), T([4])
    # IPO: Δ̄ = 1/2 - (-1)/4 = 0.75; β = 0.5 → target 1 → (0.75 - 1)² = 0.0625
    losses, _, _ = ipo_loss(pc, pr, rc, rr, nc, nr, beta=0.5)
    assert losses.item() == pytest.approx(0.0625)
    # SimPO: β/|y| log π: 2·(-3) - 2·(-2) = -2; γ = 1 → -log σ(-3)
    losses, c, r = simpo_loss(pc, pr, nc, nr, beta=2.0, gamma=1.0)
    assert losses.item() == pytest.approx(-math.log(_sig(-3.0))) and (c.item(), r.item()) == (-6.0, -4.0)
    # ORPO: P_w = e^-3, P_l = e^-2; log odds = log(P/(1-P))
    lo = lambda lp: lp - math.log(1 - math.exp(lp))  # noqa: E731
    want = 3.0 - 0.25 * math.log(_sig(lo(-3.0) - lo(-2.0)))
    losses, _, _ = orpo_loss(pc, pr, nc, nr, lam=0.25)
    assert losses.item() == pytest.approx(want, abs=1e-6)


# ----------------------------------------------------------------------------------------------------
# against TRL 1.16's own code, on identical log-probs
# ----------------------------------------------------------------------------------------------------


def _logps(B: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pc, pr = -torch.rand(B, generator=g) * 30, -torch.rand(B, generator=g) * 30
    rc, rr = pc + torch.randn(B, generator=g), pr + torch.randn(B, generator=g)
    nc, nr = torch.randint(1, 20, (B,), generator=g), torch.randint(1, 20, (B,), generator=g)
    return pc, pr, rc, rr, nc, nr


def _trl_dpo(loss_type: str, beta: float, pc, pr, rc, rr, nc, nr) -> tuple[float, dict]:
    """Run TRL's ``DPOTrainer._compute_loss`` (trl/trainer/dpo_trainer.py:1285) on a stand-in model whose
    per-token log-probs sum to ``pc``/``pr`` over completion masks of lengths ``nc``/``nr``."""
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DPOTrainer

    B = pc.shape[0]
    L = int(max(nc.max(), nr.max())) + 2
    lengths = torch.cat([nc, nr])
    completion = torch.zeros(2 * B, L, dtype=torch.long)
    per_token = torch.zeros(2 * B, L - 1)
    totals = torch.cat([pc, pr])
    for i, n in enumerate(lengths.tolist()):
        completion[i, 1 : 1 + n] = 1
        per_token[i, :n] = totals[i] / n  # the shifted positions of those completion tokens
    model = lambda **kw: SimpleNamespace(  # noqa: E731
        log_probs=per_token,
        entropy=torch.zeros_like(per_token),
        mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token, dtype=torch.bool),
    )
    acc = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    me = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=0.0, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {
        "input_ids": torch.zeros(2 * B, L, dtype=torch.long),
        "attention_mask": torch.ones(2 * B, L, dtype=torch.long),
        "completion_mask": completion,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = DPOTrainer._compute_loss(me, model, inputs, False)
    return float(loss), {k: v[-1] for k, v in me._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_match_trl_dpo_trainer(loss_type):
    pc, pr, rc, rr, nc, nr = _logps(16)
    want, trl_metrics = _trl_dpo(loss_type, 0.3, pc, pr, rc, rr, nc, nr)
    if loss_type == "sigmoid":
        losses, c, r = dpo_loss(pc, pr, rc, rr, beta=0.3)
    else:
        losses, c, r = ipo_loss(pc, pr, rc, rr, nc, nr, beta=0.3)
    assert losses.mean().item() == pytest.approx(want, rel=1e-5)
    assert (c - r).mean().item() == pytest.approx(trl_metrics["rewards/margins"], rel=1e-5, abs=1e-6)
    assert ((c - r) > 0).float().mean().item() == pytest.approx(trl_metrics["rewards/accuracies"])
    assert pc.mean().item() == pytest.approx(trl_metrics["logps/chosen"], rel=1e-5)


def _cpo_self(loss_type: str, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0):
    return SimpleNamespace(
        alpha=0.0, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type, simpo_gamma=gamma,
        accelerator=SimpleNamespace(device="cpu"),
    )  # fmt: skip


def test_cdpo_matches_trl_label_smoothed_sigmoid():
    """TRL 1.16's DPOTrainer has no cDPO term any more; CPOTrainer.cpo_loss (trl/experimental/cpo/
    cpo_trainer.py:721-726) keeps the conservative sigmoid loss −(1−ε)logσ(βx) − ε logσ(−βx) on x = its
    log-prob difference. Feeding it the DPO log-ratios gives cDPO exactly."""
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    pc, pr, rc, rr, _, _ = _logps(16, seed=1)
    want, _, _ = CPOTrainer.cpo_loss(_cpo_self("sigmoid", 0.2, 0.15), pc - rc, pr - rr)
    got, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=0.15)
    assert torch.allclose(got, want, atol=1e-6)


def test_simpo_matches_trl_cpo_trainer():
    """CPOTrainer.cpo_loss with loss_type="simpo" (cpo_trainer.py:715-721) on average log-probs (it
    averages for simpo, cpo_trainer.py:850)."""
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    pc, pr, _, _, nc, nr = _logps(16, seed=2)
    want, wc, wr = CPOTrainer.cpo_loss(_cpo_self("simpo", 2.0, gamma=0.7), pc / nc, pr / nr)
    got, c, r = simpo_loss(pc, pr, nc, nr, beta=2.0, gamma=0.7)
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(c, wc) and torch.allclose(r, wr)


def test_orpo_matches_trl_orpo_trainer():
    """ORPOTrainer.odds_ratio_loss (trl/experimental/orpo/orpo_trainer.py:670) gives λ·logσ(log odds) on
    average log-probs, and the trainer's loss is NLL − mean of it (orpo_trainer.py:848). Per pair, our loss
    is NLL_pair + λ·(−logσ(...)); with equal lengths the per-pair and TRL's token-pooled NLL coincide."""
    pytest.importorskip("trl")
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    pc, pr, _, _, _, _ = _logps(16, seed=3)
    pc, pr = pc / 10, pr / 10  # P(y) not vanishingly small, so the odds term matters
    n = torch.full((16,), 5)
    ratio, wc, wr, _, _ = ORPOTrainer.odds_ratio_loss(
        SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu")), pc / n, pr / n
    )
    trl_loss = (-(pc / n)).mean() - ratio.mean()
    got, c, r = orpo_loss(pc, pr, n, n, lam=0.25)
    assert got.mean().item() == pytest.approx(trl_loss.item(), rel=1e-6)
    assert torch.allclose(c, wc) and torch.allclose(r, wr)
    # stable at log-probs near 0 (P → 1) and very negative ones (P → 0)
    edge, _, _ = orpo_loss(T([-1e-7, -200.0]), T([-300.0, -1e-6]), T([1, 1]), T([1, 1]), lam=1.0)
    assert torch.isfinite(edge).all()


# ----------------------------------------------------------------------------------------------------
# sequence log-probs, the reference, and the training step
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(align_base):
    tok = load_tokenizer(align_base["tok"])
    train, _, _ = tokenize_pairs([align_base["pairs"]], tok, max_len=64, val_fraction=0.0, seed=0)
    return train, tok.info.pad_id


def test_sequence_logps_match_transformers(align_base, pairs):
    transformers = pytest.importorskip("transformers")
    train, pad = pairs
    batch = collate(train[:4], pad)
    ours, lengths = sequence_logps(load_pretrained(align_base["model"], dtype=torch.float32), batch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(align_base["model"], dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(input_ids=batch["input_ids"]).logits.float()
    labels = batch["labels"]
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    want = (lp * (labels != -100)).sum(-1)
    assert torch.allclose(ours, want, atol=1e-4), (ours, want)
    # lengths are the response tokens (answer + <|im_end|>), chosen rows then rejected rows
    assert lengths[:4].tolist() == [sum(p.chosen_mask) - (p.chosen_mask[0]) for p in train[:4]]


def test_packed_batches_give_the_same_logps_as_padded(align_base, pairs):
    train, pad = pairs
    model = load_pretrained(align_base["model"], dtype=torch.float32)
    padded = collate(train[:6], pad)
    packed = collate(train[:6], pad, pack_len=96)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # fewer rows: that is the point
    assert int((packed["document_ids"] >= 0).sum()) == int((padded["last"] + 1).sum())
    a, na = sequence_logps(model, padded)
    b, nb = sequence_logps(model, packed)
    assert torch.equal(na, nb) and torch.allclose(a, b, atol=1e-4), (a, b)
    # gradients flow through the packed sum
    b.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_precomputed_reference_equals_frozen_reference(align_base, pairs):
    train, pad = pairs
    policy = load_pretrained(align_base["model"], dtype=torch.float32)
    ref = load_pretrained(align_base["model"], dtype=torch.float32).requires_grad_(False)
    chunk = [p for p in train[:8]]
    precompute_reference(policy, chunk, batch_size=3, pad_id=pad)  # other batch shapes than training's
    batch = collate(chunk, pad)
    cfg = DPOConfig(beta=0.1)
    a = make_dpo_loss(cfg)(policy, batch)
    b = make_dpo_loss(cfg, reference=ref)(policy, {k: v for k, v in batch.items() if k != "ref_logps"})
    assert a.loss.item() == pytest.approx(b.loss.item(), abs=1e-6) == pytest.approx(math.log(2), abs=1e-5)
    assert float(a.metrics["rewards/margins"]) == pytest.approx(0.0, abs=1e-5)
    assert a.weight == 8


def _one_step(
    align_base,
    pairs,
    *,
    batch_size: int,
    grad_accum: int,
    loss: str,
    model: str = "model",
    pack: int | None = None,
):
    import tempfile

    train, pad = pairs
    policy = load_pretrained(align_base[model], dtype=torch.float32)
    cfg = DPOConfig(loss=loss, beta=0.5)
    chunk = [p for p in train[:16]]
    precompute_reference(policy, chunk, batch_size=8, pad_id=pad)
    # eps ≫ |g| turns Adam's update into lr·g (SGD): the weights then compare the gradients themselves, not
    # Adam's sign-like first steps, which amplify float noise in near-zero gradients (rare embedding rows)
    section = AlignSection(
        max_steps=3, warmup_steps=0, lr=1.0, eps=1.0, batch_size=batch_size, grad_accum=grad_accum
    )
    data = PairBatches(chunk, batch_size=batch_size, pad_id=pad, seed=0, pack_len=pack)
    with tempfile.TemporaryDirectory() as d:
        session = setup(policy, section, run_dir=d, description="align")
        before = {n: p.detach().clone() for n, p in policy.named_parameters()}
        st = optimizer_step(session, lambda: next(data), make_dpo_loss(cfg))
        # a second step: Δ ≠ 0 now, so the gradient depends on every pair's own log-ratios
        st2 = optimizer_step(session, lambda: next(data), make_dpo_loss(cfg))
    return policy, before, st, st2


@pytest.mark.parametrize(
    ("loss", "pack"), [("sigmoid", None), ("ipo", None), ("simpo", None), ("orpo", None), ("sigmoid", 96)]
)
def test_batch_times_accumulation_invariance(align_base, pairs, loss, pack):
    """TRL's invariance: batch 8 x accumulation 1 == batch 1 x accumulation 8 (same pairs, same update);
    packed batches too (8 pairs share rows in one case, not in the other)."""
    a, _, sa, sa2 = _one_step(align_base, pairs, batch_size=8, grad_accum=1, loss=loss, pack=pack)
    b, _, sb, sb2 = _one_step(align_base, pairs, batch_size=1, grad_accum=8, loss=loss, pack=pack)
    assert sa.loss == pytest.approx(sb.loss, rel=1e-5) and sa2.loss == pytest.approx(sb2.loss, rel=1e-5)
    assert sa.grad_norm == pytest.approx(sb.grad_norm, rel=1e-4)
    for k in ("rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert sa2.metrics[k] == pytest.approx(sb2.metrics[k], rel=1e-4, abs=1e-6)
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=2e-6), n


@pytest.mark.parametrize("loss", ["sigmoid", "orpo"])
def test_every_trainable_parameter_changes_after_a_step(align_base, pairs, loss):
    policy, before, st, _ = _one_step(
        align_base, pairs, batch_size=8, grad_accum=1, loss=loss, model="untied"
    )
    assert st.applied
    for n, p in policy.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} did not change"
    assert F is not None
