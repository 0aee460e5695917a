"""The module itself: init, parameter names, masks, positions, training features."""

from __future__ import annotations

import pytest
import torch

from llmforge.errors import ModelError
from llmforge.model import Llama

from .conftest import randomize, tiny_config


def test_parameter_names_are_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config(attention_bias=True)
    ours = Llama(cfg)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(cfg.to_hf_dict()))
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert ours_shapes == hf_shapes


def test_init_is_deterministic_and_has_the_configured_std():
    torch.manual_seed(0)
    a = Llama(tiny_config(vocab_size=4096, initializer_range=0.02))
    torch.manual_seed(0)
    b = Llama(tiny_config(vocab_size=4096, initializer_range=0.02))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert abs(a.model.embed_tokens.weight.std().item() - 0.02) < 1e-3
    assert torch.all(a.model.norm.weight == 1)


def test_meta_then_to_empty_matches_direct_build():
    """The FSDP path (build on meta, materialize, init) gives the same weights as a direct build."""
    cfg = tiny_config(tie_word_embeddings=True)
    torch.manual_seed(0)
    direct = Llama(cfg)
    with torch.device("meta"):
        lazy = Llama(cfg)
    assert lazy.lm_head.weight.is_meta
    lazy.to_empty(device="cpu")
    torch.manual_seed(0)
    lazy.init_weights()
    assert lazy.lm_head.weight is lazy.model.embed_tokens.weight
    for (name, a), b in zip(direct.state_dict().items(), lazy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    torch.testing.assert_close(lazy.rope_cos, direct.rope_cos)


def test_tied_embeddings_share_one_tensor():
    m = Llama(tiny_config(tie_word_embeddings=True))
    assert m.lm_head.weight is m.model.embed_tokens.weight
    untied = Llama(tiny_config())
    assert m.num_parameters() == untied.num_parameters() - 97 * 64


def test_padding_mask_and_positions_match_unpadded():
    """A left-padded row with its mask gives the logits of the same tokens without padding."""
    torch.manual_seed(0)
    m = randomize(Llama(tiny_config())).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    padded = torch.tensor([[0, 0, 5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        ref = m(ids)
        got = m(padded, attention_mask=mask)
        assert torch.isfinite(got).all()  # padding rows stay finite
        torch.testing.assert_close(got[:, 2:], ref, atol=1e-5, rtol=0)
        # explicit positions are honored; an all-ones mask is the plain causal model
        torch.testing.assert_close(m(ids, position_ids=torch.arange(5)[None]), ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(m(ids, attention_mask=torch.ones_like(ids)), ref, atol=1e-5, rtol=0)


def test_context_limit_is_an_error():
    m = Llama(tiny_config(max_position_embeddings=16))
    with pytest.raises(ModelError, match="max_position_embeddings=16"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    m = randomize(Llama(tiny_config())).train()
    ids = torch.randint(0, 97, (2, 24))

    def grads():
        m.zero_grad()
        torch.nn.functional.cross_entropy(m(ids).flatten(0, 1), ids.flatten()).backward()
        return {k: p.grad.clone() for k, p in m.named_parameters()}

    plain = grads()
    m.gradient_checkpointing = True
    ckpt = grads()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-6, rtol=1e-5)


def test_bf16_autocast_trains():
    torch.manual_seed(0)
    m = Llama(tiny_config()).train()
    ids = torch.randint(0, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(ids)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in m.parameters())


def test_flops_per_token_formula():
    cfg = tiny_config()
    m = Llama(cfg)
    n_compute = m.num_parameters() - cfg.vocab_size * cfg.hidden_size  # the input embedding is a lookup
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * 100
    assert m.flops_per_token(100) == 6 * n_compute + attn
