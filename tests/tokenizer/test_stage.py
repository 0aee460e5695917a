"""The `tokenizer` stage end to end: train → export → shards → eval; bad input; `tokenizer.from`."""

from __future__ import annotations

import json
import shutil

import pytest

from llmforge.errors import ManifestError, StageInputError, TokenizerError, UserInputError
from llmforge.tokenizer.info import load_tokenizer_info
from llmforge.tokenizer.stage import run_tokenizer

from .conftest import make_ctx, write_corpus

SMALL = {"vocab_size": 700, "shards": {"val_fraction": 0.1, "workers": 1}}


def test_stage_trains_exports_and_shards(tmp_path, corpus):
    ctx = make_ctx(tmp_path / "p", SMALL, corpus=corpus, eval=True)
    res = run_tokenizer(ctx)
    assert set(res.outputs) == {"tokenizer", "shards"}
    tok, shards = res.outputs["tokenizer"], res.outputs["shards"]
    for name in (
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "llmforge_tokenizer.json",
    ):
        assert (tok / name).exists(), name
    index = json.loads((shards / "index.json").read_text())
    info = load_tokenizer_info(tok)
    assert index["tokenizer_sha256"] == info.sha256 and index["eos_id"] == info.eos_id
    m = res.metrics
    assert m["vocab_size"] == 700
    assert m["val_documents"] + m["train_documents"] == 900 and m["val_documents"] > 0
    assert m["val_tokens"] == index["splits"]["val"]["num_tokens"]
    ev = m["eval"]
    assert ev["heldout"]["documents"] == m["val_documents"]
    assert 1.0 < m["bytes_per_token"] < 10 and 0 < m["tokens_per_word"] < 10
    assert 0 < m["byte_fallback_fraction"] < 0.5
    # The held-out text is harder than the training text for a tokenizer fitted to the latter.
    assert ev["train"]["bytes_per_token"] >= ev["heldout"]["bytes_per_token"] * 0.8
    assert res.tables and res.tables[0]["rows"][0][0] == "held-out"
    assert any(label.startswith("compression") for label, _ in res.summary)


def test_held_out_documents_are_not_trained_on(tmp_path, corpus, monkeypatch):
    from llmforge.tokenizer import train as train_mod

    seen = []
    real = train_mod.train_sentencepiece

    def spy(texts, **kw):
        texts = list(texts)
        seen.extend(texts)
        return real(texts, **kw)

    monkeypatch.setattr(train_mod, "train_sentencepiece", spy)
    ctx = make_ctx(tmp_path / "p", SMALL, corpus=corpus)
    res = run_tokenizer(ctx)
    assert len(seen) == res.metrics["train_documents"]


def test_no_corpus_names_the_data_stage(tmp_path):
    ctx = make_ctx(tmp_path / "p", SMALL)
    with pytest.raises(StageInputError, match="llmforge run data"):
        run_tokenizer(ctx)


def test_empty_corpus(tmp_path):
    (tmp_path / "c").mkdir()
    ctx = make_ctx(tmp_path / "p", SMALL, corpus=tmp_path / "c")
    with pytest.raises(UserInputError, match=r"no \*\.jsonl\.gz"):
        run_tokenizer(ctx)
    folder = write_corpus(tmp_path / "c2", ["", ""], n_files=1)
    ctx = make_ctx(tmp_path / "p2", SMALL, corpus=folder)
    with pytest.raises(StageInputError, match="corpus is empty"):
        run_tokenizer(ctx)


def test_corpus_too_small_for_vocab(tmp_path, docs):
    folder = write_corpus(tmp_path / "c", docs[:40], n_files=1)
    ctx = make_ctx(tmp_path / "p", {"vocab_size": 5000}, corpus=folder)
    with pytest.raises(
        UserInputError, match=r"tokenizer\.vocab_size: 5000 is more than this corpus supports"
    ):
        run_tokenizer(ctx)


def test_vocab_too_small_for_special_tokens(tmp_path):
    with pytest.raises(ManifestError, match=r"tokenizer\.vocab_size 200 is too small"):
        make_ctx(tmp_path / "p", {"vocab_size": 200})


def test_vocab_too_small_for_characters(tmp_path, corpus):
    ctx = make_ctx(tmp_path / "p", {"vocab_size": 300, "character_coverage": 1.0}, corpus=corpus)
    with pytest.raises(UserInputError, match=r"tokenizer\.vocab_size: 300 is too small"):
        run_tokenizer(ctx)


