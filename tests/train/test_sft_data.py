"""SFT data: chat-template masks equal transformers', packing is exact, batches resume and split by rank,
and every kind of bad input is a clear error or a counted skip."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from llmforge.errors import StageInputError, TokenizerError
from llmforge.shards import ShardIndex, write_shards
from llmforge.tokenizer.info import load_tokenizer
from llmforge.train.sft_data import (
    IGNORE_INDEX,
    SFTBatches,
    best_fit_decreasing,
    conversation_hash,
    read_conversations,
    sft_eval_batches,
    tokenize_sft,
)
from tests.tokenizer.conftest import make_docs, train_and_export

MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Write code:\n  def f(): pass"},
    {"role": "assistant", "content": "def f(x):\n    return x  # done 😀"},
    {"role": "user", "content": "中文呢？"},
    {"role": "assistant", "content": "好的，这是中文。"},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A small BPE tokenizer with the ChatML template, trained in-process."""
    return train_and_export(tmp_path_factory.mktemp("sfttok") / "bpe", make_docs(400), vocab_size=700)


def _write_jsonl(path: Path, rows: list, *, raw_lines: list[bytes] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    path.write_bytes(data + b"".join(raw_lines or []))
    return path


def _convs(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "the", "model", "learns", "tokens", "中文", "😀"]
    out = []
    for i in range(n):
        turns = []
        if i % 3 == 0:
            turns.append({"role": "system", "content": "Be brief."})
        for _ in range(1 + i % 2):
            turns.append({"role": "user", "content": " ".join(rng.choice(words, rng.integers(1, 8)))})
            turns.append({"role": "assistant", "content": f"answer {i} " + " ".join(rng.choice(words, 3))})
        out.append({"messages": turns})
    return out


def _split_docs(index: ShardIndex, split: str) -> list[tuple[list[int], list[int]]]:
    ts = index.open(split)
    return [tuple(a.tolist() for a in ts.document(i)) for i in range(ts.num_documents)]


# ---------------------------------------------------------------------------------------------------------
# Rendering and masks
# ---------------------------------------------------------------------------------------------------------


def test_masked_positions_equal_apply_chat_template(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    f = _write_jsonl(tmp_path / "d.jsonl", [{"messages": MULTI_TURN}])
    stats = tokenize_sft([f], tok_dir, tmp_path / "out", seq_len=512, val_fraction=0)
    assert (stats.rows_read, stats.kept, stats.truncated) == (1, 1, 0)
    want = AutoTokenizer.from_pretrained(str(tok_dir)).apply_chat_template(
        MULTI_TURN, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, amask = list(want["input_ids"]), list(want["assistant_masks"])
    index = ShardIndex.load(tmp_path / "out")
    assert index.loss_mask and _split_docs(index, "train") == [(ids, amask)]
    assert stats.tokens == len(ids) and stats.assistant_tokens == sum(amask)
    # Two assistant turns, each a separate run of masked tokens.
    runs = np.flatnonzero(np.diff(np.r_[0, amask, 0]) == 1)
    assert len(runs) == 2
    # The batch trains on exactly those positions, shifted by one: labels[t] is the target of input t.
    for packing in (True, False):
        b = next(SFTBatches(index.open("train"), seq_len=512, batch_size=1, shuffle=False, packing=packing))
        lab = b["labels"][0]
        trained = torch.nonzero(lab != IGNORE_INDEX).flatten().tolist()
        assert trained == [t - 1 for t in range(1, len(ids)) if amask[t]]
        assert lab[trained].tolist() == [ids[t] for t in range(1, len(ids)) if amask[t]]
        assert b["input_ids"][0, : len(ids) - 1].tolist() == ids[:-1]
    # train_on_prompt trains on every target of the conversation.
    b = next(SFTBatches(index.open("train"), seq_len=512, batch_size=1, shuffle=False, train_on_prompt=True))
    assert b["labels"][0, : len(ids) - 1].tolist() == ids[1:]
    assert (b["labels"][0, len(ids) - 1 :] == IGNORE_INDEX).all()


def test_prompt_completion_rows_become_user_and_assistant_turns(tmp_path, tok_dir):
    from llmforge.tokenizer.chat import encode_chat

    rows = [{"prompt": "Say hi", "completion": "hi"}, {"system": "S", "prompt": "p", "completion": "c"}]
    f = _write_jsonl(tmp_path / "pc.jsonl.gz", [])
    with gzip.open(f, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    tokenize_sft([f], tok_dir, tmp_path / "out", seq_len=256, val_fraction=0)
    got = _split_docs(ShardIndex.load(tmp_path / "out"), "train")
    tok = load_tokenizer(tok_dir)
    want0 = encode_chat(tok, [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}])
    want1 = encode_chat(
        tok,
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "p"},
            {"role": "assistant", "content": "c"},
        ],
    )
    assert got == [tuple(want0), tuple(want1)]


def test_parquet_is_read_like_jsonl(tmp_path, tok_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    convs = _convs(12)
    pq.write_table(pa.Table.from_pylist(convs), tmp_path / "d.parquet")
    _write_jsonl(tmp_path / "d.jsonl", convs)
    a = tokenize_sft([tmp_path / "d.parquet"], tok_dir, tmp_path / "a", seq_len=256, val_fraction=0.3, seed=1)
    b = tokenize_sft([tmp_path / "d.jsonl"], tok_dir, tmp_path / "b", seq_len=256, val_fraction=0.3, seed=1)
    assert a.kept == b.kept == 12
    for s in ("train", "val"):
        assert _split_docs(ShardIndex.load(tmp_path / "a"), s) == _split_docs(
            ShardIndex.load(tmp_path / "b"), s
        )
    pq.write_table(
        pa.Table.from_pylist([*convs[:3], {"messages": [{"role": "bot", "content": "x"}]}]),
        tmp_path / "e.parquet",
    )
    with pytest.raises(StageInputError, match=r"e\.parquet: row 3: messages\[0\]\.role 'bot'"):
        tokenize_sft([tmp_path / "e.parquet"], tok_dir, tmp_path / "e", seq_len=256)
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "f.parquet")
    with pytest.raises(StageInputError, match=r"f\.parquet: .*neither a 'messages'"):
        tokenize_sft([tmp_path / "f.parquet"], tok_dir, tmp_path / "f", seq_len=256)


# ---------------------------------------------------------------------------------------------------------
# Bad input: an error naming file, line and field, or a counted skip
# ---------------------------------------------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    ("row", "pattern"),
    [
        (
            {"text": "x"},
            r"d\.jsonl:2: the row has neither 'messages' nor 'prompt'/'completion' \(its fields: text\)",
        ),
        ({"messages": [{"role": "user"}]}, r"d\.jsonl:2: messages\[0\]\.content is missing"),
        ({"messages": [{"content": "x"}]}, r"d\.jsonl:2: messages\[0\]\.role is missing"),
        ({"prompt": "p"}, r"d\.jsonl:2: field 'completion' is missing"),
        (
            {"messages": [{"role": "human", "content": "x"}]},
            r"d\.jsonl:2: messages\[0\]\.role 'human' is not one of",
        ),
        (
            {"messages": [{"role": "user", "content": ["a", "b"]}]},
            r"d\.jsonl:2: messages\[0\]\.content must be a string",
        ),
        (
            {"messages": [{"role": "user", "content": None}]},
            r"messages\[0\]\.content must be a string, got NoneType",
        ),
        ({"prompt": 3, "completion": "c"}, r"d\.jsonl:2: prompt must be a string, got int"),
        ({"messages": "hi"}, r"d\.jsonl:2: field 'messages' must be a list"),
        ({"messages": ["hi"]}, r"d\.jsonl:2: messages\[0\] must be an object"),
        (["not", "an", "object"], r"d\.jsonl:2: a row must be a JSON object, got list"),
        (
            {"messages": [{"role": "user", "content": "\ud800x"}]},
            r"d\.jsonl:2: messages\[0\]\.content is not valid UTF-8",
        ),
    ],
)
def test_malformed_rows_are_errors_naming_file_line_and_field(tmp_path, tok_dir, row, pattern):
    f = _write_jsonl(tmp_path / "d.jsonl", [GOOD, row])
    with pytest.raises(StageInputError, match=pattern):
        tokenize_sft([f], tok_dir, tmp_path / "out", seq_len=64)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_undecodable_lines_are_errors(tmp_path, tok_dir):
    f = _write_jsonl(tmp_path / "d.jsonl", [GOOD], raw_lines=[b'{"prompt": "caf\xe9", "completion": "x"}\n'])
    with pytest.raises(StageInputError, match=r"d\.jsonl:2: not valid UTF-8 \(byte 15"):
        tokenize_sft([f], tok_dir, tmp_path / "out", seq_len=64)
    f = _write_jsonl(tmp_path / "e.jsonl", [GOOD], raw_lines=[b"\n", b'{"messages": [\n'])
    with pytest.raises(StageInputError, match=r"e\.jsonl:3: not valid JSON"):  # the blank line is not a row
        tokenize_sft([f], tok_dir, tmp_path / "out", seq_len=64)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(StageInputError, match=r"x\.csv: unsupported SFT data file"):
        tokenize_sft([tmp_path / "x.csv"], tok_dir, tmp_path / "out", seq_len=64)
    with pytest.raises(StageInputError, match=r"nope\.jsonl: SFT data file not found"):
        tokenize_sft([tmp_path / "nope.jsonl"], tok_dir, tmp_path / "out", seq_len=64)


