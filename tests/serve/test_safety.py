"""The safety filter chain (serve.safety) through the official `openai` client against a real gateway on
loopback: block / redact / flag in both directions, streaming with the blocked phrase and PII values split at
every chunk boundary, n > 1, custom callables, a classifier backed by a second gateway, failures and timeouts
(fail closed and open), /metrics; plus the chain's own units (evasion-aware blocklist, the hold-back)."""

from __future__ import annotations

import asyncio
import logging

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmforge.data.pii import KINDS, PIIScrubber
from llmforge.errors import ManifestError, UserInputError
from llmforge.manifest.serve import PII_KINDS, SafetyConfig
from llmforge.serve.filters import ContentFiltered, FilterChain, RequestContext
from llmforge.serve.safety import build_chain

from . import safety_fixtures as fx
from .conftest import client, local_engine

PHRASE = "pipe bomb"
BLOCK_REPLY = "Sure, here it is: how to build a pipe bomb at home, step by step."
PII_REPLY = "Mail alice.smith@example.org or call +44 20 7946 0958; card 4111 1111 1111 1111, thanks."
BENIGN_REPLY = "Hello there, nice to meet you. The sky is blue."
LONG_REPLY = " ".join([BENIGN_REPLY] * 4)
SCRUB = PIIScrubber(dict.fromkeys(KINDS, "redact"))  # the data stage's scrubber: the reference redaction
FX = "tests.serve.safety_fixtures"


def reply(prompt: str, index: int) -> str:
    if "colours" in prompt:
        return BLOCK_REPLY
    if "green" in prompt:
        return PII_REPLY
    if "world" in prompt:
        return LONG_REPLY
    if "blue" in prompt:  # n > 1: each choice its own answer
        return [BENIGN_REPLY, BLOCK_REPLY, PII_REPLY][index % 3]
    return BENIGN_REPLY


def chain_of(*filters, log_text=False) -> FilterChain:
    return build_chain(SafetyConfig.model_validate({"filters": list(filters), "log_text": log_text}))


DEFAULT = [
    {"type": "blocklist", "words": [PHRASE, "nerve agent"]},
    {"type": "pii"},
    {"type": "custom", "callable": f"{FX}:words", "direction": "input"},  # unnamed: "custom"
    {"type": "custom", "callable": f"{FX}:async_flag", "direction": "input", "name": "hello-flag"},
    {"type": "custom", "callable": f"{FX}:recorder", "direction": "input", "name": "recorder"},
]


class Gateway:
    def __init__(self, tokenizer, filters, reply_fn=reply, **settings):
        from llmforge.serve.gateway import create_app
        from llmforge.serve.server import BackgroundServer
        from llmforge.serve.settings import GatewaySettings

        self.engine = fx.ScriptedEngine(tokenizer, reply_fn)
        chain = filters if isinstance(filters, FilterChain) else chain_of(*filters)
        self.srv = BackgroundServer(
            create_app(self.engine, GatewaySettings(**settings), filters=chain)
        ).start()
        self.url = self.srv.url
        self.client = client(self.srv)

    def metrics(self) -> dict[tuple, float]:
        text = httpx.get(self.url + "/metrics").text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name.startswith("llmforge_filter"):
                    out[(s.name, *sorted(s.labels.items()))] = s.value
        return out

    def count(self, metric, **labels) -> float:
        key = (f"llmforge_filter_{metric}_total", *sorted(labels.items()))
        return self.metrics().get(key, 0.0)

    def stop(self):
        self.srv.stop()


@pytest.fixture(scope="module")
def gw(tokenizer):
    g = Gateway(tokenizer, DEFAULT)
    yield g
    g.stop()


def chat(g, content, **kw):
    kw.setdefault("max_tokens", 200)
    return g.client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": content}], **kw
    )


def stream_chat(g, content, chunk=1, n=1, deltas=None):
    """Every choice's streamed text and finish reason; `chunk` characters per engine token."""
    texts: dict[int, list[str]] = deltas if deltas is not None else {}
    finish: dict[int, str | None] = {}
    stream = chat(g, content, stream=True, seed=chunk, n=n)
    for ev in stream:
        for c in ev.choices:
            if c.delta.content:
                texts.setdefault(c.index, []).append(c.delta.content)
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return {i: "".join(texts.get(i, [])) for i in range(n)}, finish


# ------------------------------------------------------------------------------------------------ units


def test_pii_kinds_match_the_data_stage():
    assert tuple(PII_KINDS) == KINDS


