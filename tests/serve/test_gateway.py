"""The gateway through the official `openai` client against a real server (real local engine, tiny random
Llama, trained tokenizer) on a free loopback port."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from .conftest import client, local_engine, start_gateway

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]


def offline_greedy(model_dir, ids: list[int], max_tokens: int, **kw) -> tuple[str, list[int], str]:
    """The same request run offline through the synchronous engine: the reference the gateway must match."""
    import torch

    from llmforge.infer import Engine, Request, SamplingParams
    from llmforge.model import load_pretrained
    from llmforge.tokenizer.info import load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_pretrained(model_dir, device="cpu", dtype=torch.float32).eval()
    out = Engine(model, tok, max_batch=2).run(
        [Request("ref", ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw))]
    )[0]
    return out.text, out.token_ids, out.finish_reason


# ------------------------------------------------------------------------------------------------ happy paths


def test_models(real_server):
    c = client(real_server)
    models = c.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert c.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")


def test_chat_greedy_matches_offline_engine_and_transformers(real_server, model_dir, tokenizer):
    """The gateway renders the template, runs the engine and returns exactly what the engine produces
    offline — and what transformers' own template + greedy generate produce from the same checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    c = client(real_server)
    # ignore_eos: a random model often ends at once; 12 tokens through EOS make a comparison worth having
    r = c.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    ids = tokenizer.encode(tokenizer.render(CHAT, add_generation_prompt=True))
    text, out_ids, finish = offline_greedy(model_dir, ids, 12, ignore_eos=True)
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == finish == "length"
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(out_ids) == 12
    assert r.usage.total_tokens == len(ids) + 12

    hf_tok = AutoTokenizer.from_pretrained(str(model_dir))
    hf_ids = hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(hf_ids) == ids  # the same template, rendered the same way
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    gen = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
    assert gen == out_ids
    # and without ignore_eos the answer is that sequence cut at its first stop id
    plain = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0)
    stops = set(tokenizer.info.stop_ids)
    cut = next((i for i, t in enumerate(gen) if t in stops), None)
    assert plain.choices[0].finish_reason == ("stop" if cut is not None else "length")
    assert plain.usage.completion_tokens == (cut + 1 if cut is not None else 12)
    assert plain.choices[0].message.content == hf_tok.decode(gen[:cut], skip_special_tokens=True)


def test_chat_streaming_equals_non_streaming_with_usage(real_server):
    c = client(real_server)
    full = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=0)
    chunks = list(
        c.chat.completions.create(
            model="tiny",
            messages=CHAT,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(ch.usage is None for ch in chunks[:-1])


def test_raw_sse_ends_with_done(real_server):
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", real_server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    for e in events[:-1]:
        assert json.loads(e[6:])["object"] == "chat.completion.chunk"


def test_completions_text_tokens_and_lists(real_server, tokenizer, model_dir):
    c = client(real_server)
    r = c.completions.create(model="tiny", prompt="the model reads", max_tokens=8, temperature=0)
    ids = tokenizer.encode("the model reads")
    text, out_ids, finish = offline_greedy(model_dir, ids, 8)
    assert r.choices[0].text == text and r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(out_ids)
    # the same prompt as token ids, and a list of two prompts
    r2 = c.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert r2.choices[0].text == text
    r3 = c.completions.create(
        model="tiny", prompt=["the model reads", "hello world"], max_tokens=8, temperature=0
    )
    assert [ch.index for ch in r3.choices] == [0, 1] and r3.choices[0].text == text
    assert r3.usage.prompt_tokens == len(ids) + len(tokenizer.encode("hello world"))
    echo = c.completions.create(
        model="tiny", prompt="the model reads", max_tokens=8, temperature=0, echo=True
    )
    assert echo.choices[0].text == "the model reads" + text


def test_finish_reason_length_and_stop_string(real_server, tokenizer, model_dir):
    c = client(real_server)
    base = c.completions.create(
        model="tiny", prompt="hello", max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    assert base.choices[0].finish_reason == "length"
    assert base.usage.completion_tokens == 24
    full = base.choices[0].text
    # a stop string taken from the middle of the greedy text (spanning tokens, most likely)
    stop = full[5:8]
    assert len(stop) == 3 and stop.strip()
    r = c.completions.create(model="tiny", prompt="hello", max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]
    s = c.completions.create(
        model="tiny", prompt="hello", max_tokens=24, temperature=0, stop=stop, stream=True
    )
    assert "".join(ch.choices[0].text for ch in s) == full[: full.index(stop)]


def test_n_and_seeds(real_server):
    c = client(real_server)
    kw = dict(model="tiny", messages=CHAT, max_tokens=12, temperature=1.0, n=3, seed=1234)
    a = c.chat.completions.create(**kw)
    b = c.chat.completions.create(**kw)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices]
    assert len({ch.message.content for ch in a.choices}) > 1  # independent samples, not one repeated
    other = c.chat.completions.create(**{**kw, "seed": 99})
    assert [ch.message.content for ch in other.choices] != [ch.message.content for ch in a.choices]
    # usage: the prompt once, completions summed over the choices
    fixed = c.chat.completions.create(**{**kw, "extra_body": {"ignore_eos": True}})
    single = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=1)
    assert fixed.usage.prompt_tokens == single.usage.prompt_tokens
    assert fixed.usage.completion_tokens == 3 * 12
    # streaming n > 1 carries every index and the same texts
    chunks = list(c.chat.completions.create(**kw, stream=True))
    texts = {i: "" for i in range(3)}
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] += choice.delta.content or ""
    assert [texts[i] for i in range(3)] == [ch.message.content for ch in a.choices]


