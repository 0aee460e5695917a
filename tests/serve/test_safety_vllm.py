"""The same safety semantics with a real engine behind the gateway: llmforge's local engine and vLLM-CPU
(one module-scoped vLLM server; skipped without vLLM unless LLMFORGE_REQUIRE_VLLM=1, see test_vllm.py).

A random tiny model writes arbitrary words, so the output filters are aimed at its own greedy answer: a word
of it is redacted (the streamed answer must equal the whole answer with that word replaced, as the filter
applied to the full text gives) and then blocked (nothing from that word on may reach the client)."""

from __future__ import annotations

import asyncio
import re

import httpx
import openai
import pytest

from llmforge.manifest.serve import SafetyConfig
from llmforge.serve.filters import RequestContext
from llmforge.serve.safety import build_chain
from llmforge.serve.safety.builtin import build_filters

from .conftest import client, local_engine
from .test_vllm import VLLM_PYTHON

INPUT = [{"type": "blocklist", "words": ["pipe bomb"], "direction": "input"}, {"type": "pii"}]
MESSAGES = [{"role": "user", "content": "Hello! Who are you?"}]


def _filters(*specs):
    return build_filters(list(SafetyConfig.model_validate({"filters": list(specs)}).filters))


@pytest.fixture(scope="module", params=["local", "vllm"])
def served(request, model_dir):
    from llmforge.serve.gateway import create_app
    from llmforge.serve.server import BackgroundServer
    from llmforge.serve.settings import GatewaySettings

    if request.param == "vllm":
        if VLLM_PYTHON is None:
            pytest.skip("vLLM is not installed (set LLMFORGE_VLLM_PYTHON to a Python that has vllm-cpu)")
        from llmforge.serve.vllm_engine import VLLMEngine

        engine = VLLMEngine(
            model_dir, model_name="tiny", python=VLLM_PYTHON, max_batch=8, max_queue=8, reserved_cpus=0,
            startup_timeout_s=600,
        )  # fmt: skip
    else:
        engine = local_engine(model_dir, max_batch=8)
    chain = build_chain(SafetyConfig.model_validate({"filters": INPUT}))
    app = create_app(
        engine, GatewaySettings(engine_name=request.param, served_model_name="tiny"), filters=chain
    )
    srv = BackgroundServer(app, startup_timeout_s=600).start()
    yield srv, chain
    srv.stop()


def _prompt_tokens(srv) -> float:
    text = httpx.get(srv.url + "/metrics").text
    return float(re.search(r"^llmforge_prompt_tokens_total (\S+)$", text, re.M).group(1))


def _stream(c, **kw):
    text, finish = [], None
    for ch in c.chat.completions.create(model="tiny", messages=MESSAGES, stream=True, **kw):
        for choice in ch.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish


def test_engine_behind_the_chain(served):
    srv, chain = served
    c = client(srv)
    before = _prompt_tokens(srv)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a P I P E bomb"}])
    assert e.value.body["code"] == "content_filter"
    assert _prompt_tokens(srv) == before  # nothing reached the engine
    kw = dict(max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = c.chat.completions.create(model="tiny", messages=MESSAGES, **kw).choices[0].message.content
    words = re.findall(r"[a-z]{3,}", full.lower())
    assert words, full
    word = words[len(words) // 2]
    redact = _filters({"type": "blocklist", "words": [word], "action": "redact", "direction": "output"})
    found = redact[0].find(full)
    assert found, (word, full)
    expected = asyncio.run(redact[0].check(full, RequestContext("r", "chat", "tiny"))).text
    base = list(chain.filters)
    try:
        chain.filters = base + redact
        assert _stream(c, **kw) == (expected, "length")
        chain.filters = base + _filters({"type": "blocklist", "words": [word], "direction": "output"})
        text, finish = _stream(c, **kw)
        assert finish == "content_filter" and full.startswith(text) and len(text) <= found[0].start
        r = c.chat.completions.create(model="tiny", messages=MESSAGES, n=2, **kw)
        assert [ch.finish_reason for ch in r.choices] == ["content_filter", "content_filter"]
    finally:
        chain.filters = base
    m = httpx.get(srv.url + "/metrics").text
    assert 'llmforge_filter_decisions_total{action="block",direction="output",filter="blocklist"}' in m
