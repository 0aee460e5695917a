"""Tiny quantization fixtures: a Llama fitted for a few seconds on the patterned corpus of tests/train, and a
project whose tokenizer stage output is those shards.

A trained model (not a random one) matters: GPTQ beats round-to-nearest by compensating rounding error along
directions the calibration activations use, which random weights and random activations don't have.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from tests.train.helpers import EOS, VOCAB, make_shards, make_tokenizer_dir, pattern_docs

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# widths chosen so every default fits: group size 64 (the largest power of two <= 128 dividing 64 and 128),
# and 4/8/2-bit packing; 3-bit needs multiples of 32, which they also are
TINY = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
}


def fit_tiny_model(out: Path, steps: int = 150, seed: int = 0) -> Path:
    """Train the tiny Llama on the pattern documents for ``steps`` Adam steps; save it as an HF directory."""
    from llmforge.model import Llama, LlamaConfig, save_pretrained

    torch.manual_seed(seed)
    model = Llama(LlamaConfig(**TINY, bos_token_id=1, eos_token_id=EOS, pad_token_id=0))
    stream = np.concatenate([np.asarray([*d, EOS]) for d in pattern_docs(400, seed=3)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        starts = rng.integers(0, len(stream) - 33, size=16)
        batch = torch.as_tensor(np.stack([stream[s : s + 33] for s in starts]))
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    tok = make_tokenizer_dir(out.parent / "tok_for_model")
    return save_pretrained(model, out, tokenizer_dir=tok)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return fit_tiny_model(tmp_path_factory.mktemp("qmodel") / "model")


def make_project(root: Path, model_dir: Path, **quantize: Any):
    """(StageContext, LoadedManifest) of a project whose quantize section is ``quantize`` (+ from: model)."""
    from llmforge.manifest import load
    from llmforge.stage import StageContext

    root.mkdir(parents=True, exist_ok=True)
    shards = root / "data" / "shards"
    tok = root / "data" / "tokenizer"
    if not (shards / "index.json").exists():
        make_shards(shards)
        make_tokenizer_dir(tok)
    section = {
        "enabled": True,
        "from": str(model_dir),
        "calibration_samples": 32,
        "calibration_seq_len": 32,
        "eval_tokens": 4096,
        **quantize,
    }
    manifest = {"project": {"name": "q", "seed": 7, "device": "cpu"}, "quantize": section}
    (root / "llmforge.yaml").write_text(yaml.safe_dump(manifest))
    loaded = load(root / "llmforge.yaml")
    out = loaded.runs_dir / "quantize"
    out.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(
        name="quantize",
        loaded=loaded,
        out_dir=out,
        upstream={"tokenizer": {"tokenizer": tok, "shards": shards}},
    )
    return ctx, loaded
