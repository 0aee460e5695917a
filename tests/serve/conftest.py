"""Fixtures: a tokenizer trained in-process, a tiny random Llama checkpoint carrying it, engines, and a
gateway on a free loopback port."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

WORDS = [
    "the",
    "model",
    "reads",
    "a",
    "prompt",
    "and",
    "writes",
    "an",
    "answer",
    "one",
    "token",
    "at",
    "a",
    "time",
    "while",
    "the",
    "server",
    "streams",
    "every",
    "token",
    "to",
    "the",
    "client",
    "who",
    "asked",
    "hello",
    "world",
    "colours",
    "red",
    "green",
    "blue",
    "who",
    "are",
    "you",
    "name",
    "three",
    "things",
]


def _docs(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 40))]
        docs.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", " 42.", " é ü."]))
    return docs


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    from llmforge.tokenizer.chat import default_chat_template
    from llmforge.tokenizer.export import export_sentencepiece
    from llmforge.tokenizer.train import train_sentencepiece

    out = tmp_path_factory.mktemp("serve-tok") / "tokenizer"
    chat = ["<|im_start|>", "<|im_end|>"]
    model, _ = train_sentencepiece(_docs(), model_type="bpe", vocab_size=560, chat_tokens=chat, num_threads=1)
    out.mkdir(parents=True)
    (out / "tokenizer.model").write_bytes(model)
    export_sentencepiece(
        out / "tokenizer.model",
        out,
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        unk="<unk>",
        chat_tokens=chat,
        chat_template=default_chat_template(*chat),
        source={"test": True},
        n_check=50,
    )
    return out


@pytest.fixture(scope="session")
def tokenizer(tok_dir):
    from llmforge.tokenizer.info import load_tokenizer

    return load_tokenizer(tok_dir)


def make_model_dir(out: Path, tok_dir: Path, *, seed: int = 0, max_len: int = 256, **shape) -> Path:
    """A random tiny Llama checkpoint (HF layout, tokenizer files and stop ids inside). Head size 32: the
    smallest vLLM-CPU's attention kernels support, so the same checkpoint runs through both engines."""
    import torch

    from llmforge.model import Llama, LlamaConfig, save_pretrained
    from llmforge.tokenizer.info import load_tokenizer_info

    info = load_tokenizer_info(tok_dir)
    base = dict(
        vocab_size=info.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_len,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.2,
        bos_token_id=info.bos_id,
        eos_token_id=info.eos_id,
        pad_token_id=info.pad_id,
    )
    base.update(shape)
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(**base).validate())
    return save_pretrained(model, out, tokenizer_dir=tok_dir, generation_config=info.generation_config())


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tok_dir) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("serve-model") / "model", tok_dir)


@pytest.fixture(scope="session", autouse=True)
def _threads():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_key(monkeypatch):
    monkeypatch.delenv("LLMFORGE_API_KEY", raising=False)


def local_engine(model_dir: Path, **kw):
    from llmforge.infer import load_engine

    kw.setdefault("device", "cpu")
    kw.setdefault("dtype", "float32")
    return load_engine(model_dir, **kw)


def start_gateway(engine, **settings):
    from llmforge.serve.gateway import create_app
    from llmforge.serve.server import BackgroundServer
    from llmforge.serve.settings import GatewaySettings

    app = create_app(engine, GatewaySettings(**settings))
    return BackgroundServer(app).start()


@pytest.fixture(scope="module")
def real_server(model_dir):
    """The real local engine behind a gateway, shared by a test module (it is read-only state)."""
    srv = start_gateway(local_engine(model_dir, max_batch=16, max_queue=64), served_model_name="tiny")
    yield srv
    srv.stop()


def client(srv, **kw):
    import openai

    kw.setdefault("api_key", os.environ.get("LLMFORGE_TEST_KEY", "unused"))
    return openai.OpenAI(base_url=srv.url + "/v1", max_retries=0, timeout=60, **kw)
