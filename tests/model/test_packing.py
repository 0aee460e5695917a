"""Packed rows (``document_ids``): several documents in one row behave exactly as if each ran alone."""

from __future__ import annotations

import pytest
import torch

from llmforge.errors import ModelError
from llmforge.model import KVCache, Llama, llama
from llmforge.model.llama import DocumentSegments, document_mask, document_positions

from .conftest import randomize, tiny_config

LENGTHS = (5, 9, 4)  # three documents, then 3 padding tokens (id -1)
PAD = 3


@pytest.fixture(params=["mask", "per-document"])
def attention_path(request, monkeypatch):
    """Both ways packed attention runs: one block-diagonal masked SDPA call, or one causal call per document."""
    monkeypatch.setattr(llama, "_PER_DOCUMENT_ATTENTION", request.param == "per-document")
    return request.param


def _packed_row(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, 97, (n,), generator=g) for n in LENGTHS]
    ids = torch.cat([*docs, torch.zeros(PAD, dtype=torch.long)])[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)] + [torch.full((PAD,), -1)])[None]
    # targets inside each document: the next token of that document, none for its last token
    labels = torch.cat([torch.cat([d[1:], torch.tensor([-100])]) for d in docs] + [torch.full((PAD,), -100)])
    return docs, ids, doc_ids, labels[None]


def test_document_positions_and_mask():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    assert document_positions(doc).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    mask = document_mask(doc)[0, 0]
    assert mask.shape == (8, 8) and mask.dtype == torch.bool
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for a, b in ((0, 3), (3, 5), (5, 6), (6, 8)):
        expected[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
    assert torch.equal(mask, expected)
    # a document is a run of equal ids: an id seen again later starts a new document
    again = torch.tensor([[4, 4, 7, 4]])
    assert document_positions(again).tolist() == [[0, 1, 0, 0]]
    assert document_mask(again)[0, 0, 3].tolist() == [False, False, False, True]


def test_packed_attention_picks_per_document_calls_for_long_documents_on_cpu(monkeypatch):
    long_docs = torch.cat([torch.zeros(300), torch.ones(400), torch.full((324,), -1)]).long()[None]
    segments = llama._packed_attention(long_docs)
    assert segments == DocumentSegments((((0, 300), (300, 700), (700, 1024)),))
    short_docs = torch.arange(1024)[None] // 64  # 16 documents of 64 tokens: the masked kernel
    assert torch.equal(llama._packed_attention(short_docs), document_mask(short_docs))
    short_row = torch.tensor([[0, 0, 0, 1, 1, -1]])
    assert torch.equal(llama._packed_attention(short_row), document_mask(short_row))
    monkeypatch.setattr(llama, "_PER_DOCUMENT_ATTENTION", True)
    assert llama._packed_attention(short_row) == DocumentSegments((((0, 3), (3, 5), (5, 6)),))


@pytest.mark.parametrize("explicit_positions", [False, True])
def test_packed_row_equals_each_document_alone(explicit_positions, attention_path):
    torch.manual_seed(0)
    m = randomize(Llama(tiny_config())).eval()
    docs, ids, doc_ids, labels = _packed_row()
    positions = document_positions(doc_ids) if explicit_positions else None
    with torch.no_grad():
        packed = m(ids, document_ids=doc_ids, position_ids=positions)
        assert torch.isfinite(packed).all()  # padding rows included
        start = 0
        for d in docs:
            alone = m(d[None])
            torch.testing.assert_close(packed[:, start : start + len(d)], alone, atol=1e-5, rtol=0)
            start += len(d)
        # per-document CE: the packed sum is the sum of the documents' own sums, over the same token count
        loss_sum, n = m(ids, labels=labels, document_ids=doc_ids, output="ce_sum")
        alone_sums = [m(d[None, :-1], labels=d[None, 1:], output="ce_sum").loss_sum for d in docs]
        torch.testing.assert_close(loss_sum, torch.stack(alone_sums).sum(), atol=1e-5, rtol=1e-6)
        assert n.item() == sum(LENGTHS) - len(LENGTHS)


def test_packed_gradients_equal_the_documents_run_alone(attention_path):
    torch.manual_seed(0)
    m = randomize(Llama(tiny_config())).train()
    docs, ids, doc_ids, labels = _packed_row(seed=1)
    m(ids, labels=labels, document_ids=doc_ids, output="ce_sum").loss_sum.backward()
    packed = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    for d in docs:
        m(d[None, :-1], labels=d[None, 1:], output="ce_sum").loss_sum.backward()
    for k, p in m.named_parameters():
        torch.testing.assert_close(packed[k], p.grad, atol=1e-5, rtol=1e-5, msg=k)


def test_packed_rows_match_transformers_with_the_equivalent_4d_mask(attention_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tiny_config()
    ours = randomize(Llama(cfg)).eval()
    hf_cfg = transformers.LlamaConfig.from_dict(cfg.to_hf_dict())
    hf_cfg._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(ours.state_dict())
    rows = [_packed_row(seed) for seed in (0, 1)]
    ids = torch.cat([r[1] for r in rows])
    doc_ids = torch.cat([r[2] for r in rows])
    doc_ids[1] = torch.where(
        doc_ids[1] >= 0, doc_ids[1] + 10, doc_ids[1]
    )  # ids need only differ within a row
    with torch.no_grad():
        ref = hf(
            input_ids=ids,
            attention_mask=document_mask(doc_ids),
            position_ids=document_positions(doc_ids),
        ).logits
        got = ours(ids, document_ids=doc_ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_document_ids_refuse_a_cache_a_mask_and_a_wrong_shape():
    m = Llama(tiny_config())
    ids = torch.randint(0, 97, (1, 6))
    doc = torch.zeros(1, 6, dtype=torch.long)
    with pytest.raises(ModelError, match="document id -1"):
        m(ids, document_ids=doc, attention_mask=torch.ones(1, 6))
    with pytest.raises(ModelError, match="kv_cache"):
        m(ids, document_ids=doc, kv_cache=KVCache(2, 1, 16, 2, 16))
    with pytest.raises(ModelError, match=r"document_ids must be \[batch, tokens\]"):
        m(ids, document_ids=doc[:, :5])


def test_one_document_per_row_is_the_plain_causal_model():
    torch.manual_seed(0)
    m = randomize(Llama(tiny_config())).eval()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(m(ids, document_ids=torch.zeros_like(ids)), m(ids), atol=1e-6, rtol=0)
