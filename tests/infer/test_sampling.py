"""Sampling knobs: the logit processors against hand computations, and the engine against a full forward."""

from __future__ import annotations

import math

import pytest
import torch

from llmforge.infer import Engine, Request, RequestError, SamplingParams
from llmforge.infer.sampling import apply_penalties, filter_top_k_top_p, sample_batch, sample_from_logits

PROMPTS = [[1, 5, 9, 13, 40, 41, 7], [1, 60], [1, 22, 23, 24, 25, 80, 81, 82, 83]]


def _full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1].float()


def test_penalties_match_the_openai_formula_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])  # token 1 generated once, token 2 three times
    out = apply_penalties(logits, counts, presence=torch.tensor([0.5]), frequency=torch.tensor([0.25]))
    # logit - count * frequency - (count > 0) * presence
    expected = [1.0, 2.0 - 0.25 - 0.5, 3.0 - 0.75 - 0.5, 4.0]
    assert out[0].tolist() == pytest.approx(expected)


def test_top_k_top_p_filter_by_hand():
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0, -1.0]] * 3)
    out = filter_top_k_top_p(logits, torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.9, 1e-6]))
    kept = [set(torch.isfinite(r).nonzero().flatten().tolist()) for r in out]
    # row 0: the two largest; row 1: p = .665, .245, .090 ... -> {1, 2} reach 0.9; row 2: the argmax only
    assert kept == [{1, 2}, {1, 2}, {1}]
    assert out[0, 1] == 5.0 and out[1, 2] == 4.0  # kept logits unchanged


def test_inverse_cdf_sampling_follows_the_tempered_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    n = 20000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # an even grid: frequencies equal the probabilities
    for t in (0.5, 1.0, 2.0):
        picked = sample_from_logits((logits / t).expand(n, 4), u)
        freq = torch.bincount(picked, minlength=4).double() / n
        torch.testing.assert_close(freq, (logits.double() / t).softmax(-1), atol=2 / n, rtol=0)


def test_sample_batch_rows_are_independent_and_top_k_1_is_greedy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    params = [SamplingParams(temperature=0.0)] * 2 + [
        SamplingParams(temperature=1.3, top_k=1, seed=i) for i in range(4)
    ]
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    out = sample_batch(logits, params, generators=gens)
    assert out.tolist() == logits.argmax(-1).tolist()
    # one row sampled alone gives the same token as inside the batch (its own generator, its own uniform)
    p = [SamplingParams(temperature=0.8, top_p=0.9, seed=7)] * 6
    together = sample_batch(logits, p, generators=[torch.Generator().manual_seed(7) for _ in range(6)])
    for r in range(6):
        alone = sample_batch(logits[r : r + 1], p[:1], generators=[torch.Generator().manual_seed(7)])
        assert alone.item() == together[r].item()


def _engine_run(model, prompts, params, **kw):
    engine = Engine(model, max_batch=8, **kw)
    return engine.run(
        [Request(str(i), p, params[i] if isinstance(params, list) else params) for i, p in enumerate(prompts)]
    )


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    p = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, top_k=40, seed=11, ignore_eos=True)
    a = [o.token_ids for o in _engine_run(model, PROMPTS, p)]
    assert a == [o.token_ids for o in _engine_run(model, PROMPTS, p)]
    p.seed = 12
    assert a != [o.token_ids for o in _engine_run(model, PROMPTS, p)]
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    assert a != [o.token_ids for o in _engine_run(model, PROMPTS, greedy)]


def test_top_k_1_and_tiny_top_p_equal_greedy(model):
    greedy = [
        o.token_ids
        for o in _engine_run(model, PROMPTS, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    ]
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        p = SamplingParams(max_tokens=16, temperature=1.7, seed=3, ignore_eos=True, **kw)
        assert [o.token_ids for o in _engine_run(model, PROMPTS, p)] == greedy


def test_greedy_with_penalties_equals_a_hand_loop_over_full_forwards(model):
    presence, frequency = 0.7, 0.9
    for prompt in PROMPTS:
        ids, counts = list(prompt), torch.zeros(model.config.vocab_size)
        for _ in range(20):
            logits = _full_logits(model, ids) - counts * frequency - (counts > 0).float() * presence
            t = int(logits.argmax())
            ids.append(t)
            counts[t] += 1
        p = SamplingParams(
            max_tokens=20,
            temperature=0,
            presence_penalty=presence,
            frequency_penalty=frequency,
            ignore_eos=True,
        )
        got = _engine_run(model, [prompt], p)[0].token_ids
        assert got == ids[len(prompt) :]
        free = _engine_run(model, [prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[
            0
        ].token_ids
        assert len(set(got)) > len(set(free))  # the penalty really changed the output: fewer repeats


def test_logprobs_equal_log_softmax_of_a_full_forward(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=4)
    params = SamplingParams(
        max_tokens=10, temperature=0.9, seed=5, logprobs=3, ignore_eos=True, frequency_penalty=1.0
    )
    outs = engine.run([Request(str(i), p, params) for i, p in enumerate(PROMPTS)])
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert len(out.logprobs) == len(out.token_ids) == 10
        for k, lp in enumerate(out.logprobs):
            # raw model log-probs: before the penalty and the temperature
            ref = torch.log_softmax(_full_logits(model, prompt + out.token_ids[:k]), -1)
            assert lp.token_id == out.token_ids[k]
            assert lp.logprob == pytest.approx(ref[lp.token_id].item(), abs=1e-4)
            top = ref.topk(3)
            assert [t for t, _, _ in lp.top] == top.indices.tolist()
            assert [v for _, _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
            assert lp.token == tokenizer.decode([lp.token_id])
    zero = engine.run([Request("z", PROMPTS[0], SamplingParams(max_tokens=2, temperature=0, logprobs=0))])[0]
    assert all(lp.top == [] and math.isfinite(lp.logprob) for lp in zero.logprobs)


def test_stop_ids_max_tokens_and_ignore_eos(model):
    free = _engine_run(model, [PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    stop_id = free.token_ids[4]
    cut = free.token_ids.index(stop_id) + 1
    out = _engine_run(
        model, [PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_id])
    )[0]
    assert out.token_ids == free.token_ids[:cut] and out.finish_reason == "stop"
    # the same id as the model's EOS: stops by default, not with ignore_eos
    eos = Engine(model, eos_token_ids=[stop_id], max_batch=1)
    assert (
        eos.run([Request("a", PROMPTS[0], SamplingParams(max_tokens=12, temperature=0))])[0].token_ids
        == free.token_ids[:cut]
    )
    eos = Engine(model, eos_token_ids=[stop_id], max_batch=1)
    kept = eos.run([Request("a", PROMPTS[0], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))])[
        0
    ]
    assert kept.token_ids == free.token_ids


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", 0),
        ("temperature", -1.0),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("presence_penalty", 2.5),
        ("frequency_penalty", "x"),
        ("stop", [""]),
        ("logprobs", 21),
        ("stop_token_ids", [-1]),
        ("seed", 1.5),
        ("max_tokens", True),
    ],
)
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(RequestError) as err:
        SamplingParams(**{field: value}).validate()
    assert err.value.param == field and field in str(err.value)
    assert isinstance(err.value, ValueError) and err.value.args == (str(err.value), field)
