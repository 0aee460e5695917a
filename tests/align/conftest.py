"""Shared alignment fixtures: a ChatML tokenizer trained in-process, a random tiny Llama saved with it, and a
preference set on the arithmetic task (chosen = the right sum, rejected = a wrong one).

RL-specific fixtures live in ``rl_fixtures.py``."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from llmforge.manifest import load
from llmforge.model import Llama, preset_config, save_pretrained
from llmforge.stage import StageContext
from tests.tokenizer.conftest import make_docs, train_and_export

REFUSALS = ("I do not know.", "No idea, sorry.", "Maybe {w}?", "{w} or so")


def preference_rows(n: int, seed: int = 0, style: bool = True) -> list[dict]:
    """Arithmetic pairs. ``style``: rejected is a refusal or a vague guess (learnable by a tiny random model in
    a few steps, and it generalises to held-out pairs); else rejected is a wrong sum in the same format."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        wrong = (a + b + rng.randint(1, 5)) % 19
        rejected = rng.choice(REFUSALS).format(w=wrong) if style else f"The answer is {wrong}."
        rows.append(
            {"prompt": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.", "rejected": rejected}
        )
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def tiny_llama(vocab_size: int, eos_id: int, seed: int = 0, **kw) -> Llama:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=96,
        eos_token_id=eos_id,
    )
    cfg.update(kw)
    return Llama(preset_config("tiny", **cfg))


@pytest.fixture(scope="session")
def align_base(tmp_path_factory):
    """{"tok": tokenizer dir, "model": tiny causal LM dir, "untied": untied-head LM dir, "pairs": JSONL}."""
    root = tmp_path_factory.mktemp("alignbase")
    docs = make_docs(200) + [
        f"What is {a} plus {b}? The answer is {a + b}." for a in range(10) for b in range(10)
    ]
    tok = train_and_export(root / "tok", docs, vocab_size=500)
    from llmforge.tokenizer.info import load_tokenizer_info

    info = load_tokenizer_info(tok)
    gen = info.generation_config()
    save_pretrained(
        tiny_llama(info.vocab_size, info.eos_id), root / "model", tokenizer_dir=tok, generation_config=gen
    )
    untied = tiny_llama(info.vocab_size, info.eos_id, seed=1, tie_word_embeddings=False)
    save_pretrained(untied, root / "untied", tokenizer_dir=tok, generation_config=gen)
    pairs = write_jsonl(root / "pairs.jsonl", preference_rows(240))
    return {"tok": tok, "model": root / "model", "untied": root / "untied", "pairs": pairs, "info": info}


def make_ctx(
    root: Path, name: str, sections: dict, upstream: dict | None = None, seed: int = 3
) -> StageContext:
    root.mkdir(parents=True, exist_ok=True)
    doc = {"project": {"name": "t", "seed": seed, "device": "cpu"}, **sections}
    (root / "llmforge.yaml").write_text(yaml.safe_dump(doc))
    loaded = load(root / "llmforge.yaml")
    out = loaded.runs_dir / name
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(name=name, loaded=loaded, out_dir=out, upstream=upstream or {})
