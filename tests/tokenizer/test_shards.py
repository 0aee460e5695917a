"""Token shards: format, boundaries, EOS framing, split determinism, resume, parallel == serial."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from llmforge.errors import StageInputError
from llmforge.tokenizer import shards as shards_mod
from llmforge.tokenizer.shards import shard_dtype, tokenize_corpus

from .conftest import write_corpus


def _read_split(out: Path, split: str) -> list[np.ndarray]:
    """All documents of a split, each as its token array (EOS included), via the index and .docs.npy."""
    index = json.loads((out / "index.json").read_text())
    docs = []
    for f in index["splits"][split]["files"]:
        tokens = np.memmap(out / f["name"], dtype=index["dtype"], mode="r")
        starts = np.load(out / f["name"].replace(".bin", ".docs.npy"))
        assert (
            starts.dtype == np.int64 and len(tokens) == f["num_tokens"] and len(starts) == f["num_documents"]
        )
        ends = [*starts[1:].tolist(), len(tokens)]
        docs += [np.array(tokens[s:e]) for s, e in zip(starts.tolist(), ends, strict=True)]
    return docs


def _all_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_dtype_choice():
    assert shard_dtype(1200) == np.uint16
    assert shard_dtype(65535) == np.uint16
    assert shard_dtype(65536) == np.uint32
    assert shard_dtype(151_000) == np.uint32


def test_shards_roundtrip_and_index(tmp_path, corpus, docs, tok_dir):
    out = tmp_path / "shards"
    stats = tokenize_corpus(corpus, tok_dir, out, val_fraction=0.1, seed=3, shard_tokens=20_000, workers=1)
    index = json.loads((out / "index.json").read_text())
    fast = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    eos = fast.token_to_id("</s>")
    assert index["format"] == "llmforge.shards.v1" and index["dtype"] == "uint16"
    assert (index["eos_id"], index["bos_id"], index["pad_id"]) == (eos, fast.token_to_id("<s>"), 3)
    assert index["vocab_size"] == fast.get_vocab_size() and len(index["tokenizer_sha256"]) == 64
    train, val = _read_split(out, "train"), _read_split(out, "val")
    assert len(train) + len(val) == len(docs) == stats.num_documents
    assert 40 < len(val) < 140  # ~10% of 900
    assert len(index["splits"]["train"]["files"]) > 1  # shard_tokens cut it into several files
    assert all(f["num_tokens"] < 20_000 + 2_000 for f in index["splits"]["train"]["files"])
    # Every document ends with EOS, has no BOS, and decodes back to one of the corpus documents.
    want = {
        fast.decode(fast.encode(d, add_special_tokens=False).ids, skip_special_tokens=False) for d in docs
    }
    for d in train + val:
        assert d[-1] == eos
        assert fast.decode(d[:-1].tolist(), skip_special_tokens=False) in want
    assert sum(len(d) for d in train) == index["splits"]["train"]["num_tokens"]
    # Corpus order is kept: the first training document is the first corpus document not held out.
    assert fast.decode(train[0][:-1].tolist(), skip_special_tokens=False) in want


def test_split_is_deterministic_by_seed(tmp_path, corpus, tok_dir):
    a = tokenize_corpus(corpus, tok_dir, tmp_path / "a", val_fraction=0.2, seed=1, workers=1)
    tokenize_corpus(corpus, tok_dir, tmp_path / "b", val_fraction=0.2, seed=1, workers=1)
    c = tokenize_corpus(corpus, tok_dir, tmp_path / "c", val_fraction=0.2, seed=2, workers=1)
    assert _all_bytes(tmp_path / "a") == _all_bytes(tmp_path / "b")
    va, vc = _read_split(tmp_path / "a", "val"), _read_split(tmp_path / "c", "val")
    assert [d.tolist() for d in va] != [d.tolist() for d in vc]
    assert a.splits["val"].num_documents > 0 and c.splits["val"].num_documents > 0


def test_parallel_equals_serial(tmp_path, corpus, tok_dir):
    tokenize_corpus(corpus, tok_dir, tmp_path / "serial", val_fraction=0.05, workers=1, shard_tokens=30_000)
    stats = tokenize_corpus(
        corpus, tok_dir, tmp_path / "par", val_fraction=0.05, workers=2, shard_tokens=30_000
    )
    assert stats.input_files == 4
    assert _all_bytes(tmp_path / "serial") == _all_bytes(tmp_path / "par")


def test_resume_after_kill(tmp_path, corpus, tok_dir, monkeypatch):
    out = tmp_path / "shards"
    real = shards_mod._process_part
    calls = []

    def dying(job):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is killed while tokenizing the third file
        calls.append(job.index)
        return real(job)

    monkeypatch.setattr(shards_mod, "_process_part", dying)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(corpus, tok_dir, out, workers=1)
    assert not (out / "index.json").exists()  # nothing that looks finished
    monkeypatch.setattr(shards_mod, "_process_part", real)
    stats = tokenize_corpus(corpus, tok_dir, out, workers=1)
    assert stats.parts_reused == 2 and not stats.skipped
    assert not (tmp_path / ".shards.work").exists()
    tokenize_corpus(corpus, tok_dir, tmp_path / "clean", workers=1)
    assert _all_bytes(out) == _all_bytes(tmp_path / "clean")
    # A second run over unchanged inputs does nothing.
    assert tokenize_corpus(corpus, tok_dir, out, workers=1).skipped


def test_truncated_gzip_and_bad_lines(tmp_path, docs, tok_dir):
    folder = write_corpus(tmp_path / "c", docs[:60], n_files=2)
    data = (folder / "00001.jsonl.gz").read_bytes()
    (folder / "00001.jsonl.gz").write_bytes(data[: len(data) // 2])  # writer killed mid-file
    (folder / "sub").mkdir()
    with gzip.open(folder / "sub" / "00002.jsonl.gz", "wt") as fh:  # read recursively
        fh.write('{"text": "fine"}\nnot json\n{"no_text": 1}\n{"text": ""}\n')
    stats = tokenize_corpus(folder, tok_dir, tmp_path / "s", val_fraction=0, workers=1)
    assert stats.read.truncated_files == [str(folder / "00001.jsonl.gz")]
    assert stats.read.bad_lines == 2 and stats.read.empty == 1
    assert 31 <= stats.num_documents < 61


def test_empty_corpus_is_an_error(tmp_path, tok_dir):
    (tmp_path / "c").mkdir()
    with pytest.raises(StageInputError, match=r"no \*\.jsonl\.gz"):
        tokenize_corpus(tmp_path / "c", tok_dir, tmp_path / "s")
    with gzip.open(tmp_path / "c" / "0.jsonl.gz", "wt") as fh:
        fh.write('{"text": ""}\n')
    with pytest.raises(StageInputError, match="no documents"):
        tokenize_corpus(tmp_path / "c", tok_dir, tmp_path / "s")
    with pytest.raises(StageInputError, match="corpus folder not found"):
        tokenize_corpus(tmp_path / "missing", tok_dir, tmp_path / "s")


def test_tiny_corpus_still_gets_a_validation_document(tmp_path, tok_dir):
    folder = write_corpus(tmp_path / "c", ["one doc", "two doc", "three doc"], n_files=1)
    stats = tokenize_corpus(folder, tok_dir, tmp_path / "s", val_fraction=0.001, workers=1)
    assert stats.splits["val"].num_documents == 1 and stats.splits["train"].num_documents == 2


def test_uint32_for_large_vocab(tmp_path, tok_dir, docs):
    # Pretend the vocabulary is large: shards switch to uint32 and ids survive unchanged.
    big = tmp_path / "big"
    shutil.copytree(tok_dir, big)
    meta = json.loads((big / "llmforge_tokenizer.json").read_text())
    meta["vocab_size"] = 70_000
    (big / "llmforge_tokenizer.json").write_text(json.dumps(meta))
    folder = write_corpus(tmp_path / "c", docs[:50], n_files=1)
    tokenize_corpus(folder, big, tmp_path / "s32", val_fraction=0, workers=1)
    tokenize_corpus(folder, tok_dir, tmp_path / "s16", val_fraction=0, workers=1)
    assert json.loads((tmp_path / "s32" / "index.json").read_text())["dtype"] == "uint32"
    a = np.fromfile(tmp_path / "s32" / "train_00000.bin", dtype="<u4")
    b = np.fromfile(tmp_path / "s16" / "train_00000.bin", dtype="<u2")
    assert a.tolist() == b.tolist()


def test_tokenizer_shards_are_read_with_their_boundaries(tmp_path, corpus, tok_dir):
    # The tokenizer stage and training share one format: the reader finds every document the writer wrote.
    from llmforge.shards import ShardIndex

    out = tmp_path / "shards"
    tokenize_corpus(corpus, tok_dir, out, val_fraction=0.1, seed=3, shard_tokens=20_000, workers=1)
    index = ShardIndex.load(out)
    assert index.loss_mask is False and all("docs" in f for f in index.splits["train"]["files"])
    for split in ("train", "val"):
        ts = index.open(split)
        want = _read_split(out, split)
        assert ts.has_boundaries and not ts.has_mask and ts.num_documents == len(want)
        assert np.array_equal(ts.document_lengths(), [len(d) for d in want])
        for i in (0, len(want) // 2, len(want) - 1):
            toks, mask = ts.document(i)
            assert mask is None and toks.tolist() == want[i].tolist()
