"""Tiny, hermetic training fixtures: patterned token shards, a word-level tokenizer, a one-file manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from llmforge.shards import write_shards

VOCAB = 64
PAD, BOS, EOS = 0, 1, 2

# a tiny Llama: 2 layers, GQA, tied embeddings — big enough to learn the pattern, fast on one core
TINY_MODEL = {
    "preset": "tiny",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def pattern_docs(n: int, seed: int = 0) -> list[list[int]]:
    """Arithmetic sequences over ids 3..63: each document is predictable after its first two tokens."""
    docs = []
    for i in range(n):
        start, step = 3 + (i * 7 + seed) % 40, 1 + (i + seed) % 3
        docs.append([3 + (start - 3 + k * step) % (VOCAB - 3) for k in range(12 + i % 9)])
    return docs


def make_shards(root: Path, n_train: int = 300, n_val: int = 40, docs_per_file: int | None = 100) -> Path:
    return write_shards(
        root,
        {"train": pattern_docs(n_train), "val": pattern_docs(n_val, seed=1)},
        vocab_size=VOCAB,
        eos_id=EOS,
        bos_id=BOS,
        pad_id=PAD,
        docs_per_file=docs_per_file,
    )


def make_tokenizer_dir(root: Path) -> Path:
    """A word-level HF tokenizer over the test vocabulary (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
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


def pretrain_section(**over: Any) -> dict[str, Any]:
    base = {
        "enabled": True,
        "max_steps": 12,
        "warmup_steps": 2,
        "batch_size": 4,
        "seq_len": 16,
        "lr": 3e-3,
        "eval_every": 0,
        "eval_batches": 4,
        "save_every": 0,
        "log_every": 1,
        "keep_last": 2,
    }
    base.update(over)
    return base


def make_project(root: Path, *, pretrain: dict[str, Any] | None = None, model: dict[str, Any] | None = None):
    """A project folder with llmforge.yaml, shards and a tokenizer; returns (StageContext, LoadedManifest)."""
    from llmforge.manifest import load
    from llmforge.stage import StageContext

    root.mkdir(parents=True, exist_ok=True)
    shards = root / "data" / "shards"
    tok = root / "data" / "tokenizer"
    if not (shards / "index.json").exists():
        make_shards(shards)
        make_tokenizer_dir(tok)
    manifest = {
        "project": {"name": "t", "seed": 7, "device": "cpu"},
        "model": model or TINY_MODEL,
        "pretrain": pretrain_section(**(pretrain or {})),
    }
    (root / "llmforge.yaml").write_text(yaml.safe_dump(manifest))
    loaded = load(root / "llmforge.yaml")
    out = loaded.runs_dir / "pretrain"
    out.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(
        name="pretrain",
        loaded=loaded,
        out_dir=out,
        upstream={"tokenizer": {"tokenizer": tok, "shards": shards}},
    )
    return ctx, loaded
