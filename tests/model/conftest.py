"""Fixtures for the model tests: tiny random configs and helpers shared with transformers."""

from __future__ import annotations

import pytest
import torch

from llmforge.model.config import LlamaConfig

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # short, so the test sequences cross the scaled band
}


def tiny_config(**overrides) -> LlamaConfig:
    """A 2-layer GQA model small enough to run hundreds of forwards in a second."""
    base = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.1,  # larger than 0.02 so logits differ clearly between tokens
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    base.update(overrides)
    return LlamaConfig(**base).validate()


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (norm weights and biases included) distinct random values.

    Default inits leave norms at 1 and biases at 0, which would hide a swapped or ignored tensor.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * 0.1
        if name.endswith("norm.weight"):
            p.copy_(1.0 + noise)
        else:
            p.copy_(noise)
    return model


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP's spinning
    threads make each small op ~100x slower; restore the setting for other test packages."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 97, (2, 40), generator=g)
