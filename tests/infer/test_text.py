"""Text: incremental UTF-8-safe detokenization and stop strings held back across tokens."""

from __future__ import annotations

import random

import pytest

from llmforge.infer import Engine, Request, SamplingParams
from llmforge.infer.detokenize import IncrementalDetokenizer
from llmforge.infer.stop import StopStringMatcher

from .conftest import ScriptedLM

TEXTS = ["hi é 中😀 ok", "😀😀a", "naïve café, ñ!", "中文文本测试 emoji 🚀 end"]


def _stream(tokenizer, prompt, ids):
    d = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [d.add(t) for t in ids]
    return deltas, d.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_never_emits_half_a_character(tokenizer, text):
    prompt = tokenizer.encode("say:")
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.replace(" ", ""))  # really byte-fallback: some characters span tokens
    deltas, rest = _stream(tokenizer, prompt, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + rest == text
    assert rest == ""
    full = tokenizer.decode(prompt + ids)
    assert "".join(deltas) == full[len(tokenizer.decode(prompt)) :]


def test_detokenizer_matches_whole_sequence_decoding_on_random_text(tokenizer):
    """Random strings of 1-4-byte characters, streamed token by token, equal decoding everything at once."""
    rng = random.Random(0)
    pool = [*list("abcxyz ,.!#"), "é", "ñ", "中", "文", "😀", "🚀", "€"]
    for _ in range(200):
        prompt = tokenizer.encode("".join(rng.choice(pool) for _ in range(rng.randrange(1, 6))))
        ids = tokenizer.encode("".join(rng.choice(pool) for _ in range(rng.randrange(1, 20))))
        deltas, rest = _stream(tokenizer, prompt, ids)
        assert all("\ufffd" not in d for d in deltas) and rest == ""
        assert "".join(deltas) == tokenizer.decode(prompt + ids)[len(tokenizer.decode(prompt)) :]


def test_detokenizer_releases_invalid_bytes_instead_of_waiting_forever(tokenizer):
    bad = [tokenizer.encode("é")[0]] * 6  # lead bytes with no continuation: never a valid character
    d = IncrementalDetokenizer(tokenizer, tokenizer.encode("x"))
    out = "".join(d.add(t) for t in bad)
    assert out and set(out) == {"\ufffd"}  # released after at most 4 pending tokens, not held forever
    assert out + d.flush() == tokenizer.decode(bad)


def test_stop_string_split_across_three_tokens_is_held_back():
    m = StopStringMatcher(["###"])
    assert m.feed("ab#") == ("ab", False)  # "#" might start the stop string: held
    assert m.feed("#") == ("", False)
    assert m.feed("#tail") == ("", True)  # completed: nothing after it is released
    assert m.feed("more") == ("", True)
    m = StopStringMatcher(["###"], include_stop=True)
    assert [m.feed(t) for t in ("x#", "#", "#y")] == [("x", False), ("", False), ("###", True)]


def test_stop_string_that_never_completes_is_released():
    m = StopStringMatcher(["###", "end"])
    assert m.feed("a##") == ("a", False)
    assert m.feed("b") == ("##b", False)  # the prefix broke: released with what follows
    assert m.feed("e") == ("", False)
    assert m.feed("n") == ("", False)
    assert m.flush() == "en"  # the request ended for another reason: the held text was not a stop


def test_earliest_stop_string_wins():
    m = StopStringMatcher(["cd", "bcde"])
    assert m.feed("abcdef") == ("a", True)
    assert m.matched == "bcde"


def _scripted(tokenizer, text_tokens: list[int], prompt_len: int = 3, **engine_kw):
    model = ScriptedLM(text_tokens, prompt_len)
    return Engine(model, tokenizer, max_batch=2, **engine_kw), list(range(3, 3 + prompt_len))


def test_engine_streams_multibyte_text_and_stops_on_a_string_across_tokens(tokenizer):
    script = tokenizer.encode("é中 ok ### gone")  # the stop string is three single-char tokens
    engine, prompt = _scripted(tokenizer, script)
    events = []
    engine.run(
        [Request("a", prompt, SamplingParams(max_tokens=30, temperature=0, stop=["###"]))],
        on_event=events.append,
    )
    texts = [e.text for e in events]
    assert "".join(texts) == "é中 ok "
    assert all("\ufffd" not in t and "#" not in t for t in texts)
    assert events[-1].finish_reason == "stop"
    assert sum(len(e.token_ids) for e in events) == len(
        tokenizer.encode("é中 ok ###")
    )  # tokens up to the stop
    assert texts[:2] == ["", "é"]  # the two bytes of "é" arrive as one character, on the second byte


def test_engine_releases_a_stop_prefix_that_never_completes(tokenizer):
    script = tokenizer.encode("a##b##")
    engine, prompt = _scripted(tokenizer, script)
    out = engine.run(
        [Request("a", prompt, SamplingParams(max_tokens=len(script), temperature=0, stop=["###"]))]
    )[0]
    assert out.text == "a##b##" and out.finish_reason == "length"
    engine, prompt = _scripted(tokenizer, script)
    kept = engine.run(
        [
            Request(
                "a",
                prompt,
                SamplingParams(max_tokens=9, temperature=0, stop=["b#"], include_stop_str_in_output=True),
            )
        ]
    )[0]
    assert kept.text == "a##b#" and kept.finish_reason == "stop"


def test_engine_text_excludes_eos_and_flushes_at_stop(tokenizer):
    script = [*tokenizer.encode("ok "), 2, *tokenizer.encode("never")]
    engine, prompt = _scripted(tokenizer, script)
    out = engine.run([Request("a", prompt, SamplingParams(max_tokens=20, temperature=0))])[0]
    assert out.text == "ok " and out.finish_reason == "stop" and out.token_ids[-1] == 2
