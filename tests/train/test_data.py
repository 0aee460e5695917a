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


def test_boundaries_and_loss_mask_roundtrip(tmp_path):
    docs = [[3, 4, 5], [6], [7, 8, 9, 10], [11, 12], [13, 14, 15]]
    masks = [[0, 1, 1], [1], [0, 0, 1, 1], [1, 0], [0, 0, 0]]
    write_shards(
        tmp_path,
        {"train": docs},
        masks={"train": masks},
        vocab_size=64,
        eos_id=2,
        docs_per_file=2,
        append_eos=False,
    )
    index = ShardIndex.load(tmp_path)
    assert index.loss_mask and len(index.splits["train"]["files"]) == 3
    f0 = index.splits["train"]["files"][0]
    assert (f0["docs"], f0["mask"]) == ("train_00000.docs.npy", "train_00000.mask.bin")
    raw = np.fromfile(tmp_path / "train_00001.mask.bin", dtype=np.uint8)
    assert raw.tolist() == [0, 0, 1, 1, 1, 0]  # one uint8 per token, beside its .bin
    split = index.open("train")
    assert split.has_mask and split.has_boundaries and split.num_documents == 5
    assert split.document_starts().tolist() == [0, 3, 4, 8, 10]
    assert split.document_lengths().tolist() == [3, 1, 4, 2, 3]
    for i, (d, m) in enumerate(zip(docs, masks, strict=True)):
        toks, mask = split.document(i)
        assert toks.tolist() == d and mask.tolist() == m
    assert split.read_mask(2, 3).tolist() == [1, 1, 0]  # across a file boundary
    # Pretraining framing: EOS after every document, trained on.
    write_shards(tmp_path / "p", {"train": docs[:2]}, masks={"train": masks[:2]}, vocab_size=64, eos_id=2)
    s = ShardIndex.load(tmp_path / "p").open("train")
    assert s.read(0, 6).tolist() == [3, 4, 5, 2, 6, 2] and s.read_mask(0, 6).tolist() == [0, 1, 1, 1, 1, 1]
    assert s.document_starts().tolist() == [0, 4]


def test_mask_and_boundary_problems_are_clear(tmp_path):
    write_shards(tmp_path, {"train": [[3, 4], [5]]}, masks={"train": [[1, 1], [0]]}, vocab_size=64, eos_id=2)
    (tmp_path / "train_00000.mask.bin").write_bytes(b"\x01")
    with pytest.raises(StageInputError, match=r"loss mask is missing or does not have one byte per token"):
        ShardIndex.load(tmp_path).open("train")
    write_shards(tmp_path / "b", {"train": [[3, 4], [5]]}, vocab_size=64, eos_id=2)
    np.save(tmp_path / "b" / "train_00000.docs.npy", np.array([0], dtype=np.int64))
    with pytest.raises(StageInputError, match=r"1 document starts but index.json says 2"):
        ShardIndex.load(tmp_path / "b").open("train")
    np.save(tmp_path / "b" / "train_00000.docs.npy", np.array([0, 9], dtype=np.int64))
    with pytest.raises(StageInputError, match=r"not increasing offsets"):
        ShardIndex.load(tmp_path / "b").open("train").document_starts()
    (tmp_path / "b" / "train_00000.docs.npy").unlink()
    with pytest.raises(StageInputError, match=r"boundaries listed in index.json are missing"):
        ShardIndex.load(tmp_path / "b").open("train")
    write_shards(tmp_path / "c", {"train": [[3]]}, vocab_size=64, eos_id=2)
    with pytest.raises(StageInputError, match="no loss mask"):
        ShardIndex.load(tmp_path / "c").open("train").read_mask(0, 1)


def test_shards_written_before_boundaries_were_indexed_still_read(tmp_path):
    # Folders from before this format revision: no loss_mask key, no per-file "docs" names, and (from the old
    # test writer) no .docs.npy at all. Tokens still pack for pretraining; boundaries are a clear error.
    _, docs = _shards(tmp_path)
    raw = json.loads((tmp_path / "index.json").read_text())
    raw.pop("loss_mask")
    for f in raw["splits"]["train"]["files"]:
        f.pop("docs")
        (tmp_path / f["name"].replace(".bin", ".docs.npy")).unlink()
    (tmp_path / "index.json").write_text(json.dumps(raw))
    split = ShardIndex.load(tmp_path).open("train")
    assert not split.has_mask and not split.has_boundaries
    assert (
        next(PackedBatches(split, seq_len=16, batch_size=1, shuffle=False))["input_ids"][0].tolist()
        == _stream(docs)[:16]
    )
    with pytest.raises(StageInputError, match=r"no document boundaries.*re-run"):
        split.document_starts()


def test_writer_output_does_not_depend_on_how_documents_are_batched(tmp_path):
    from llmforge.shards import ShardWriter

    rng = np.random.default_rng(0)
    lens = rng.integers(1, 30, 200)
    toks = rng.integers(0, 60000, int(lens.sum())).astype(np.uint16)
    mask = rng.integers(0, 2, toks.size).astype(np.uint8)
    a = ShardWriter(tmp_path / "a", "train", np.uint16, max_tokens=500, loss_mask=True)
    b = ShardWriter(tmp_path / "b", "train", np.uint16, max_tokens=500, loss_mask=True)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a.add(toks, lens, mask)
    ends = np.cumsum(lens)
    for k in range(0, 200, 7):
        lo = int(ends[k - 1]) if k else 0
        hi = int(ends[min(k + 7, 200) - 1])
        b.add(toks[lo:hi], lens[k : k + 7], mask[lo:hi])
    assert a.finish().files == b.finish().files
    for name in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # Files are cut at the last document boundary within the limit: each is full up to its next document.
    files = a.stats.files
    assert len(files) > 3 and all(f["num_tokens"] <= 500 for f in files)
    first_len = {i: int(lens[sum(f["num_documents"] for f in files[:i])]) for i in range(1, len(files))}
    assert all(files[i - 1]["num_tokens"] + first_len[i] > 500 for i in first_len)