@pytest.mark.parametrize(
    "text",
    [
        "how to make a pipe bomb",
        "PIPE BOMB",
        "Pipe-Bomb!",
        "pipebomb",
        "ｐｉｐｅ ｂｏｍｂ",  # fullwidth (NFKC)
        "p i p e  b o m b",  # spaced out
        "p.i.p.e.b.o.m.b",
        "pі\u200bpe bоmb",  # Cyrillic і / о and a zero-width space
        "p\u200ci\u200dp\u2060e bomb",
        "p1pe b0mb",  # leetspeak
        "pípe bömb",  # diacritics
        "p̷i̷p̷e̷ b̷o̷m̷b̷",  # combining overlay
    ],
)
def test_blocklist_catches_evasions(text):
    chain = chain_of({"type": "blocklist", "words": [PHRASE]})
    with pytest.raises(ContentFiltered):
        asyncio.run(chain.check_input(RequestContext("r", "chat", "m"), [text]))


@pytest.mark.parametrize(
    "text",
    ["the pipeline bombed at the box office", "a pipe, and then a bomber jacket", "pipes bombs", "bomb"],
)
def test_blocklist_spares_look_alikes(text):
    chain = chain_of({"type": "blocklist", "words": [PHRASE]})
    assert asyncio.run(chain.check_input(RequestContext("r", "chat", "m"), [text])) == [text]


def test_redaction_maps_back_to_the_original_characters():
    chain = chain_of({"type": "blocklist", "words": ["bad"], "action": "redact", "replacement": "[x]"})
    ctx = RequestContext("r", "chat", "m")
    out = asyncio.run(chain.check_input(ctx, ["so Ｂ\u200bａｄ, really b a d; badge ok"]))
    assert out == ["so [x], really [x]; badge ok"]


async def _stream(chain, text, sizes):
    """Push ``text`` in pieces of the given sizes (cycled); (released text, blocked)."""
    out = chain.output(RequestContext("r", "chat", "m"), 0)
    got, i, k = [], 0, 0
    while i < len(text):
        n = sizes[k % len(sizes)]
        v = await out.push(text[i : i + n])
        got.append(v.text)
        i, k = i + n, k + 1
        if v.blocked:
            return "".join(got), True
    v = await out.finish()
    got.append(v.text)
    return "".join(got), v.blocked


def test_blocked_phrase_never_leaks_at_any_split():
    chain = chain_of({"type": "blocklist", "words": [PHRASE]})
    start = BLOCK_REPLY.index(PHRASE)
    splits = [[1], [2], [3], [5], [7]] + [[cut, 10_000] for cut in range(1, len(BLOCK_REPLY))]
    for sizes in splits:
        released, blocked = asyncio.run(_stream(chain, BLOCK_REPLY, sizes))
        assert blocked, sizes
        # nothing of the phrase (not even its first letter) reached the client
        assert BLOCK_REPLY.startswith(released) and len(released) <= start, (sizes, released)


def test_pii_redacted_whole_at_any_split():
    chain = chain_of({"type": "pii"})
    expected = SCRUB(PII_REPLY).text
    assert expected.count("<") == 3  # email, phone, card
    for sizes in [[1], [2], [3], [4], [9]] + [[cut, 10_000] for cut in range(1, len(PII_REPLY))]:
        released, blocked = asyncio.run(_stream(chain, PII_REPLY, sizes))
        assert not blocked and released == expected, (sizes, released)


def test_pii_block_never_leaks_a_digit():
    chain = chain_of({"type": "pii", "action": "block", "kinds": ["phone"]})
    text = "Our office: +44 20 7946 0958 (9-5)."
    for sizes in [[1]] + [[cut, 10_000] for cut in range(1, len(text))]:
        released, blocked = asyncio.run(_stream(chain, text, sizes))
        assert blocked and released in ("", "Our office: "[: len(released)]), (sizes, released)
        assert not any(ch.isdigit() for ch in released)


def test_output_redaction_and_chain_order():
    # overlapping matches go to the earlier filter; both redact
    chain = chain_of(
        {"type": "blocklist", "patterns": [r"alice\.smith"], "action": "redact", "replacement": "[name]"},
        {"type": "pii", "kinds": ["email"]},
    )
    released, blocked = asyncio.run(
        _stream(chain, "write to alice.smith@example.org or bob@example.org", [1])
    )
    assert not blocked and released == "write to [name]@example.org or <EMAIL>"


# ------------------------------------------------------------------------------------------------ manifest