def test_useless_rows_are_counted_skips(tmp_path, tok_dir):
    long_reply = " ".join(["tokens"] * 200)
    rows = [
        GOOD,
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},  # empty
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},  # empty
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]},  # no assistant
        {"messages": []},  # no assistant
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": long_reply}]
        },  # truncated
        {
            "messages": [{"role": "user", "content": long_reply}, {"role": "assistant", "content": "a"}]
        },  # nothing left
    ]
    f = _write_jsonl(tmp_path / "d.jsonl", rows)
    st = tokenize_sft([f], tok_dir, tmp_path / "t", seq_len=48, val_fraction=0)
    assert st.rows_read == 7 and st.kept == 2 and st.truncated == 1
    assert st.skipped == {"empty_assistant": 2, "no_assistant": 2, "too_long": 0, "truncated_no_assistant": 1}
    assert st.examples[0] == f"{f}:2: empty_assistant" and f"{f}:7: truncated_no_assistant" in st.examples
    docs = _split_docs(ShardIndex.load(tmp_path / "t"), "train")
    assert [len(d[0]) for d in docs][1] == 49  # cut to seq_len + 1 tokens
    assert st.tokens == sum(len(d[0]) for d in docs) and st.assistant_tokens == sum(sum(d[1]) for d in docs)
    st = tokenize_sft([f], tok_dir, tmp_path / "d", seq_len=48, val_fraction=0, truncation="drop")
    assert st.kept == 1 and st.truncated == 0 and st.skipped["too_long"] == 2
    # The counts are in index.json, so an up-to-date re-run reports the same numbers without redoing anything.
    again = tokenize_sft([f], tok_dir, tmp_path / "d", seq_len=48, val_fraction=0, truncation="drop")
    assert again.up_to_date and again.skipped == st.skipped and again.kept == st.kept
    changed = tokenize_sft([f], tok_dir, tmp_path / "d", seq_len=2000, val_fraction=0, truncation="drop")
    assert not changed.up_to_date and changed.kept == 3  # a setting that changes the data redoes it
    # All rows useless: an error that says why.
    g = _write_jsonl(tmp_path / "g.jsonl", rows[1:5])
    with pytest.raises(
        StageInputError, match=r"no conversation to train on \(4 rows read; skipped: empty_assistant 2"
    ):
        tokenize_sft([g], tok_dir, tmp_path / "g", seq_len=48)


