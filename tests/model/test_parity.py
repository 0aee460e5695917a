"""Logits parity with transformers, through checkpoints, in both directions."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from llmforge.model import Llama, load_pretrained, save_pretrained

from .conftest import LLAMA3_SCALING, randomize, tiny_config

transformers = pytest.importorskip("transformers")

ATOL = 1e-5

VARIANTS = {
    "gqa-untied-llama3rope": dict(rope_scaling=LLAMA3_SCALING, rope_theta=500000.0),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "attention-bias-mqa": dict(attention_bias=True, num_key_value_heads=1),
    "linear-rope-head-dim": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, head_dim=32),
}


def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _our_logits(model: Llama, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ours_to_transformers(variant, tmp_path, tokens):
    torch.manual_seed(0)
    ours = randomize(Llama(tiny_config(**VARIANTS[variant]))).eval()
    save_pretrained(ours, tmp_path / "ckpt")

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert type(hf).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(_hf_logits(hf, tokens), _our_logits(ours, tokens), atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_to_ours(variant, tmp_path, tokens):
    cfg = tiny_config(**VARIANTS[variant])
    hf_cfg = transformers.LlamaConfig.from_dict(cfg.to_hf_dict())
    torch.manual_seed(0)
    hf = randomize(transformers.LlamaForCausalLM(hf_cfg)).eval()
    hf.save_pretrained(tmp_path / "hf")

    ours = load_pretrained(tmp_path / "hf")
    assert ours.config == cfg
    torch.testing.assert_close(_our_logits(ours, tokens), _hf_logits(hf, tokens), atol=ATOL, rtol=0)


def test_qwen2_loads_and_reexports_as_llama(tmp_path, tokens):
    """Qwen2 = Llama + q/k/v bias: loads exactly, and re-saves as a LlamaForCausalLM with the same logits."""
    qcfg = transformers.Qwen2Config(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    qwen = randomize(transformers.Qwen2ForCausalLM(qcfg)).eval()
    qwen.save_pretrained(tmp_path / "qwen")
    expected = _hf_logits(qwen, tokens)

    ours = load_pretrained(tmp_path / "qwen")
    assert ours.config.attention_bias and ours.config.tie_word_embeddings
    assert torch.count_nonzero(ours.model.layers[0].self_attn.o_proj.bias) == 0
    torch.testing.assert_close(_our_logits(ours, tokens), expected, atol=ATOL, rtol=0)

    save_pretrained(ours, tmp_path / "as-llama")
    llama = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "as-llama")
    assert type(llama).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(_hf_logits(llama, tokens), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("sliding_window", [None, 128, 32])
def test_mistral_round_trip(sliding_window, tmp_path, tokens, caplog):
    mcfg = transformers.MistralConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # Mistral-style head_dim != hidden / heads
        max_position_embeddings=128,
        sliding_window=sliding_window,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    mistral = randomize(transformers.MistralForCausalLM(mcfg)).eval()
    mistral.save_pretrained(tmp_path / "mistral")
    ids = tokens[:, :32]  # within the window: full attention and sliding-window attention agree

    with caplog.at_level(logging.WARNING, logger="llmforge"):
        ours = load_pretrained(tmp_path / "mistral")
    if sliding_window == 32:
        # the window would change results past 32 tokens, so the usable context is capped there
        assert ours.config.max_position_embeddings == 32
        assert "sliding_window=32" in caplog.text
    else:
        assert ours.config.max_position_embeddings == 128
        assert not caplog.records
    assert ours.config.head_dim == 32
    torch.testing.assert_close(_our_logits(ours, ids), _hf_logits(mistral, ids), atol=ATOL, rtol=0)

    save_pretrained(ours, tmp_path / "as-llama")
    cfg = json.loads((tmp_path / "as-llama" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    llama = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "as-llama")
    torch.testing.assert_close(_hf_logits(llama, ids), _our_logits(ours, ids), atol=ATOL, rtol=0)


def test_bf16_matches_transformers_bf16(tmp_path, tokens):
    """Same numerics order in half precision (norm in fp32, rope table rounded once)."""
    torch.manual_seed(0)
    ours = randomize(Llama(tiny_config(rope_scaling=LLAMA3_SCALING))).eval().to(torch.bfloat16)
    save_pretrained(ours, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    a, b = _our_logits(ours, tokens).float(), _hf_logits(hf, tokens).float()
    # bf16 has ~3 significant digits; identical op order keeps the two within a couple of ulps
    assert (a - b).abs().max().item() < 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95