def test_bad_chat_template_fails_before_training(tmp_path, corpus, monkeypatch):
    from llmforge.tokenizer import train as train_mod

    monkeypatch.setattr(train_mod, "train_sentencepiece", lambda *a, **k: pytest.fail("trained anyway"))
    ctx = make_ctx(tmp_path / "p", {**SMALL, "chat_template": "{% for m in messages %}"}, corpus=corpus)
    with pytest.raises(UserInputError, match=r"tokenizer\.chat_template"):
        run_tokenizer(ctx)
    ctx = make_ctx(tmp_path / "p2", {**SMALL, "chat_tokens": ["<|only|>"]}, corpus=corpus)
    with pytest.raises(UserInputError, match=r"tokenizer\.chat_template.*two chat tokens"):
        run_tokenizer(ctx)


def test_chat_template_from_file(tmp_path, corpus):
    root = tmp_path / "p"
    root.mkdir()
    tpl = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    (root / "chat.jinja").write_text(tpl)
    ctx = make_ctx(root, {**SMALL, "chat_template": "chat.jinja"}, corpus=corpus)
    res = run_tokenizer(ctx)
    assert load_tokenizer_info(res.outputs["tokenizer"]).chat_template == tpl


def test_tokenizer_from_existing_dir(tmp_path, tok_dir, corpus):
    # Bring the session tokenizer as if it belonged to a model being fine-tuned: ids stay identical.
    ctx = make_ctx(tmp_path / "p", {"from": str(tok_dir), "shards": {"workers": 1}}, corpus=corpus)
    res = run_tokenizer(ctx)
    out = res.outputs["tokenizer"]
    assert (out / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    a, b = load_tokenizer_info(out), load_tokenizer_info(tok_dir)
    assert (a.eos_id, a.bos_id, a.pad_id, a.chat_token_ids, a.sha256) == (
        b.eos_id,
        b.bos_id,
        b.pad_id,
        b.chat_token_ids,
        b.sha256,
    )
    assert a.chat_template == b.chat_template
    assert "shards" in res.outputs and res.metrics["vocab_size"] == b.vocab_size
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out))
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    from llmforge.tokenizer.info import load_tokenizer

    want = hf.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    assert load_tokenizer(out).encode_chat(msgs) == (list(want["input_ids"]), list(want["assistant_masks"]))


def test_tokenizer_from_without_corpus_and_checks(tmp_path, tok_dir):
    ctx = make_ctx(tmp_path / "p", {"from": str(tok_dir), "special_tokens": {"eos": "<|im_end|>"}})
    res = run_tokenizer(ctx)
    assert set(res.outputs) == {"tokenizer"}
    info = load_tokenizer_info(res.outputs["tokenizer"])
    assert info.eos_token == "<|im_end|>"  # an explicit manifest value overrides the directory's own

    # A directory without a chat template and without the chat tokens: the error names the knob.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(tok_dir / "tokenizer.json", bare / "tokenizer.json")
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    ctx = make_ctx(tmp_path / "p2", {"from": str(bare), "chat_tokens": ["<|a|>", "<|b|>"]})
    with pytest.raises(UserInputError, match=r"tokenizer\.chat_template"):
        run_tokenizer(ctx)
    ctx = make_ctx(tmp_path / "p3", {"from": str(tmp_path / "nowhere")})
    with pytest.raises(UserInputError, match=r"tokenizer\.from"):
        run_tokenizer(ctx)
    ctx = make_ctx(tmp_path / "p4", {"from": str(bare), "special_tokens": {"eos": "<nope>"}})
    with pytest.raises(UserInputError, match=r"tokenizer\.special_tokens\.eos"):
        run_tokenizer(ctx)


def test_tokenizer_from_lossy_tokenizer_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    # A word-level tokenizer loses everything outside its vocabulary: not usable for a language model.
    lossy = tmp_path / "lossy"
    lossy.mkdir()
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "</s>": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(lossy / "tokenizer.json"))
    (lossy / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    ctx = make_ctx(tmp_path / "p", {"from": str(lossy)})
    with pytest.raises(TokenizerError, match=r"tokenizer\.from.*does not decode"):
        run_tokenizer(ctx)


def test_info_check_is_an_error(tok_dir):
    info = load_tokenizer_info(tok_dir)
    info.check("model config", eos_id=info.eos_id, vocab_size=info.vocab_size + 64)
    with pytest.raises(TokenizerError, match="eos_id 7 != the tokenizer's 2"):
        info.check("model config", eos_id=7)
    with pytest.raises(TokenizerError, match="vocab_size"):
        info.check("model config", vocab_size=info.vocab_size - 1)
    assert info.generation_config() == {"eos_token_id": [2, 5], "bos_token_id": 1, "pad_token_id": 3}
