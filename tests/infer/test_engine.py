"""The engine: continuous batching, slots, limits, cancellation, chunked prefill, batch invariance, parity."""

from __future__ import annotations

import random

import pytest
import torch

from llmforge.infer import (
    ContextLengthExceeded,
    Engine,
    EngineOverloaded,
    Request,
    RequestError,
    SamplingParams,
)
from llmforge.model import save_pretrained

from .conftest import VOCAB, make_model

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


def _prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def _recompute(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def _alone(model, prompt, params=GREEDY, **kw) -> list[int]:
    return Engine(model, max_batch=1, **kw).run([Request("x", prompt, params)])[0].token_ids


def test_greedy_equals_full_recompute(model):
    for p in _prompts(4, seed=1):
        assert _alone(model, p) == _recompute(model, p, 20)


def test_batch_invariance_greedy_and_seeded(model):
    """A request's output alone equals its output among 15 others of other lengths (greedy and seeded)."""
    prompts = _prompts(16, seed=2)
    sampled = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True)
    for params in (GREEDY, sampled):
        engine = Engine(model, max_batch=16, prefill_chunk=16)
        batch = engine.run([Request(str(i), p, params) for i, p in enumerate(prompts)])
        for p, out in zip(prompts, batch, strict=True):
            assert out.token_ids == _alone(model, p, params, prefill_chunk=16)