def test_legacy_keys_become_filters():
    cfg = SafetyConfig.model_validate(
        {"blocklist": [r"\bsecret\b"], "pii": "block", "custom": [f"{FX}:words"]}
    )
    assert [(f.type, getattr(f, "action", None)) for f in cfg.filters] == [
        ("blocklist", "block"),
        ("pii", "block"),
        ("custom", None),
    ]
    assert cfg.filters[0].patterns == [r"\bsecret\b"]
    assert SafetyConfig.model_validate({"pii": "off"}).filters == []


def test_manifest_errors_name_the_key(tmp_path):
    from llmforge import manifest

    def problems(safety):
        import yaml

        p = tmp_path / "llmforge.yaml"
        p.write_text(yaml.safe_dump({"project": {"name": "x"}, "serve": {"safety": safety}}))
        with pytest.raises(ManifestError) as e:
            manifest.load(p)
        return str(e.value)

    assert "classifier_model was replaced" in problems({"classifier_model": "guard"})
    msg = problems({"filters": [{"type": "blocklist", "words": ["x"]}, {"type": "regex"}]})
    assert "serve.safety.filters" in msg and "regex" in msg
    assert "not a valid regex" in problems({"filters": [{"type": "blocklist", "patterns": ["(unclosed"]}]})
    assert "unknown PII kind" in problems({"filters": [{"type": "pii", "kinds": ["passport"]}]})
    assert "callable" in problems({"filters": [{"type": "custom", "callable": "no colon"}]})


def test_bad_custom_callable_is_a_clear_error():
    with pytest.raises(UserInputError, match=r"filters\[0\]\.callable: cannot import module 'nope_mod'"):
        chain_of({"type": "custom", "callable": "nope_mod:f"})
    with pytest.raises(UserInputError, match="has no attribute 'missing'"):
        chain_of({"type": "custom", "callable": f"{FX}:missing"})


def test_explain_lists_the_chain_readably():
    from llmforge.manifest import explain

    rows = {r[0]: r for r in explain("serve")}
    assert rows["serve.safety.filters"][1] == "list[FilterConfig]"
    assert "serve.safety.probe" in rows and "serve.safety.log_text" in rows


# ------------------------------------------------------------------------------------------------ through HTTP


def test_input_block_is_a_400_and_never_reaches_the_engine(gw):
    before = len(gw.engine.prompts)
    n0 = gw.count("decisions", filter="blocklist", direction="input", action="block")
    for text in ["Tell me about the PIPE-BOMB", "ｐｉｐｅ ｂｏｍｂ please", "p i p e b o m b"]:
        with pytest.raises(openai.BadRequestError) as e:
            chat(gw, text)
        assert e.value.status_code == 400 and e.value.body["code"] == "content_filter"
        assert "blocklist" in e.value.body["message"] and PHRASE not in e.value.body["message"].lower()
    with pytest.raises(openai.BadRequestError) as e:  # completions too, any prompt of several
        gw.client.completions.create(model="scripted", prompt=["hello", "a pipe bomb"], max_tokens=5)
    assert e.value.body["code"] == "content_filter"
    with pytest.raises(openai.BadRequestError):  # and a system message
        gw.client.chat.completions.create(
            model="scripted",
            messages=[{"role": "system", "content": "nerve agent"}, {"role": "user", "content": "hi"}],
        )
    assert len(gw.engine.prompts) == before
    assert gw.count("decisions", filter="blocklist", direction="input", action="block") == n0 + 5


def test_input_redaction_is_what_the_engine_and_later_filters_see(gw):
    fx.SEEN.clear()
    r = chat(gw, "my mail is bob.jones@example.com and darn it")
    assert r.choices[0].finish_reason == "stop"
    # the recorder runs after pii and `words`: it sees the redacted text
    assert fx.SEEN == [("my mail is <EMAIL> and d*rn it", "input", 0, "chat")]
    assert "bob" not in gw.engine.prompts[-1] and "jones" not in gw.engine.prompts[-1]
    assert gw.count("decisions", filter="pii", direction="input", action="redact") >= 1
    assert gw.count("decisions", filter="custom", direction="input", action="redact") >= 1


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8])
def test_streamed_output_block_and_redact(gw, chunk):
    texts, finish = stream_chat(gw, "name three colours", chunk=chunk)
    start = BLOCK_REPLY.index(PHRASE)
    assert finish == {0: "content_filter"}
    assert BLOCK_REPLY.startswith(texts[0]) and len(texts[0]) <= start
    texts, finish = stream_chat(gw, "green things", chunk=chunk)
    assert finish == {0: "stop"} and texts[0] == SCRUB(PII_REPLY).text
    # prose is released as it streams, about a word behind the engine (the filters hold back only what may
    # still become a match: here the unfinished last word)
    deltas: dict[int, list[str]] = {}
    texts, finish = stream_chat(gw, "hello world", chunk=chunk, deltas=deltas)
    assert texts[0] == LONG_REPLY and len(deltas[0]) >= len(LONG_REPLY) // (8 * chunk)
    assert len(deltas[0][0]) <= len("Hello") + chunk


