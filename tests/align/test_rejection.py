"""Rejection sampling: best-of-N rows and best-vs-worst pairs with a lineage, readable by SFT."""

from __future__ import annotations

import hashlib
import json

import pytest

from llmforge.align import rejection
from llmforge.align.rejection import best_and_worst
from llmforge.train.sft_data import read_conversations
from tests.align.rl_fixtures import align_project, cached_sft, prompt_rows, write_jsonl


def test_best_and_worst_skip_empty_samples():
    assert best_and_worst([0.0, 1.0, 1.0, -1.0], ["a", "b", "c", "d"]) == (1, 3)
    assert best_and_worst([5.0, 1.0, 0.0], ["", "b", "c"]) == (1, 2)  # an empty answer is never chosen
    assert best_and_worst([1.0, 1.0], ["", " "]) is None


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    return cached_sft(tmp_path_factory)


def test_rejection_sampling_writes_sft_and_pairs_with_lineage(tmp_path, sft):
    base, model = sft
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(1))
    ctx, policy = align_project(
        tmp_path / "p", base["tok"], model,
        align={"method": "none", "rejection_sampling": {"enabled": True, "prompts": [str(prompts)], "num_samples": 6,
                                                          "max_new_tokens": 10, "temperature": 1.0}},
    )  # fmt: skip
    res = rejection.run(ctx, policy)
    out = ctx.out_dir / "rejection"
    assert res.sft_file == out / "sft.jsonl" and res.pairs_file == out / "pairs.jsonl"
    m = res.metrics
    assert m["prompts"] == 9 and m["sft_rows"] + m["all_empty"] == 9
    assert m["best_of_n_reward"] > m["mean_reward"]  # best-of-N beats the average sample
    assert m["pairs"] >= 1 and m["pairs"] + m["no_pair_equal_reward"] == m["sft_rows"]
    pairs = [json.loads(x) for x in res.pairs_file.read_text().splitlines()]
    assert all(p["chosen_reward"] > p["rejected_reward"] and p["chosen"] != p["rejected"] for p in pairs)
    assert all(isinstance(p["prompt"], str) for p in pairs)
    convs = [c for _, c in read_conversations([res.sft_file])]
    assert len(convs) == m["sft_rows"] and convs[0][-1]["role"] == "assistant"
    lineage = json.loads((out / "rejection.lineage.json").read_text())
    assert lineage["files"]["sft.jsonl"] == hashlib.sha256(res.sft_file.read_bytes()).hexdigest()
    assert lineage["reward_sources"] == ["regex", "exact_match"] and lineage["metrics"]["pairs"] == m["pairs"]


def test_rejection_needs_prompts(tmp_path, sft):
    base, model = sft
    ctx, policy = align_project(tmp_path, base["tok"], model, align={"rejection_sampling": {"enabled": True}})
    from llmforge.errors import UserInputError

    with pytest.raises(UserInputError, match=r"rejection_sampling\.prompts: no prompt files"):
        rejection.run(ctx, policy)
