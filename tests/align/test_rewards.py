"""Reward functions: the built-ins, `module:function` loading, weighted sums, and the bad-output policy."""

from __future__ import annotations

import math

import pytest

from llmforge.align.rewards import (
    Rewards,
    exact_match,
    length_penalty,
    load_function,
    numeric,
    regex,
)
from llmforge.errors import UserInputError
from llmforge.manifest.rl import RewardSources

P = ["q"] * 4


def test_exact_match_extracts_the_last_answer():
    comps = ["The answer is 7.", "The answer is 8.", "I think 3. The answer is 7", "seven"]
    assert exact_match(P, comps, answer=[7, 7, 7, 7]) == [1.0, 0.0, 1.0, 0.0]
    # a custom pattern without a group compares the whole match
    assert exact_match(P[:1], ["#### 12"], pattern=r"\d+", answer=["12"]) == [1.0]


def test_regex_full_and_search():
    comps = ["The answer is 7.", " The answer is 7. ", "so The answer is 7.", "The answer is x."]
    assert regex(P, comps, pattern=r"The answer is \d+\.") == [1.0, 1.0, 0.0, 0.0]
    assert regex(P, comps, pattern=r"The answer is \d+\.", full=False) == [1.0, 1.0, 1.0, 0.0]


def test_numeric_tolerance():
    comps = ["The answer is 3.14", "The answer is 3.2", "The answer is 1,000", "none"]
    assert numeric(P, comps, answer=[3.1416, 3.1416, 1000, 1], tolerance=0.01) == [1.0, 0.0, 1.0, 0.0]
    assert numeric(P[:2], comps[:2], answer=[3.0, 3.0], tolerance=0.05, relative=True) == [1.0, 0.0]


def test_length_penalty():
    assert length_penalty(P[:3], ["a" * 5, "a" * 10, "a" * 20], max_chars=10) == [0.0, 0.0, -1.0]


def test_load_function_names_the_field():
    where = "align.rewards.functions[2].name"
    with pytest.raises(UserInputError, match=r"functions\[2\]\.name: unknown reward 'nope'"):
        load_function("nope", where)
    with pytest.raises(UserInputError, match=r"functions\[2\]\.name: cannot import module 'no_such_mod'"):
        load_function("no_such_mod:f", where)
    with pytest.raises(UserInputError, match=r"has no callable 'missing'"):
        load_function("math:missing", where)
    assert load_function("tests.align.rl_fixtures:answer_length", where)(P[:1], ["x"], answer=[123]) == [3.0]


def _rewards(functions, scorer=None, **kw) -> Rewards:
    return Rewards.from_config(RewardSources(functions=functions, **kw), scorer=scorer)


def test_weighted_sum_of_functions_and_the_reward_model():
    r = _rewards(
        [
            {"name": "exact_match", "weight": 2.0},
            {"name": "regex", "weight": 0.5, "args": {"pattern": r"The answer is \d+\."}},
        ],
        scorer=lambda msgs, comps: [float(len(c)) for c in comps],
        reward_model=True,
        reward_model_weight=0.1,
    )
    out = r(
        ["What is 3 plus 4?", [{"role": "user", "content": "hi"}]],
        ["The answer is 7.", "7"],
        {"answer": [7, 7]},
    )
    assert out.parts == {"exact_match": [1.0, 0.0], "regex": [1.0, 0.0], "reward_model": [16.0, 1.0]}
    assert out.total == pytest.approx([2.0 + 0.5 + 1.6, 0.1])


def test_config_errors_say_what_to_change():
    with pytest.raises(UserInputError, match="no reward source"):
        _rewards([])
    with pytest.raises(UserInputError, match=r"functions\[0\]\.args: regex needs 'pattern'"):
        _rewards([{"name": "regex"}])
    with pytest.raises(UserInputError, match=r"functions\[0\]\.args: exact_match has no argument 'tol'"):
        _rewards([{"name": "exact_match", "args": {"tol": 1}}])
    with pytest.raises(UserInputError, match="reward_model is true but no reward model"):
        _rewards([], reward_model=True)
    r = _rewards([{"name": "exact_match"}])
    with pytest.raises(UserInputError, match="reads the field 'answer'"):
        r(["q"], ["The answer is 1"], {"solution": [1]})


@pytest.mark.parametrize(
    ("fn", "problem", "expect"),
    [
        ("raising_reward", "error", [0.0, 0.0, 0.0]),
        ("short_reward", "error", [0.0, 0.0, 0.0]),
        ("nan_reward", "non_finite", [0.0, 1.0, 1.0]),
    ],
)
def test_bad_reward_outputs_are_zeroed_counted_and_reported(fn, problem, expect, caplog):
    r = _rewards([{"name": f"tests.align.rl_fixtures:{fn}"}, {"name": "exact_match", "weight": 1.0}])
    out = r(["p1", "p2", "p3"], ["The answer is 1", "c2", "c3"], {"answer": [1, 2, 3]})
    assert out.parts[f"tests.align.rl_fixtures:{fn}"] == expect
    assert out.total == [
        e + x for e, x in zip(expect, [1.0, 0.0, 0.0], strict=True)
    ]  # the others still count
    assert all(math.isfinite(x) for x in out.total)
    stats = r.stats
    assert (stats.errors, stats.non_finite) == ((1, 0) if problem == "error" else (0, 1))
    ex = stats.examples[0]
    assert ex["problem"] == problem and ex["prompt"] == "p1" and ex["completion"] == "The answer is 1"
    assert fn.split("_")[0] in caplog.text or "counted as 0" in caplog.text or "count as 0" in caplog.text


def test_the_reward_model_scores_through_the_reward_module(tmp_path):
    """`reward_model: true` scores with the `reward` stage's model exactly as `reward.score` does."""
    import torch

    from llmforge.align.reward import RewardModel, save_reward_model, score
    from llmforge.align.rewards import reward_model_scorer
    from llmforge.model import preset_config
    from llmforge.tokenizer.info import load_tokenizer_info
    from tests.tokenizer.conftest import make_docs, train_and_export

    tok = train_and_export(tmp_path / "tok", make_docs(60), vocab_size=800)
    info = load_tokenizer_info(tok)
    torch.manual_seed(0)
    config = preset_config(
        "tiny", vocab_size=info.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    rm_dir = save_reward_model(
        RewardModel(config), tmp_path / "rm", config=config, pad_token_id=info.pad_id, tokenizer_dir=tok
    )
    r = _rewards([], scorer=reward_model_scorer(rm_dir), reward_model=True, reward_model_weight=2.0)
    prompts, comps = ["What is 1 plus 1?", [{"role": "user", "content": "hi"}]], ["The answer is 2.", "hello"]
    out = r(prompts, comps, {})
    expected = score(rm_dir, None, prompts, comps)
    assert out.parts["reward_model"] == pytest.approx(expected, rel=1e-5)
    assert out.total == pytest.approx([2 * x for x in expected], rel=1e-5)
