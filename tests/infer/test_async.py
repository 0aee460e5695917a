"""LocalEngine: the asyncio bridge the gateway uses — streaming, cancellation, limits, shutdown, load_engine."""

from __future__ import annotations

import asyncio

import pytest

from llmforge.infer import (
    ContextLengthExceeded,
    Engine,
    EngineNotReady,
    EngineOverloaded,
    LocalEngine,
    Request,
    SamplingParams,
    load_engine,
)
from llmforge.model import save_pretrained

from .conftest import make_model, make_tokenizer_dir

LONG = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)


def _local(model, tokenizer, **kw) -> LocalEngine:
    return LocalEngine(Engine(model, tokenizer, **kw), model_name="tiny")


async def _collect(eng, prompt, params, rid):
    return [ev async for ev in eng.generate(prompt, params, rid)]


async def _wait_for(pred, timeout=10.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.005)


def test_streaming_equals_the_synchronous_engine(model, tokenizer):
    prompts = [tokenizer.encode("hello there"), tokenizer.encode("a b c d e f"), [1, 40, 41]]
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=4, logprobs=2, ignore_eos=True)
    ref = Engine(model, tokenizer, max_batch=4).run(
        [Request(str(i), p, params) for i, p in enumerate(prompts)]
    )

    async def main():
        eng = _local(model, tokenizer, max_batch=4)
        with pytest.raises(EngineNotReady):
            await anext(eng.generate(prompts[0], params, "early"))
        await eng.start()
        assert eng.healthy()
        streams = await asyncio.gather(*(_collect(eng, p, params, str(i)) for i, p in enumerate(prompts)))
        await eng.shutdown()
        assert not eng.healthy()
        return streams

    for events, r in zip(asyncio.run(main()), ref, strict=True):
        assert [t for e in events for t in e.token_ids] == r.token_ids
        assert "".join(e.text for e in events) == r.text
        assert [lp.logprob for e in events for lp in e.logprobs] == [lp.logprob for lp in r.logprobs]
        assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])
        assert events[-1].completion_tokens == 12 and events[-1].prompt_tokens == len(r.prompt_token_ids)


def test_closing_the_stream_or_cancelling_the_task_frees_the_slot(model, tokenizer):
    async def main():
        eng = _local(model, tokenizer, max_batch=4)
        await eng.start()
        # 1: the consumer stops iterating (aclose, as a `break` out of `async for` does)
        gen = eng.generate([1, 5, 6], LONG, "a")
        await anext(gen)
        assert eng.num_running == 1
        await gen.aclose()
        await _wait_for(lambda: eng.num_running == 0)
        # 2: the consuming task is cancelled (a client that disconnects)
        started = asyncio.Event()

        async def consume():
            async for _ in eng.generate([1, 7, 8], LONG, "b"):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        assert eng.num_running == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _wait_for(lambda: eng.num_running == 0)
        # 3: cancel() by id from elsewhere: the stream ends with finish_reason "cancelled"
        gen = eng.generate([1, 9], LONG, "c")
        await anext(gen)
        eng.cancel("c")
        events = [ev async for ev in gen]
        assert events[-1].finish_reason == "cancelled"
        assert eng.stats()["aborted"] == 3
        await eng.shutdown()

    asyncio.run(main())


def test_limits_raise_on_the_first_anext(model, tokenizer):
    async def main():
        eng = _local(model, tokenizer, max_batch=1, max_queue=1, max_model_len=32)
        await eng.start()
        with pytest.raises(ContextLengthExceeded):
            await anext(eng.generate([1] * 30, SamplingParams(max_tokens=5), "long"))
        a = eng.generate([1, 2], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), "a")
        b = eng.generate([1, 3], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), "b")
        await anext(a)
        task = asyncio.create_task(anext(b))  # queued behind a
        await asyncio.sleep(0)
        with pytest.raises(EngineOverloaded):
            await anext(eng.generate([1, 4], SamplingParams(max_tokens=4), "c"))
        await a.aclose()
        assert (await task).request_id == "b"
        await b.aclose()
        await eng.shutdown()

    asyncio.run(main())


def test_shutdown_finishes_in_flight_then_aborts_the_rest(tokenizer):
    model = make_model(max_position_embeddings=4096)  # room for a generation far longer than the grace period

    async def main():
        eng = _local(model, tokenizer, max_batch=2)
        await eng.start()
        endless = asyncio.create_task(
            _collect(eng, [1, 3], SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True), "e")
        )
        await _wait_for(lambda: eng.num_running == 1)
        short = asyncio.create_task(
            _collect(eng, [1, 2], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), "s")
        )
        await asyncio.sleep(0)  # the short request is in flight when shutdown begins
        await eng.shutdown(timeout=1.0)
        s, e = await short, await endless
        assert s[-1].finish_reason == "length"  # finished within the grace period
        assert e[-1].finish_reason == "abort" and len([t for ev in e for t in ev.token_ids]) < 4000
        assert eng.num_running == 0
        with pytest.raises(EngineNotReady, match=r"starting|shutting down"):
            await anext(eng.generate([1], LONG, "late"))

    asyncio.run(main())


def test_load_engine_from_a_checkpoint_directory(model, tmp_path):
    d = tmp_path / "ckpt"
    save_pretrained(model, d)
    make_tokenizer_dir(d)
    eng = load_engine(d, device="auto", dtype="auto", max_batch=2, max_model_len=64)
    assert (eng.model_name, eng.max_model_len) == ("ckpt", 64)
    prompt = eng.tokenizer.encode("hi")

    async def main():
        with pytest.raises(EngineNotReady):
            await anext(eng.generate(prompt, LONG, "x"))
        await eng.start()
        events = await _collect(
            eng, prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), "x"
        )
        await eng.shutdown()
        return events

    events = asyncio.run(main())
    ref = Engine(model, eng.tokenizer, max_batch=1).run(
        [Request("x", prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))]
    )[0]
    assert [t for e in events for t in e.token_ids] == ref.token_ids


def test_a_failing_step_fails_its_requests_not_the_server(model, tokenizer):
    from llmforge.infer import EngineError

    engine = Engine(model, tokenizer, max_batch=2)
    real = engine._forward
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated device error")
        return real(*a, **k)

    engine._forward = flaky

    async def main():
        eng = LocalEngine(engine, model_name="tiny")
        await eng.start()
        with pytest.raises(EngineError, match="simulated device error"):
            await _collect(eng, [1, 2, 3], LONG, "a")
        assert eng.healthy() and eng.num_running == 0 and eng.stats()["step_errors"] == 1
        events = await _collect(
            eng, [1, 2, 3], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), "b"
        )
        await eng.shutdown()
        return events

    assert asyncio.run(main())[-1].finish_reason == "length"


def test_the_contract_names_import_without_torch():
    import subprocess
    import sys

    code = (
        "import sys; from llmforge.infer import SamplingParams, TokenLogprob, GenerationEvent, EngineError, "
        "EngineOverloaded, ContextLengthExceeded, EngineNotReady, AsyncEngine, LocalEngine, load_engine; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
