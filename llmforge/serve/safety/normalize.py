"""Text normalisation for matching, with a map back to the original characters (so a match can be redacted).

Two levels:

* ``light`` (the PII filter): NFKC per character (fullwidth ``４１５`` → ``415``, ``ﬁ`` → ``fi``) and zero-width
  / invisible formatting characters removed. Case and letters are untouched: the PII detectors rely on them.
* ``full`` (the blocklist): ``light``, then diacritics stripped (``bäd`` → ``bad``, also the combining-mark
  "zalgo" overlay ``b̷a̷d̷``), case folded, and look-alike letters from other scripts folded to Latin (Cyrillic
  ``а`` → ``a``, Greek ``ο`` → ``o``, …).

Normalising one character at a time keeps the map exact: ``out[j]`` comes from ``text[index[j]]``. NFKC over
the whole string could also compose sequences, which only matters for combining marks, and those are dropped
in ``full`` anyway. ASCII text (the common case) takes a fast path.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache

# Invisible characters that split a word without showing: zero-width space / (non-)joiner, word joiner,
# soft hyphen, BOM, Mongolian vowel separator, invisible math operators, bidi marks and embeddings.
ZERO_WIDTH = frozenset(
    "\u200b\u200c\u200d\u2060\u00ad\ufeff\u180e\u2061\u2062\u2063\u2064\u200e\u200f"
    "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u034f"
)

# Letters that look like Latin ones (after case folding), mapped to the Latin letter they imitate. Only the
# common confusables of Cyrillic, Greek and a few IPA / Latin-extended letters: enough for the evasions seen in
# practice; NFKC already folds fullwidth, mathematical and enclosed letters.
_HOMOGLYPHS = {
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "ԁ": "d", "ԛ": "q", "ԝ": "w",
    "һ": "h", "ӏ": "l", "ɡ": "g", "ո": "n", "ս": "u", "ց": "g",
    # Greek
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",
    "υ": "u", "χ": "x", "ω": "w", "ς": "s", "σ": "o", "μ": "u", "γ": "y",
    # Latin extended / IPA
    "ı": "i", "ȷ": "j", "ɑ": "a", "ɩ": "i", "ʏ": "y", "ɪ": "i", "ᴀ": "a", "ʙ": "b", "ᴄ": "c", "ᴅ": "d",
    "ᴇ": "e", "ɢ": "g", "ʜ": "h", "ᴊ": "j", "ᴋ": "k", "ʟ": "l", "ᴍ": "m", "ɴ": "n", "ᴏ": "o", "ᴘ": "p",
    "ʀ": "r", "ꜱ": "s", "ᴛ": "t", "ᴜ": "u", "ᴠ": "v", "ᴡ": "w", "ᴢ": "z", "ø": "o", "ł": "l", "đ": "d",
}  # fmt: skip


@lru_cache(maxsize=4096)
def _light_char(c: str) -> str:
    if c in ZERO_WIDTH:
        return ""
    return unicodedata.normalize("NFKC", c)


@lru_cache(maxsize=4096)
def _full_char(c: str) -> str:
    out = []
    for d in unicodedata.normalize("NFKD", _light_char(c)):
        if unicodedata.combining(d) or d in ZERO_WIDTH:
            continue  # diacritics and overlays: `bäd`, `b̷a̷d̷`
        for e in d.casefold():
            out.append(_HOMOGLYPHS.get(e, e))
    return "".join(out)


def normalize(text: str, level: str = "full") -> tuple[str, list[int]]:
    """``(normalised, index)`` where ``normalised[j]`` comes from ``text[index[j]]``."""
    if text.isascii():
        return (text.lower() if level == "full" else text), range(len(text))  # type: ignore[return-value]
    f = _full_char if level == "full" else _light_char
    parts: list[str] = []
    index: list[int] = []
    for i, c in enumerate(text):
        n = f(c) if (level == "full" or not c.isascii()) else c
        if n:
            parts.append(n)
            index.extend([i] * len(n))
    return "".join(parts), index


def span_back(index, text_len: int, start: int, end: int) -> tuple[int, int]:
    """The original ``[start, end)`` of a normalised ``[start, end)`` (``end`` exclusive, never empty)."""
    if start >= len(index):
        return text_len, text_len
    return index[start], index[end - 1] + 1 if end > start else index[start]


def fold(text: str) -> str:
    """The ``full`` normal form of ``text`` (for configured words and for tests)."""
    return normalize(text, "full")[0]