def test_logprobs_chat_and_completions(real_server, tokenizer):
    c = client(real_server)
    r = c.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 3
        # greedy: the chosen token is the most likely one, and alternatives come most likely first
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)
        assert [a.logprob for a in t.top_logprobs] == sorted(
            (a.logprob for a in t.top_logprobs), reverse=True
        )
        assert t.logprob <= 0
    # every completion token has an entry, the stop token too (as usage counts it); the text skips it
    specials = {"</s>", "<|im_end|>"}
    assert "".join(t.token for t in content if t.token not in specials) == r.choices[0].message.content
    cr = c.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0, logprobs=2)
    lp = cr.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    none = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
    assert none.choices[0].logprobs is None


def test_extensions_and_ignored_params(real_server):
    c = client(real_server)
    r = c.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
        max_completion_tokens=3,
        user="someone",
        metadata={"k": "v"},
        presence_penalty=0.5,
        frequency_penalty=0.5,
        top_p=0.9,
        response_format={"type": "text"},
        extra_body={"top_k": 5},
    )
    assert r.usage.completion_tokens <= 3


def test_default_max_tokens_fills_the_context(model_dir):
    srv = start_gateway(local_engine(model_dir, max_batch=2, max_model_len=64), max_tokens=10_000)
    try:
        r = client(srv).chat.completions.create(
            model=srv.gateway.model_name, messages=CHAT, extra_body={"ignore_eos": True}
        )
        assert r.choices[0].finish_reason == "length"
        assert r.usage.total_tokens == 64
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------------ errors


def _post(srv, path, body=None, raw: bytes | None = None, headers=None):
    h = {"content-type": "application/json", **(headers or {})}
    return httpx.post(
        srv.url + path, content=raw if raw is not None else json.dumps(body), headers=h, timeout=30
    )