def test_non_streamed_output_block_and_redact(gw):
    n0 = gw.count("decisions", filter="blocklist", direction="output", action="block")
    r = chat(gw, "name three colours")
    assert r.choices[0].finish_reason == "content_filter" and PHRASE not in r.choices[0].message.content
    assert gw.count("decisions", filter="blocklist", direction="output", action="block") == n0 + 1
    r = gw.client.completions.create(model="scripted", prompt="green", max_tokens=200)
    assert r.choices[0].text == SCRUB(PII_REPLY).text and r.choices[0].finish_reason == "stop"


def test_a_blocked_output_cancels_the_generation(gw):
    chat(gw, "name three colours", stream=False)
    assert gw.engine.cancelled, "the engine kept generating an answer the filter had ended"


def test_n_choices_are_filtered_independently(gw):
    texts, finish = stream_chat(gw, "blue", chunk=2, n=3)
    assert finish == {0: "stop", 1: "content_filter", 2: "stop"}
    assert texts[0] == BENIGN_REPLY and texts[2] == SCRUB(PII_REPLY).text
    assert PHRASE not in texts[1]
    r = chat(gw, "blue", n=3)
    assert [c.finish_reason for c in r.choices] == ["stop", "content_filter", "stop"]
    assert r.choices[2].message.content == SCRUB(PII_REPLY).text


def test_logprobs_are_refused_when_outputs_are_filtered(gw, tokenizer):
    # each log-prob names its raw token: returned, they would show what the output filters redacted or cut
    with pytest.raises(openai.BadRequestError) as e:
        chat(gw, "green", logprobs=True)
    assert e.value.body["param"] == "logprobs" and "safety filters" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        gw.client.completions.create(model="scripted", prompt="green", logprobs=1, max_tokens=4)
    g = Gateway(tokenizer, [{"type": "pii", "direction": "input"}])  # input-only filters: logprobs are fine
    try:
        r = g.client.completions.create(model="scripted", prompt="hello", logprobs=1, max_tokens=4)
        assert r.choices[0].logprobs is not None
    finally:
        g.stop()


def test_flag_lets_the_text_through_and_counts(gw):
    n0 = gw.count("decisions", filter="hello-flag", direction="input", action="flag")
    r = chat(gw, "Hello, friend")
    assert r.choices[0].message.content == BENIGN_REPLY
    assert gw.count("decisions", filter="hello-flag", direction="input", action="flag") == n0 + 1


def test_decisions_are_logged_without_the_text(gw, caplog):
    with caplog.at_level(logging.INFO, logger="llmforge.serve.safety"):
        with pytest.raises(openai.BadRequestError):
            chat(gw, "where to buy a nerve agent")
        chat(gw, "mail me at carol@example.net")
    lines = [r.getMessage() for r in caplog.records if r.name == "llmforge.serve.safety"]
    assert any("blocklist: block input" in m for m in lines), lines
    assert any("pii: redact input" in m and "email" in m for m in lines), lines
    assert not any("nerve" in m or "carol" in m for m in lines), lines


def test_log_text_setting_shows_the_text(tokenizer, caplog):
    g = Gateway(tokenizer, chain_of({"type": "pii"}, log_text=True))
    try:
        with caplog.at_level(logging.INFO, logger="llmforge.serve.safety"):
            chat(g, "mail me at carol@example.net")
        assert any("carol@example.net" in r.getMessage() for r in caplog.records)
    finally:
        g.stop()


@pytest.mark.parametrize(
    ("fn", "timeout_s", "reason"),
    [
        ("raises", 5.0, "error"),
        ("slow", 0.2, "timeout"),
        ("slow_sync", 0.2, "timeout"),
        ("not_a_decision", 5, "error"),
    ],
)
def test_failures_fail_closed_or_open(tokenizer, fn, timeout_s, reason):
    filters = [
        {"type": "custom", "callable": f"{FX}:{fn}", "timeout_s": timeout_s, "name": "closed"},
        {"type": "custom", "callable": f"{FX}:{fn}", "timeout_s": timeout_s, "name": "open", "on_error": "fail_open"},
    ]  # fmt: skip
    closed = Gateway(tokenizer, [filters[0]])
    opened = Gateway(tokenizer, [filters[1]])
    try:
        with pytest.raises(openai.BadRequestError) as e:
            chat(closed, "hello")
        assert (
            e.value.body["code"] == "content_filter"
            and f"filter {reason}, failing closed" in e.value.body["message"]
        )
        assert closed.count("failures", filter="closed", direction="input", reason=reason) == 1
        r = chat(opened, "hello")
        assert r.choices[0].message.content == BENIGN_REPLY and r.choices[0].finish_reason == "stop"
        # output direction: the answer (checked once it is complete) passes the input, fails at the end
        assert opened.count("failures", filter="open", direction="output", reason=reason) == 1
    finally:
        closed.stop()
        opened.stop()


