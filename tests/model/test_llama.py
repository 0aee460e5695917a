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


# -- fused output projection + cross-entropy (model(ids, labels=...)) --------------------------------------


def _reference_loss_and_grads(m: Llama, ids: torch.Tensor, labels: torch.Tensor):
    m.zero_grad(set_to_none=True)
    logits = m(ids)
    loss = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100
    )
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}


def _fused_loss_and_grads(m: Llama, ids: torch.Tensor, labels: torch.Tensor):
    m.zero_grad(set_to_none=True)
    loss = m(ids, labels=labels)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk_rows", [7, None])  # several chunks (one ragged) / the default single chunk
def test_labels_loss_equals_full_cross_entropy_with_the_same_gradients(tied, chunk_rows, monkeypatch):
    from llmforge.model import fused

    if chunk_rows is not None:
        monkeypatch.setattr(fused, "_chunk_rows", lambda vocab: chunk_rows)
    torch.manual_seed(0)
    m = randomize(Llama(tiny_config(tie_word_embeddings=tied))).train()
    ids = torch.randint(0, 97, (3, 20))
    labels = torch.randint(0, 97, (3, 20))
    labels[0, :5] = -100  # prompt-style masking
    labels[2, -1] = -100
    ref_loss, ref_grads = _reference_loss_and_grads(m, ids, labels)
    loss, grads = _fused_loss_and_grads(m, ids, labels)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-6, rtol=1e-5, msg=k)


def test_labels_loss_without_grad_and_with_no_targets():
    torch.manual_seed(0)
    m = randomize(Llama(tiny_config()))
    ids = torch.randint(0, 97, (2, 12))
    labels = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(m(ids).flatten(0, 1), labels.flatten())
        torch.testing.assert_close(m(ids, labels=labels), expected)
    # a micro-batch whose targets are all ignored: loss 0 (not NaN) and zero gradients
    loss = m(ids, labels=torch.full_like(labels, -100))
    loss.backward()
    assert loss.item() == 0.0
    assert m.lm_head.weight.grad.abs().sum() == 0 and m.model.embed_tokens.weight.grad.abs().sum() == 0


def test_labels_loss_scales_with_the_incoming_gradient_and_refuses_a_second_backward():
    torch.manual_seed(0)
    m = randomize(Llama(tiny_config()))
    ids, labels = torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))
    _, ref = _fused_loss_and_grads(m, ids, labels)
    m.zero_grad(set_to_none=True)
    loss = m(ids, labels=labels)
    (loss * 3.0).backward(retain_graph=True)
    torch.testing.assert_close(m.lm_head.weight.grad, 3.0 * ref["lm_head.weight"])
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_labels_loss_under_bf16_autocast_matches_the_logits_path():
    torch.manual_seed(0)
    m = randomize(Llama(tiny_config())).train()
    ids, labels = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = _reference_loss_and_grads(m, ids, labels)
        loss, grads = _fused_loss_and_grads(m, ids, labels)
    torch.testing.assert_close(loss, ref_loss, atol=1e-3, rtol=1e-3)
    for k in grads:
        assert grads[k].dtype == torch.float32
        torch.testing.assert_close(grads[k], ref_grads[k], atol=2e-2, rtol=2e-2, msg=k)
