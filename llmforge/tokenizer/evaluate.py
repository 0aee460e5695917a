"""Tokenizer quality numbers: compression and how often byte fallback kicks in.

* bytes per token — UTF-8 bytes of text / tokens (higher = better compression);
* tokens per word  — tokens / whitespace-separated words (lower = better);
* byte-fallback fraction — share of tokens that are raw ``<0xNN>`` bytes (high on held-out text means the
  vocabulary misses characters of that text: raise ``tokenizer.character_coverage`` or the vocab size).

Reported on held-out documents (the validation split, never seen by tokenizer training) next to the same
numbers on training documents; a large gap means the tokenizer overfits its training sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def byte_fallback_ids(fast: Any) -> np.ndarray:
    """Ids of the 256 ``<0xNN>`` byte pieces (empty for tokenizers without byte fallback)."""
    ids = [fast.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    return np.array([i for i in ids if i is not None], dtype=np.int64)


def evaluate_texts(fast: Any, texts: Sequence[str]) -> dict[str, Any]:
    """Compression and byte-fallback numbers of ``fast`` (a ``tokenizers.Tokenizer``) on ``texts``."""
    texts = [t for t in texts if t]
    if not texts:
        return {
            "documents": 0,
            "tokens": 0,
            "bytes_per_token": None,
            "tokens_per_word": None,
            "byte_fallback_fraction": None,
        }
    encs = fast.encode_batch_fast(texts, add_special_tokens=False)
    ids = np.fromiter((i for e in encs for i in e.ids), dtype=np.int64)
    n_tokens = int(ids.size)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_words = sum(len(t.split()) for t in texts)
    fb = byte_fallback_ids(fast)
    n_fb = int(np.isin(ids, fb).sum()) if fb.size else 0
    return {
        "documents": len(texts),
        "tokens": n_tokens,
        "bytes_per_token": round(n_bytes / n_tokens, 4) if n_tokens else None,
        "tokens_per_word": round(n_tokens / n_words, 4) if n_words else None,
        "byte_fallback_fraction": round(n_fb / n_tokens, 6) if n_tokens else None,
    }


def evaluate(fast: Any, heldout: Sequence[str], train: Sequence[str]) -> dict[str, Any]:
    """``{"heldout": {...}, "train": {...}}`` as in ``evaluate_texts``."""
    return {"heldout": evaluate_texts(fast, heldout), "train": evaluate_texts(fast, train)}