def test_batch_invariance_of_logits_within_tolerance(model, tokenizer):
    """The numbers behind the tokens: per-token log-probs alone and in a batch of 16 agree to 1e-5 (fp32
    rounding across batch shapes), far below the top-2 gaps that decide greedy tokens."""
    prompts = _prompts(16, seed=3)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=5)
    batch = Engine(model, tokenizer, max_batch=16).run(
        [Request(str(i), p, params) for i, p in enumerate(prompts)]
    )
    for p, out in zip(prompts, batch, strict=True):
        ref = Engine(model, tokenizer, max_batch=1).run([Request("x", p, params)])[0]
        assert out.token_ids == ref.token_ids
        for a, b in zip(out.logprobs, ref.logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert [v for *_, v in a.top] == pytest.approx([v for *_, v in b.top], abs=1e-5)


def test_requests_join_and_leave_between_steps(model):
    prompts = _prompts(6, seed=4)
    lengths = [5, 30, 12, 3, 25, 8]
    alone = [
        _alone(model, p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        for p, n in zip(prompts, lengths, strict=True)
    ]
    engine = Engine(model, max_batch=3, prefill_chunk=8)
    outs: dict[str, list[int]] = {}
    finished: list[str] = []
    running_seen = []
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished():
        if pending and step % 3 == 0:  # a new request arrives every third step, while others decode
            i, p = pending.pop(0)
            engine.add_request(
                Request(str(i), p, SamplingParams(max_tokens=lengths[i], temperature=0, ignore_eos=True))
            )
        for ev in engine.step():
            outs.setdefault(ev.request_id, []).extend(ev.token_ids)
            if ev.finish_reason:
                finished.append(ev.request_id)
        running_seen.append(engine.num_running)
        step += 1
    assert [outs[str(i)] for i in range(6)] == alone
    assert max(running_seen) == 3  # never more than the slots
    assert finished.index("3") < finished.index("1")  # a short late request left before a long early one
    assert engine.num_running == 0 and engine.num_waiting == 0


def test_slots_are_reused_and_queue_drains(model):
    prompts = _prompts(7, seed=5)
    engine = Engine(model, max_batch=2, max_queue=5, prefill_chunk=8)
    for i, p in enumerate(prompts):
        engine.add_request(
            Request(str(i), p, SamplingParams(max_tokens=4 + 3 * i, temperature=0, ignore_eos=True))
        )
    assert engine.num_waiting == 7 and engine.num_running == 0
    outs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for ev in engine.step():
            outs.setdefault(ev.request_id, []).extend(ev.token_ids)
        assert engine.num_running <= 2
    for i, p in enumerate(prompts):
        assert outs[str(i)] == _alone(
            model, p, SamplingParams(max_tokens=4 + 3 * i, temperature=0, ignore_eos=True)
        )


def test_queue_bound_raises_engine_overloaded(model):
    engine = Engine(model, max_batch=2, max_queue=3)
    for i in range(5):
        engine.add_request(Request(str(i), [1, 2, 3], GREEDY))
    with pytest.raises(EngineOverloaded, match="max_queue=3"):
        engine.add_request(Request("x", [1, 2, 3], GREEDY))
    engine.step()  # two admitted, three wait: still full
    with pytest.raises(EngineOverloaded):
        engine.add_request(Request("x", [1, 2, 3], GREEDY))
    engine.abort("0")
    engine.step()
    engine.add_request(Request("x", [1, 2, 3], GREEDY))  # a slot freed: room again


def test_context_length_and_request_errors(model):
    engine = Engine(model, max_batch=2, max_model_len=64)
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 64 tokens") as err:
        engine.add_request(Request("a", [1] * 60, SamplingParams(max_tokens=5)))
    assert (err.value.prompt_tokens, err.value.max_tokens, err.value.max_model_len) == (60, 5, 64)
    engine.add_request(Request("b", [1] * 59, SamplingParams(max_tokens=5)))  # exactly fits
    with pytest.raises(RequestError, match="already running"):
        engine.add_request(Request("b", [1], GREEDY))
    with pytest.raises(RequestError, match="vocabulary") as bad:
        engine.add_request(Request("c", [1, VOCAB], GREEDY))
    assert bad.value.param == "prompt"
    with pytest.raises(RequestError, match="at least one token"):
        engine.add_request(Request("d", [], GREEDY))
    with pytest.raises(RequestError, match="tokenizer"):
        engine.add_request(Request("e", [1], SamplingParams(stop=["x"])))
    out = engine.run([])
    assert out == []
    while engine.has_unfinished():
        engine.step()


def test_cancellation_frees_the_slot(model):
    engine = Engine(model, max_batch=2)
    for i in range(3):
        engine.add_request(
            Request(str(i), [1, 5, 6], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
        )
    engine.step()
    engine.step()
    assert (engine.num_running, engine.num_waiting) == (2, 1)
    engine.abort("0")
    engine.abort("2")  # a waiting one
    engine.abort("nope")  # unknown ids are ignored
    events = engine.step()
    cancelled = {e.request_id: e for e in events if e.finish_reason}
    assert set(cancelled) == {"0", "2"} and all(e.finish_reason == "cancelled" for e in cancelled.values())
    assert (engine.num_running, engine.num_waiting) == (1, 0)
    assert cancelled["0"].completion_tokens == 2


def test_chunked_prefill_gives_the_same_tokens(model):
    """A 150-token prompt in chunks of 16 (and interleaved with decoding) generates what one chunk does."""
    long = _prompts(1, seed=6, lo=150, hi=151)[0]
    whole = _alone(model, long, prefill_chunk=512)
    assert _alone(model, long, prefill_chunk=16) == whole == _recompute(model, long, 20)
    engine = Engine(model, max_batch=4, prefill_chunk=16, max_num_batched_tokens=24)
    short = _prompts(3, seed=7, hi=10)
    outs = engine.run(
        [Request("s0", short[0], GREEDY), Request("long", long, GREEDY)]
        + [Request(f"s{i}", p, GREEDY) for i, p in enumerate(short[1:], 1)]
    )
    assert outs[1].token_ids == whole
    assert [o.token_ids for o in outs[:1] + outs[2:]] == [_alone(model, p) for p in short]


def test_greedy_equals_transformers_generate(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_pretrained(model, tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    prompts = _prompts(4, seed=8, hi=20)
    engine = Engine(model, max_batch=4)
    ours = engine.run(
        [Request(str(i), p, SamplingParams(max_tokens=15, temperature=0)) for i, p in enumerate(prompts)]
    )
    for p, out in zip(prompts, ours, strict=True):
        ref = hf.generate(
            torch.tensor([p]), do_sample=False, max_new_tokens=15, eos_token_id=2, pad_token_id=0
        )
        assert out.token_ids == ref[0, len(p) :].tolist()


def test_bfloat16_on_cpu():
    bf = make_model().to(torch.bfloat16)
    prompts = _prompts(4, seed=9, hi=20)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    batch = Engine(bf, max_batch=4).run([Request(str(i), p, params) for i, p in enumerate(prompts)])
    assert Engine(bf, max_batch=1).cache.k.dtype == torch.bfloat16
    for p, out in zip(prompts, batch, strict=True):
        alone = _alone(bf, p, params)
        # bf16 rounding depends on batch shapes more than fp32: where a token differs, its logits must be
        # a near tie in the full-forward reference (top-2 gap below bf16 resolution of the logits).
        for k, (a, b) in enumerate(zip(out.token_ids, alone, strict=True)):
            if a != b:
                with torch.no_grad():
                    logits = bf(torch.tensor([p + alone[:k]]))[0, -1].float()
                top2 = logits.topk(2).values
                assert (top2[0] - top2[1]).item() < 0.1
                break
        assert len(out.token_ids) == 10


def test_training_mode_is_restored_and_eval_used(model):
    model.train()
    try:
        assert _alone(model, [1, 2, 3]) == _recompute(model.eval(), [1, 2, 3], 20)
        model.train()
        _alone(model, [1, 2, 3])
        assert model.training
    finally:
        model.eval()


def test_slot_compaction_under_random_arrivals(model):
    """Random arrivals, lengths and cancellations: every step's plan has the decoders in slots 0..D-1 and the
    prefillers in D..N-1 (so the decode read is a view), slots are unique, KV moves happen, and every output
    equals the request run alone."""
    rng = random.Random(11)
    prompts = _prompts(14, seed=12, hi=40)
    wants = [rng.randrange(1, 25) for _ in prompts]
    engine = Engine(model, max_batch=4, max_queue=20, prefill_chunk=8, max_num_batched_tokens=12)
    outs: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    pending = list(range(len(prompts)))
    cancel_at = {3: 4, 9: 2}  # request -> cancel once it has this many tokens
    schedule, moves = engine.scheduler.schedule, []

    def checked_schedule():
        plan = schedule()
        running = engine.scheduler.running
        D = sum(s.decoding for s in running)
        assert [s.slot for s in plan.decode] == list(range(D))
        assert sorted(s.slot for s in running if not s.decoding) == list(range(D, len(running)))
        moves.extend(plan.moves)
        return plan

    engine.scheduler.schedule = checked_schedule
    while pending or engine.has_unfinished():
        for _ in range(rng.randrange(0, 3)):
            if pending:
                i = pending.pop(0)
                engine.add_request(
                    Request(
                        str(i),
                        prompts[i],
                        SamplingParams(max_tokens=wants[i], temperature=0, ignore_eos=True),
                    )
                )
        for ev in engine.step():
            outs.setdefault(ev.request_id, []).extend(ev.token_ids)
            if ev.finish_reason:
                reasons[ev.request_id] = ev.finish_reason
            i = int(ev.request_id)
            if i in cancel_at and len(outs[ev.request_id]) >= cancel_at[i] and not ev.finish_reason:
                engine.abort(ev.request_id)
    for i, p in enumerate(prompts):
        ref = _alone(model, p, SamplingParams(max_tokens=wants[i], temperature=0, ignore_eos=True))
        if i in cancel_at and reasons[str(i)] == "cancelled":
            assert outs[str(i)] == ref[: len(outs[str(i)])]
        else:
            assert outs[str(i)] == ref and reasons[str(i)] == "length"
    assert "cancelled" in reasons.values()
    assert moves  # the compaction really relocated caches, and outputs stayed exact


def test_a_kv_pool_that_cannot_fit_is_refused(model):
    from llmforge.errors import ModelError

    with pytest.raises(ModelError, match="lower max_batch or max_model_len"):
        Engine(model, max_batch=10**9, max_model_len=256)
