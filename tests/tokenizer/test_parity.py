"""The exported fast tokenizer encodes and decodes exactly like sentencepiece, and so does AutoTokenizer."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer

from llmforge.errors import TokenizerError
from llmforge.tokenizer.export import build_fast_tokenizer, load_model_proto, verify_parity
from llmforge.tokenizer.samples import generate_samples

from .conftest import train_and_export

N = 3000  # parity strings per check (nine families: code, whitespace, CJK, emoji, bytes, chat markup, …)


def _mismatches(sp, encode, decode, samples):
    bad = []
    for text in samples:
        want = sp.encode(text)
        got = encode(text)
        if got != want:
            bad.append(("encode", text, want, got))
        elif decode(got) != sp.decode(want):
            bad.append(("decode", text, sp.decode(want), decode(got)))
    return bad


def test_fast_and_auto_tokenizer_match_sentencepiece(tok_dir, hf_tokenizer):
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    fast = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    samples = generate_samples(N, seed=7)
    # The families must really hit byte fallback, whitespace-only pieces and the chat symbols.
    pieces = {p for s in samples[:600] for p in sp.encode(s, out_type=str)}
    assert any(p.startswith("<0x") for p in pieces)
    assert "<|im_start|>" in pieces and "\n" in pieces
    assert any(set(p) == {"▁"} and len(p) > 1 for p in pieces)

    bad = _mismatches(
        sp,
        lambda t: fast.encode(t, add_special_tokens=False).ids,
        lambda i: fast.decode(i, skip_special_tokens=False),
        samples,
    )
    assert not bad, bad[:3]
    bad = _mismatches(
        sp, lambda t: hf_tokenizer(t, add_special_tokens=False)["input_ids"], hf_tokenizer.decode, samples
    )
    assert not bad, bad[:3]
    # Lossless: every sample decodes back to itself (except the "▁" marker, which is a space by design).
    for text in samples:
        if "\u2581" not in text:
            ids = fast.encode(text, add_special_tokens=False).ids
            assert fast.decode(ids, skip_special_tokens=False) == text


def test_literal_special_tokens_and_batch_encoding(tok_dir, hf_tokenizer):
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    fast = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    texts = ["a</s>b", "<s> x <pad>", "<unk> literal", "<0x41> not a byte", "  leading", "tail  ", "\n\n\t"]
    for text in texts:
        assert fast.encode(text, add_special_tokens=False).ids == sp.encode(text), text
        assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    batch = [e.ids for e in fast.encode_batch_fast(texts, add_special_tokens=False)]
    assert batch == [sp.encode(t) for t in texts]
    # Nothing is added around a plain encode: no BOS, no EOS.
    assert hf_tokenizer("hi")["input_ids"] == sp.encode("hi")


def test_unigram_export_matches(tmp_path, docs):
    out = train_and_export(tmp_path / "uni", docs, model_type="unigram", vocab_size=650)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    fast = Tokenizer.from_file(str(out / "tokenizer.json"))
    samples = [*generate_samples(1500, seed=11), "<0x41>", "<s></s>", "  <|im_end|>  "]
    bad = _mismatches(
        sp,
        lambda t: fast.encode(t, add_special_tokens=False).ids,
        lambda i: fast.decode(i, skip_special_tokens=False),
        samples,
    )
    assert not bad, bad[:3]


def test_exported_files(tok_dir):
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] and "{% generation %}" in cfg["chat_template"]
    assert cfg["eos_token"] == "</s>" and cfg["add_bos_token"] is False
    smap = json.loads((tok_dir / "special_tokens_map.json").read_text())
    assert smap["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    gen = json.loads((tok_dir / "generation_config.json").read_text())
    fast = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert gen["eos_token_id"] == [fast.token_to_id("</s>"), fast.token_to_id("<|im_end|>")]
    assert gen["pad_token_id"] == fast.token_to_id("<pad>")
    # ids: <unk>=0, then BOS, EOS, PAD, chat tokens, newline (user-defined symbols in order)
    assert [
        fast.token_to_id(t) for t in ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "\n"]
    ] == list(range(7))


def test_export_refuses_inexact_models(tok_dir):
    data = (tok_dir / "tokenizer.model").read_bytes()
    proto = load_model_proto(data)
    proto.normalizer_spec.add_dummy_prefix = True
    with pytest.raises(TokenizerError, match="add_dummy_prefix"):
        build_fast_tokenizer(proto.SerializeToString())


def test_verify_parity_reports_disagreement(tok_dir):
    from tokenizers import normalizers

    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    fast = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    # A dummy prefix is exactly the bug the default sentencepiece settings cause.
    fast.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    with pytest.raises(TokenizerError, match="disagrees with sentencepiece"):
        verify_parity(sp, fast, generate_samples(50, seed=1))