def test_custom_output_filter_judges_the_whole_answer(tokenizer):
    g = Gateway(tokenizer, [{"type": "custom", "callable": f"{FX}:words", "direction": "output"}],
                lambda p, i: "darn, that is forbidden" if "red" in p else "oh darn, hello")  # fmt: skip
    try:
        texts, finish = stream_chat(g, "hello", chunk=2)
        assert texts == {0: "oh d*rn, hello"} and finish == {0: "stop"}
        texts, finish = stream_chat(g, "red", chunk=2)
        assert texts == {0: ""} and finish == {0: "content_filter"}
    finally:
        g.stop()


def test_output_failure_fails_closed_with_content_filter(tokenizer):
    g = Gateway(tokenizer, [{"type": "custom", "callable": f"{FX}:raises", "direction": "output"}])
    try:
        texts, finish = stream_chat(g, "hello", chunk=3)
        assert finish == {0: "content_filter"} and texts == {0: ""}
        assert g.count("decisions", filter="custom", direction="output", action="block") == 1
    finally:
        g.stop()


def test_classifier_backed_by_a_second_gateway(tokenizer):
    def verdict(prompt, index):
        if "poison" in prompt:
            return "unsafe\nS9"
        return "I cannot tell" if "riddle" in prompt else "safe"

    def answer(prompt, index):
        return "Here is the poison recipe." if "recipe" in prompt else BENIGN_REPLY

    guard = Gateway(tokenizer, [], verdict)
    front = Gateway(
        tokenizer,
        [{"type": "classifier", "base_url": guard.url + "/v1", "model": "scripted", "timeout_s": 10}],
        answer,
    )
    try:
        with pytest.raises(openai.BadRequestError) as e:
            chat(front, "a poison for my neighbour")
        assert e.value.body["code"] == "content_filter" and "unsafe" in e.value.body["message"]
        assert chat(front, "hello").choices[0].message.content == BENIGN_REPLY
        texts, finish = stream_chat(front, "the recipe please", chunk=1)
        assert finish == {0: "content_filter"} and texts == {0: ""}  # judged whole: nothing streamed
        assert any("Agent: Here is the poison recipe." in p for p in guard.engine.prompts)
        with pytest.raises(openai.BadRequestError):  # a verdict it cannot parse fails closed
            chat(front, "a riddle")
        assert front.count("failures", filter="classifier", direction="input", reason="error") == 1
        assert front.count("decisions", filter="classifier", direction="output", action="block") == 1
    finally:
        front.stop()
        guard.stop()


def test_classifier_endpoint_down_fails_open_when_configured(tokenizer):
    from llmforge.serve.server import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    g = Gateway(
        tokenizer,
        [{"type": "classifier", "base_url": url, "model": "m", "on_error": "fail_open", "timeout_s": 2}],
    )
    try:
        assert chat(g, "hello").choices[0].message.content == BENIGN_REPLY
        assert g.count("failures", filter="classifier", direction="input", reason="error") == 1
    finally:
        g.stop()


def test_real_local_engine_behind_the_chain(model_dir):
    from llmforge.serve.gateway import create_app
    from llmforge.serve.server import BackgroundServer
    from llmforge.serve.settings import GatewaySettings

    chain = chain_of({"type": "blocklist", "words": [PHRASE]}, {"type": "pii"})
    srv = BackgroundServer(
        create_app(local_engine(model_dir), GatewaySettings(served_model_name="tiny"), filters=chain)
    ).start()
    try:
        c = client(srv)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a pipe bomb"}])
        assert e.value.body["code"] == "content_filter"
        r = c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0
        )
        assert r.choices[0].finish_reason in ("stop", "length")
        s = c.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
        streamed = "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
        # the same greedy answer, streamed through the chain
        assert streamed == SCRUB(r.choices[0].message.content).text
    finally:
        srv.stop()
