import json

import numpy as np
import pytest
import torch

from llmforge.errors import StageInputError
from llmforge.train.data import PackedBatches, ShardIndex, eval_batches, write_shards


def _shards(tmp_path, n_tokens=1000, docs_per_file=7, dtype="uint16"):
    # documents of consecutive integers (mod 60 + 3) so every position is checkable
    toks = [3 + i % 60 for i in range(n_tokens)]
    docs = [toks[i : i + 25] for i in range(0, n_tokens, 25)]
    write_shards(
        tmp_path,
        {"train": docs, "val": docs[:4]},
        vocab_size=64,
        eos_id=2,
        dtype=dtype,
        docs_per_file=docs_per_file,
    )
    return ShardIndex.load(tmp_path), docs


def _stream(docs):
    return [t for d in docs for t in [*d, 2]]


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_windows_are_packed_contiguous_and_shifted(tmp_path, dtype):
    index, docs = _shards(tmp_path, dtype=dtype)
    assert len(index.splits["train"]["files"]) > 1  # reads cross file boundaries
    stream = _stream(docs)
    it = PackedBatches(index.open("train"), seq_len=16, batch_size=3, shuffle=False)
    b = next(it)
    assert b["input_ids"].dtype == torch.int64 and b["input_ids"].shape == (3, 16)
    for j in range(3):
        assert b["input_ids"][j].tolist() == stream[j * 16 : j * 16 + 16]
        assert b["labels"][j].tolist() == stream[j * 16 + 1 : j * 16 + 17]


def test_ranks_take_disjoint_blocks_of_the_global_batch(tmp_path):
    index, _ = _shards(tmp_path)
    split = index.open("train")
    single = PackedBatches(split, seq_len=8, batch_size=4, seed=3)
    r0 = PackedBatches(split, seq_len=8, batch_size=2, rank=0, world_size=2, seed=3)
    r1 = PackedBatches(split, seq_len=8, batch_size=2, rank=1, world_size=2, seed=3)
    for _ in range(40):  # crosses an epoch boundary (124 windows)
        whole = next(single)["input_ids"]
        assert torch.equal(torch.cat([next(r0)["input_ids"], next(r1)["input_ids"]]), whole)


def test_shuffle_is_seeded_per_epoch_and_resumable(tmp_path):
    index, _ = _shards(tmp_path)
    split = index.open("train")
    a = PackedBatches(split, seq_len=8, batch_size=4, seed=1)
    first = [next(a)["input_ids"] for _ in range(50)]
    b = PackedBatches(split, seq_len=8, batch_size=4, seed=1)
    for _ in range(20):
        next(b)
    state = b.state_dict()
    c = PackedBatches(split, seq_len=8, batch_size=4, seed=1)
    c.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(next(c)["input_ids"], x) for x in first[20:])
    other = PackedBatches(split, seq_len=8, batch_size=4, seed=2)
    assert not torch.equal(next(other)["input_ids"], first[0])
    # one epoch visits every window exactly once
    d = PackedBatches(split, seq_len=8, batch_size=1, seed=1)
    assert sorted(d._order(0).tolist()) == list(range(d.num_windows))
    assert not np.array_equal(d._order(0), d._order(1))


def test_eval_batches_fixed_and_strided(tmp_path):
    index, _ = _shards(tmp_path)
    split = index.open("train")
    whole = eval_batches(split, seq_len=8, batch_size=4, num_batches=3)
    r0 = eval_batches(split, seq_len=8, batch_size=2, num_batches=3, rank=0, world_size=2)
    r1 = eval_batches(split, seq_len=8, batch_size=2, num_batches=3, rank=1, world_size=2)
    assert len(whole) == 3
    for w, a, b in zip(whole, r0, r1, strict=True):
        assert torch.equal(torch.cat([a["input_ids"], b["input_ids"]]), w["input_ids"])
    assert eval_batches(split, seq_len=8, batch_size=4, num_batches=10_000)[-1]["input_ids"].shape == (4, 8)


def test_too_little_data_is_a_clear_error(tmp_path):
    index, _ = _shards(tmp_path, n_tokens=50)
    with pytest.raises(StageInputError, match=r"lower pretrain\.batch_size"):
        PackedBatches(index.open("train"), seq_len=32, batch_size=4)


def test_index_problems_are_clear(tmp_path):
    with pytest.raises(StageInputError, match="re-run the tokenizer"):
        ShardIndex.load(tmp_path)
    index, _ = _shards(tmp_path)
    f = tmp_path / index.splits["train"]["files"][0]["name"]
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(StageInputError, match="corrupt"):
        index.open("train")
    raw = json.loads((tmp_path / "index.json").read_text())
    raw["format"] = "other"
    (tmp_path / "index.json").write_text(json.dumps(raw))
    with pytest.raises(StageInputError, match="format"):
        ShardIndex.load(tmp_path)


def test_little_endian_on_disk(tmp_path):
    index, docs = _shards(tmp_path, dtype="uint32")
    raw = np.fromfile(tmp_path / index.splits["train"]["files"][0]["name"], dtype="<u4")
    assert raw[: len(docs[0])].tolist() == docs[0]
