"""Fixtures for the engine tests: a tiny random Llama, an in-process byte-fallback tokenizer, a scripted model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from llmforge.model import Llama
from llmforge.model.config import LlamaConfig

from ..model.conftest import randomize, tiny_config

CHARS = "▁abcdefghijklmnopqrstuvwxyz#.,!?"
SPECIALS = ["<pad>", "<s>", "</s>"]
VOCAB = len(SPECIALS) + 256 + len(CHARS)  # 291


def byte_id(b: int) -> int:
    return len(SPECIALS) + b


def char_id(c: str) -> int:
    return len(SPECIALS) + 256 + CHARS.index(c)


def make_tokenizer_dir(root: Path) -> Path:
    """A Llama-style BPE with byte fallback: ASCII letters are single tokens, everything else (é, 中, 😀) is
    spelled as its UTF-8 bytes ``<0xNN>``, so one character spans 2-4 tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"<0x{b:02X}>": byte_id(b) for b in range(256)})
    vocab.update({c: char_id(c) for c in CHARS})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(SPECIALS)
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )
    return root


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from llmforge.tokenizer.info import load_tokenizer

    return load_tokenizer(make_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def make_model(seed: int = 3, **overrides) -> Llama:
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, max_position_embeddings=256)
    cfg.update(overrides)
    return randomize(Llama(tiny_config(**cfg)), seed=seed).eval()


@pytest.fixture(scope="module")
def model() -> Llama:
    return make_model()


class ScriptedLM(nn.Module):
    """A stand-in for ``Llama`` whose greedy continuation of an ``L``-token prompt is ``script`` exactly:
    the logits at position ``p`` put +10 on ``table[p]``. It still writes through the KV cache it is given,
    so the engine's bookkeeping runs unchanged; it lets text-level tests choose the generated tokens."""

    def __init__(self, script: list[int], prompt_len: int, vocab: int = VOCAB, max_len: int = 128):
        super().__init__()
        self.config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            max_position_embeddings=max_len,
            eos_token_id=2,
        ).validate()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, 1)
        self.lm_head = nn.Linear(vocab, vocab, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.eye(vocab) * 10)
        table = torch.zeros(max_len, dtype=torch.long)
        table[prompt_len - 1 : prompt_len - 1 + len(script)] = torch.tensor(script)
        self.register_buffer("table", table)

    def hidden_states(self, input_ids, *, position_ids, kv_cache, attention_mask):
        B, T = input_ids.shape
        kv = torch.zeros(B, 1, T, self.config.head_dim)
        kv_cache.update(0, kv, kv)
        return nn.functional.one_hot(self.table[position_ids], self.config.vocab_size).float()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads on a shared 2-core machine (see tests/model)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