def _err(resp, status, code=None, param=None):
    assert resp.status_code == status, resp.text
    e = resp.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    if code is not None:
        assert e["code"] == code
    if param is not None:
        assert e["param"] == param
    return e


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny", "messages": CHAT, "max_tokens": "5"}, "max_tokens"),
        ({"model": "tiny", "messages": CHAT, "max_tokens": 1.5}, "max_tokens"),
        ({"model": "tiny", "messages": CHAT, "temperature": 3}, "temperature"),
        ({"model": "tiny", "messages": CHAT, "stream": "yes"}, "stream"),
        ({"model": "tiny", "messages": CHAT, "n": 0}, "n"),
        ({"model": "tiny", "messages": CHAT, "n": 99}, "n"),
        ({"model": "tiny", "messages": CHAT, "max_tokens": 10**30}, "max_tokens"),
        ({"model": "tiny", "messages": CHAT, "max_tokens": 5000}, "max_tokens"),
        ({"model": "tiny", "messages": CHAT, "frobnicate": 1}, "frobnicate"),
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny"}, "messages"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "messages.[0].role"),
        ({"model": "tiny", "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "tiny", "messages": CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": "tiny", "messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
        ({"model": "tiny", "messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
        ({"model": "tiny", "messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"model": "tiny", "messages": CHAT, "logit_bias": {"5": 10}}, "logit_bias"),
        ({"model": "gpt-9", "messages": CHAT}, "model"),
    ],
)
def test_invalid_requests_are_400_naming_the_param(real_server, body, param):
    _err(_post(real_server, "/v1/chat/completions", body), 400, param=param)


def test_invalid_bodies(real_server):
    _err(_post(real_server, "/v1/chat/completions", raw=b"{not json"), 400, code="invalid_json")
    _err(
        _post(real_server, "/v1/chat/completions", raw=b'{"messages": "\xff\xfe"}'), 400, code="invalid_json"
    )
    _err(_post(real_server, "/v1/chat/completions", raw=b"[1, 2]"), 400, code="invalid_json")
    _err(
        _post(
            real_server, "/v1/chat/completions", raw=b'{"model": "tiny", "messages": [], "temperature": NaN}'
        ),
        400,
    )
    _err(_post(real_server, "/v1/completions", {"model": "tiny", "prompt": [10**9]}), 400, param="prompt")
    _err(
        _post(real_server, "/v1/completions", {"model": "tiny", "prompt": "x", "suffix": "y"}),
        400,
        param="suffix",
    )
    _err(_post(real_server, "/v1/nope", {}), 404)
    assert httpx.get(real_server.url + "/v1/chat/completions").status_code == 405


def test_openai_client_errors(real_server):
    c = client(real_server)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=CHAT, extra_body={"bogus": True})
    assert e.value.body["param"] == "bogus"


def test_context_length_exceeded(real_server, tokenizer):
    c = client(real_server)
    long = " ".join(["colours"] * 400)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": long}], max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    n = len(tokenizer.encode("hello"))
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="hello", max_tokens=256 - n + 1)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    ok = c.completions.create(
        model="tiny", prompt="hello", max_tokens=256 - n, extra_body={"ignore_eos": True}
    )
    assert ok.usage.total_tokens == 256


def test_body_size_413_before_and_while_reading(model_dir):
    srv = start_gateway(local_engine(model_dir, max_batch=1), max_body_bytes=2_000)
    try:
        big = {"model": srv.gateway.model_name, "messages": [{"role": "user", "content": "x" * 5000}]}
        _err(_post(srv, "/v1/chat/completions", big), 413, code="request_too_large")

        def chunks():  # no Content-Length: counted while reading
            for _ in range(10):
                yield b" " * 1000

        r = httpx.post(srv.url + "/v1/chat/completions", content=chunks(), timeout=30)
        _err(r, 413, code="request_too_large")
        assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        srv.stop()


def test_auth_on_every_route_but_health(model_dir, monkeypatch):
    monkeypatch.setenv("MY_KEY", "s3cret")
    from llmforge.manifest.serve import ServeSection
    from llmforge.serve.gateway import create_app
    from llmforge.serve.server import BackgroundServer
    from llmforge.serve.settings import GatewaySettings

    settings = GatewaySettings.from_section(ServeSection(api_key_env="MY_KEY", served_model_name="tiny"))
    assert settings.api_key == "s3cret"
    srv = BackgroundServer(create_app(local_engine(model_dir, max_batch=1), settings)).start()
    try:
        routes = [
            ("GET", "/v1/models", None),
            ("GET", "/v1/models/tiny", None),
            ("GET", "/metrics", None),
            ("POST", "/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 1}),
            ("POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1}),
            ("GET", "/nope", None),
        ]
        for method, path, body in routes:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"},
                            {"authorization": "Bearer s3cre"}, {"authorization": "Basic s3cret"}):  # fmt: skip
                r = httpx.request(method, srv.url + path, json=body, headers=headers, timeout=30)
                _err(r, 401, code="invalid_api_key")
            ok = httpx.request(
                method, srv.url + path, json=body, headers={"authorization": "Bearer s3cret"}, timeout=30
            )
            assert ok.status_code == (404 if path == "/nope" else 200), (path, ok.text)
        assert httpx.get(srv.url + "/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            client(srv, api_key="wrong").models.list()
        assert client(srv, api_key="s3cret").models.list().data[0].id == "tiny"
    finally:
        srv.stop()


def test_llmforge_api_key_env_and_unset_named_variable(monkeypatch):
    from llmforge.errors import UserInputError
    from llmforge.manifest.serve import ServeSection
    from llmforge.serve.settings import GatewaySettings

    monkeypatch.setenv("LLMFORGE_API_KEY", "k1")
    assert GatewaySettings.from_section(ServeSection()).api_key == "k1"
    monkeypatch.delenv("LLMFORGE_API_KEY")
    assert GatewaySettings.from_section(ServeSection()).api_key is None
    with pytest.raises(UserInputError, match="NOT_SET_VAR"):
        GatewaySettings.from_section(ServeSection(api_key_env="NOT_SET_VAR"))


def test_429_when_the_queue_is_full(model_dir):
    srv = start_gateway(local_engine(model_dir, max_batch=1, max_queue=0))
    try:
        c = client(srv)
        name = srv.gateway.model_name
        long = c.completions.create(
            model=name, prompt="hello", max_tokens=200, stream=True, extra_body={"ignore_eos": True}
        )
        first = next(iter(long))  # the only slot is now busy
        assert first.choices
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=name, prompt="hello", max_tokens=2)
        assert e.value.code == "queue_full"
        long.close()
    finally:
        srv.stop()


def test_503_while_starting_and_after_a_failed_start(tokenizer):
    from llmforge.serve.gateway import create_app
    from llmforge.serve.server import BackgroundServer
    from llmforge.serve.settings import GatewaySettings

    from .fake_engine import FakeEngine

    app = create_app(FakeEngine(tokenizer, start_delay=2.0), GatewaySettings())
    srv = BackgroundServer(app, wait_ready=False).start()
    try:
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "starting"
        r = _post(srv, "/v1/completions", {"prompt": "hi"})
        _err(r, 503, code="engine_starting")
        assert r.headers["retry-after"]
    finally:
        srv.stop()
    app = create_app(FakeEngine(tokenizer, start_error="weights are corrupt"), GatewaySettings())
    srv = BackgroundServer(app, wait_ready=False).start()
    try:
        import time

        time.sleep(0.3)
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and "weights are corrupt" in h.json()["error"]
        _err(_post(srv, "/v1/completions", {"prompt": "hi"}), 503, code="engine_failed")
    finally:
        srv.stop()


def test_metrics(real_server):
    c = client(real_server)
    list(c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, stream=True))
    _post(real_server, "/v1/chat/completions", {"model": "tiny"})
    text = httpx.get(real_server.url + "/metrics").text
    for name in (
        'llmforge_requests_total{route="/v1/chat/completions",status="200"}',
        'llmforge_requests_total{route="/v1/chat/completions",status="400"}',
        "llmforge_prompt_tokens_total",
        "llmforge_completion_tokens_total",
        "llmforge_time_to_first_token_seconds_bucket",
        "llmforge_inter_token_latency_seconds_bucket",
        "llmforge_queue_depth",
        "llmforge_active_sequences",
    ):
        assert name in text, name
    ttft = [ln for ln in text.splitlines() if ln.startswith("llmforge_time_to_first_token_seconds_count")]
    assert float(ttft[0].split()[-1]) >= 1
