"""Generated strings that exercise the corners where a fast tokenizer drifts from sentencepiece.

The export check (``export.verify_parity``) runs a few hundred of these on every export; the tests run thousands.
Each family targets one known failure of naive sentencepiece → Hugging Face conversions: leading spaces
(dummy prefix), whitespace runs (whitespace normalisation), code indentation, CJK and emoji (character
coverage), characters the vocabulary has never seen (byte fallback), and chat markup (user-defined symbols
matched inside text).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

WORDS = [  # also the benchmark corpus's vocabulary (benchmarks/bench_tokenize.py)
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "one",
    "all",
    "we",
    "can",
    "their",
    "has",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "model",
    "data",
    "token",
    "language",
    "training",
    "learning",
    "network",
    "transformer",
    "attention",
]
_CODE = [
    "def f(x):\n    return x + 1\n",
    "for i in range(10):\n\tprint(i, end='')\n",
    "if (a && b) { return -1; }\n",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)\n",
    "class A:\n    def __init__(self):\n        self.x = {'k': [1, 2, 3]}\n",
    "SELECT * FROM t WHERE id = 42;\n",
    '    "key": "value",\n    "n": 12345\n',
    '#include <stdio.h>\nint main() { printf("%d\\n", 1); }\n',
]
_CJK = "中文分词测试你好世界日本語のテキスト한국어텍스트漢字"
_EMOJI = "😀🎉👍🏽👨‍👩‍👧🚀❤️🇺🇸✨"
# Characters a small test corpus never contains, so they must go through byte fallback.
_RARE = "ꙮ𓀀𝔘ሰ᚛ᚁ᚜ⰀꝎ𐍈ᐁ∰⨌Ⴁ"
_SPACES = [" ", "  ", "   ", "    ", "\t", "\n", "\n\n", " \n", "\r\n", "\u3000", "\u00a0"]
_PUNCT = list(".,;:!?'\"()[]{}<>/\\|-_=+*&^%$#@~`")
_MARKUP = ["<|im_start|>", "<|im_end|>", "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n"]


def _word(rng: random.Random) -> str:
    return rng.choice(WORDS)


def _family(rng: random.Random, kind: int, markup: Sequence[str]) -> str:
    if kind == 0:  # plain prose with leading/trailing spaces
        text = " ".join(_word(rng) for _ in range(rng.randint(1, 20)))
        return rng.choice(["", " ", "  "]) + text + rng.choice(["", " ", ".", "\n"])
    if kind == 1:  # code
        return "".join(rng.choice(_CODE) for _ in range(rng.randint(1, 3)))
    if kind == 2:  # whitespace runs between words
        return "".join(rng.choice(_SPACES) + _word(rng) for _ in range(rng.randint(1, 10))) + rng.choice(
            _SPACES
        )
    if kind == 3:  # CJK, mixed with Latin
        return "".join(
            rng.choice(_CJK) if rng.random() < 0.7 else " " + _word(rng) for _ in range(rng.randint(1, 25))
        )
    if kind == 4:  # emoji
        return " ".join(rng.choice(_EMOJI) + rng.choice(["", _word(rng)]) for _ in range(rng.randint(1, 8)))
    if kind == 5:  # byte fallback: characters outside any small vocabulary
        return "".join(
            rng.choice(_RARE) + rng.choice(["", " ", _word(rng)]) for _ in range(rng.randint(1, 8))
        )
    if kind == 6:  # chat markup embedded in text
        parts = []
        for _ in range(rng.randint(1, 6)):
            parts.append(rng.choice(markup) if markup else "")
            parts.append(" ".join(_word(rng) for _ in range(rng.randint(0, 5))))
        return "".join(parts)
    if kind == 7:  # digits, punctuation and numbers
        return "".join(
            rng.choice([str(rng.randint(0, 10 ** rng.randint(1, 9))), rng.choice(_PUNCT), " ", _word(rng)])
            for _ in range(rng.randint(1, 15))
        )
    # kind 8: random Unicode code points (excluding surrogates), the most hostile input
    out = []
    for _ in range(rng.randint(1, 12)):
        cp = rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xA0, 0x2FFF), rng.randint(0x1F300, 0x1FAFF)])
        out.append(chr(cp))
    return "".join(out)


def generate_samples(n: int, *, seed: int = 0, markup: Sequence[str] = tuple(_MARKUP)) -> list[str]:
    """``n`` deterministic test strings cycling through all families (code, spaces, CJK, emoji, bytes, chat)."""
    rng = random.Random(seed)
    return [_family(rng, i % 9, markup) for i in range(n)]


def markup_for(chat_tokens: Sequence[str]) -> list[str]:
    """Chat-markup fragments built from a tokenizer's own chat tokens (for parity checks of custom markup)."""
    frags = list(chat_tokens)
    for tok in chat_tokens:
        frags += [tok + "user\n", tok + "assistant\n", tok + "\n"]
    return frags