def test_a_template_without_generation_markers_is_an_error(tmp_path, tok_dir):
    import shutil

    d = tmp_path / "tok"
    shutil.copytree(tok_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").unlink(missing_ok=True)
    f = _write_jsonl(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(TokenizerError, match=r"no \{% generation %\} block"):
        tokenize_sft([f], d, tmp_path / "out", seq_len=64)


# ---------------------------------------------------------------------------------------------------------
# Validation split
# ---------------------------------------------------------------------------------------------------------


def test_validation_split_is_by_content_hash_and_stable_when_rows_are_added(tmp_path, tok_dir):
    convs = _convs(60)
    a = _write_jsonl(tmp_path / "a" / "d.jsonl", convs[:40])
    b = _write_jsonl(tmp_path / "b" / "d.jsonl", convs[40:] + convs[:40][::-1])  # more rows, other order
    sa = tokenize_sft([a], tok_dir, tmp_path / "sa", seq_len=256, val_fraction=0.25, seed=3)
    tokenize_sft([b], tok_dir, tmp_path / "sb", seq_len=256, val_fraction=0.25, seed=3)
    ia, ib = ShardIndex.load(tmp_path / "sa"), ShardIndex.load(tmp_path / "sb")
    for s in ("train", "val"):
        assert set(map(str, _split_docs(ia, s))) <= set(map(str, _split_docs(ib, s)))
    assert (
        3 <= sa.splits["val"]["conversations"] <= 20
        and sa.splits["train"]["conversations"] + sa.splits["val"]["conversations"] == 40
    )
    want_val = sum(conversation_hash(c["messages"], 3) < 0.25 for c in convs[:40])
    assert sa.splits["val"]["conversations"] == want_val
    tokenize_sft([a], tok_dir, tmp_path / "sc", seq_len=256, val_fraction=0.25, seed=4)
    assert _split_docs(ShardIndex.load(tmp_path / "sc"), "val") != _split_docs(ia, "val")  # the seed matters


def test_val_files_and_tiny_sets(tmp_path, tok_dir):
    convs = _convs(10)
    tr = _write_jsonl(tmp_path / "tr.jsonl", convs[:7])
    va = _write_jsonl(tmp_path / "va.jsonl", convs[7:])
    st = tokenize_sft([tr], tok_dir, tmp_path / "o", seq_len=256, val_files=[va], val_fraction=0.5)
    assert st.splits["train"]["conversations"] == 7 and st.splits["val"]["conversations"] == 3
    with pytest.raises(
        StageInputError, match=r"tr\.jsonl: listed both as training data and as a validation file"
    ):
        tokenize_sft([tr], tok_dir, tmp_path / "o2", seq_len=256, val_files=[tr])
    one = _write_jsonl(tmp_path / "one.jsonl", convs[:2])
    st = tokenize_sft([one], tok_dir, tmp_path / "p", seq_len=256, val_fraction=1e-9)
    assert st.splits["val"]["conversations"] == 1 and st.splits["train"]["conversations"] == 1


# ---------------------------------------------------------------------------------------------------------
# Batches (hand-made shards: exact, fast)
# ---------------------------------------------------------------------------------------------------------


def _sft_shards(root: Path, docs: list[list[int]], masks: list[list[int]], val=None) -> ShardIndex:
    splits = {"train": docs, "val": val[0] if val else docs[:2]}
    mks = {"train": masks, "val": val[1] if val else masks[:2]}
    write_shards(
        root, splits, masks=mks, vocab_size=64, eos_id=2, pad_id=0, append_eos=False, docs_per_file=5
    )
    return ShardIndex.load(root)


def _random_set(n: int, max_len: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    docs, masks = [], []
    for _ in range(n):
        n_tok = int(rng.integers(2, max_len + 1))
        docs.append(rng.integers(3, 64, n_tok).tolist())
        m = (rng.random(n_tok) < 0.5).astype(int)
        m[-1] = 1  # at least one target with loss
        masks.append(m.tolist())
    return docs, masks


def test_best_fit_decreasing_packs_by_size():
    assert best_fit_decreasing(np.array([4, 2, 3]), 8) == [[0, 2], [1]]
    assert best_fit_decreasing(np.array([5, 5, 3, 3]), 8) == [[0, 2], [1, 3]]
    assert best_fit_decreasing(np.array([8, 1]), 8) == [[0], [1]]


def test_packed_rows_hand_checked(tmp_path):
    d0, d1, d2 = [10, 11, 12, 13, 14], [20, 21, 22], [30, 31, 32, 33]
    m0, m1, m2 = [0, 0, 1, 1, 1], [0, 1, 1], [0, 0, 0, 1]
    index = _sft_shards(tmp_path, [d0, d1, d2], [m0, m1, m2])
    it = SFTBatches(index.open("train"), seq_len=8, batch_size=2, shuffle=False, pad_id=0)
    b = next(it)
    assert set(b) == {"input_ids", "labels", "position_ids", "document_ids"}
    assert all(t.dtype == torch.int64 and t.shape == (2, 8) for t in b.values())
    # Row 0 holds d0 (4 slots) then d2 (3 slots) and one pad; row 1 holds d1 (2 slots) and pads.
    X = IGNORE_INDEX
    assert b["input_ids"].tolist() == [[10, 11, 12, 13, 30, 31, 32, 0], [20, 21, 0, 0, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [[X, 12, 13, 14, X, X, 33, X], [21, 22, X, X, X, X, X, X]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 0, 0, 0, 0, 0, 0]]
    assert b["document_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, -1], [0, 0, -1, -1, -1, -1, -1, -1]]
    st = it.epoch_stats()
    assert (st.rows, st.conversations, st.tokens, st.loss_tokens) == (2, 3, 9, 6) and st.fill == 9 / 16
    padded = SFTBatches(index.open("train"), seq_len=8, batch_size=3, shuffle=False, packing=False)
    p = next(padded)
    assert p["input_ids"][2].tolist() == [30, 31, 32, 0, 0, 0, 0, 0]
    assert p["labels"][2].tolist() == [X, X, 33, X, X, X, X, X]
    assert padded.epoch_stats().fill == 9 / 24
    # A conversation of exactly seq_len + 1 tokens fills a row; one more is an error that says what to do.
    SFTBatches(
        _sft_shards(tmp_path / "f", [list(range(3, 12))], [[1] * 9]).open("train"), seq_len=8, batch_size=1
    )
    with pytest.raises(StageInputError, match="re-tokenize the SFT data with this seq_len"):
        SFTBatches(
            _sft_shards(tmp_path / "g", [list(range(3, 13))], [[1] * 10]).open("train"),
            seq_len=8,
            batch_size=1,
        )


def _triples(batches) -> Counter:
    """(input prefix within its conversation, target) of every trained position — what the loss sees."""
    out: Counter = Counter()
    for b in batches:
        for r in range(b["input_ids"].shape[0]):
            inp, lab, doc, pos = (
                b[k][r].tolist() for k in ("input_ids", "labels", "document_ids", "position_ids")
            )
            for t in range(len(inp)):
                if lab[t] != IGNORE_INDEX:
                    assert doc[t] >= 0
                    seg = [inp[u] for u in range(t - pos[t], t + 1)]
                    assert all(doc[u] == doc[t] for u in range(t - pos[t], t + 1))
                    out[(tuple(seg), lab[t])] += 1
    return out


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_packed_and_padded_hold_the_same_training_pairs(tmp_path, train_on_prompt):
    docs, masks = _random_set(57, 17)
    index = _sft_shards(tmp_path, docs, masks)
    kw = dict(seq_len=16, batch_size=1, seed=5, train_on_prompt=train_on_prompt, pack_window=20)
    packed = SFTBatches(index.open("train"), **kw)
    padded = SFTBatches(index.open("train"), packing=False, **kw)
    rp, rd = packed.epoch_stats().rows, padded.epoch_stats().rows
    assert rd == 57 and rp < 40  # packing needs far fewer rows
    a = _triples(next(packed) for _ in range(rp))
    b = _triples(next(padded) for _ in range(rd))
    assert a == b and sum(a.values()) == packed.epoch_stats().loss_tokens
    want = sum(len(d) - 1 if train_on_prompt else sum(m[1:]) for d, m in zip(docs, masks, strict=True))
    assert sum(a.values()) == want


def test_resume_mid_epoch_gives_the_same_next_batches(tmp_path):
    docs, masks = _random_set(40, 12, seed=1)
    split = _sft_shards(tmp_path, docs, masks).open("train")
    for packing in (True, False):
        a = SFTBatches(split, seq_len=16, batch_size=3, seed=2, packing=packing)
        ref = [next(a) for _ in range(30)]  # crosses epoch boundaries
        b = SFTBatches(split, seq_len=16, batch_size=3, seed=2, packing=packing)
        for _ in range(7):
            next(b)
        c = SFTBatches(split, seq_len=16, batch_size=3, seed=2, packing=packing)
        c.load_state_dict(json.loads(json.dumps(b.state_dict())))
        for want in ref[7:]:
            got = next(c)
            assert all(torch.equal(got[k], want[k]) for k in want)
        assert c.epoch >= 1
    with pytest.raises(StageInputError, match="packing=True"):
        SFTBatches(split, seq_len=16, batch_size=3, packing=False).load_state_dict(
            SFTBatches(split, seq_len=16, batch_size=3).state_dict()
        )


def test_shuffle_is_seeded_per_epoch(tmp_path):
    docs, masks = _random_set(40, 12, seed=1)
    split = _sft_shards(tmp_path, docs, masks).open("train")
    a = SFTBatches(split, seq_len=16, batch_size=1, seed=2)
    rows0 = a._rows.rows(0)
    assert sorted(np.concatenate(rows0).tolist()) == list(range(40))  # each conversation once per epoch
    assert [r.tolist() for r in rows0] != [r.tolist() for r in a._rows.rows(1)]
    # Rows are shuffled after packing: best-fit decreasing alone would order them by their largest item.
    big = SFTBatches(split, seq_len=16, batch_size=1, seed=2, pack_window=1000)
    firsts = [int(big._rows.lengths[r].max()) for r in big._rows.rows(0)]
    assert firsts != sorted(firsts, reverse=True)
    b = SFTBatches(split, seq_len=16, batch_size=1, seed=3)
    assert [r.tolist() for r in b._rows.rows(0)] != [r.tolist() for r in rows0]


@pytest.mark.parametrize("packing", [True, False])
def test_two_ranks_of_b_equal_one_rank_of_2b(tmp_path, packing):
    docs, masks = _random_set(45, 12, seed=4)
    split = _sft_shards(tmp_path, docs, masks).open("train")
    kw = dict(seq_len=16, seed=9, packing=packing)
    whole = SFTBatches(split, batch_size=4, **kw)
    r0 = SFTBatches(split, batch_size=2, rank=0, world_size=2, **kw)
    r1 = SFTBatches(split, batch_size=2, rank=1, world_size=2, **kw)
    for _ in range(25):  # several epochs
        w, a, b = next(whole), next(r0), next(r1)
        assert all(torch.equal(torch.cat([a[k], b[k]]), w[k]) for k in w)
    ev = sft_eval_batches(split, seq_len=16, batch_size=4, num_batches=3, packing=packing)
    e0 = sft_eval_batches(
        split, seq_len=16, batch_size=2, num_batches=3, rank=0, world_size=2, packing=packing
    )
    e1 = sft_eval_batches(
        split, seq_len=16, batch_size=2, num_batches=3, rank=1, world_size=2, packing=packing
    )
    assert len(ev) == 3
    for w, a, b in zip(ev, e0, e1, strict=True):
        assert all(torch.equal(torch.cat([a[k], b[k]]), w[k]) for k in w)
    again = sft_eval_batches(split, seq_len=16, batch_size=4, num_batches=3, packing=packing)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(ev, again, strict=True) for k in x)  # fixed set


def test_eval_batches_never_wrap(tmp_path):
    docs, masks = _random_set(10, 12, seed=4)
    split = _sft_shards(tmp_path, docs, masks).open("train")
    ev = sft_eval_batches(split, seq_len=16, batch_size=3, num_batches=100, packing=False)
    assert len(ev) == 3  # 10 rows // 3
    assert sft_eval_batches(split, seq_len=16, batch_size=11, num_batches=5, packing=False) == []


def test_batches_without_loss_are_impossible(tmp_path):
    docs, masks = _random_set(6, 8, seed=2)
    masks[1] = [1] + [0] * (len(docs[1]) - 1)  # only the first token is masked in: it is never a target
    masks[4] = [0] * len(docs[4])
    split = _sft_shards(tmp_path, docs, masks).open("train")
    it = SFTBatches(split, seq_len=8, batch_size=1, packing=False, shuffle=False)
    assert it.num_conversations == 4 and it.num_unusable == 2
    assert all((next(it)["labels"] != IGNORE_INDEX).any() for _ in range(12))
    assert SFTBatches(split, seq_len=8, batch_size=1, train_on_prompt=True).num_conversations == 6
    none = _sft_shards(tmp_path / "z", [[5, 6, 7]], [[1, 0, 0]])
    with pytest.raises(StageInputError, match="no conversation with a token to train on"):
        SFTBatches(none.open("train"), seq_len=8, batch_size=1)
    with pytest.raises(StageInputError, match=r"one micro-batch of 2 x 4 rows needs 8"):
        SFTBatches(split, seq_len=8, batch_size=4, world_size=2, packing=False)


def test_pretraining_shards_are_refused_with_a_clear_error(tmp_path):
    write_shards(tmp_path, {"train": [[3, 4, 5]] * 4}, vocab_size=64, eos_id=2)
    with pytest.raises(StageInputError, match="no loss mask"):
        SFTBatches(ShardIndex.load(tmp_path).open("train"), seq_len=8, batch_size=1)


def test_read_conversations_counts(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", [GOOD, {"messages": []}, GOOD])
    from llmforge.train.sft_data import SFTDataStats

    st = SFTDataStats()
    got = list(read_conversations([tmp_path], st))
    assert (
        [w for w, _ in got] == [f"{f}:1", f"{f}:3"] and st.rows_read == 3 and st.skipped["no_assistant"] == 1
    )


def test_end_to_end_tokenize_then_batch(tmp_path, tok_dir):
    f = _write_jsonl(tmp_path / "d.jsonl", _convs(30))
    st = tokenize_sft([f], tok_dir, tmp_path / "s", seq_len=64, val_fraction=0.2, seed=0)
    index = ShardIndex.load(tmp_path / "s")
    assert index.raw["sft"]["stats"]["kept"] == st.kept == 30
    it = SFTBatches(index.open("train"), seq_len=64, batch_size=2, pad_id=index.pad_id)
    b = next(it)
    assert (b["input_ids"][b["document_ids"] < 0] == index.pad_id).all()
    assert it.epoch_stats().fill > 0.7
    assert (
        it.epoch_stats().loss_tokens == st.splits["train"]["assistant_tokens"]
    )  # ChatML: no mask on token 0


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_a_model_sees_the_same_loss_packed_and_padded(tmp_path, train_on_prompt):
    # The data contract end to end: with the model's document mask, packing changes nothing the loss sees.
    from llmforge.model import Llama
    from tests.model.conftest import tiny_config

    torch.manual_seed(0)
    model = Llama(tiny_config(vocab_size=64)).eval()
    docs, masks = _random_set(23, 15, seed=7)
    split = _sft_shards(tmp_path, docs, masks).open("train")
    totals = {}
    for packing in (True, False):
        it = SFTBatches(split, seq_len=16, batch_size=1, packing=packing, train_on_prompt=train_on_prompt)
        ce, n = torch.zeros((), dtype=torch.float64), 0
        with torch.no_grad():
            for _ in range(it.epoch_stats().rows):  # exactly one epoch
                b = next(it)
                logits = model(b["input_ids"], position_ids=b["position_ids"], document_ids=b["document_ids"])
                ce += torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1).double(), b["labels"].flatten(), reduction="sum"
                )
                n += int((b["labels"] != IGNORE_INDEX).sum())
        totals[packing] = (ce.item(), n)
    assert totals[True][1] == totals[False][1] > 0
    assert totals[True][0] == pytest.approx(totals[False][0], rel=1e-5)
