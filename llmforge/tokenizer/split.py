"""The train/validation split by document, decided by a seed and the document's position — nothing else.

A document's split depends only on (seed, corpus-relative file name, line index), so it is the same whether
the corpus is read by one process or eight, in any order, and the tokenizer stage can hold out exactly the
documents that the validation shards will contain (tokenizer training never sees them).
"""

from __future__ import annotations

import zlib

import numpy as np

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def file_key(seed: int, rel_name: str) -> int:
    """A 64-bit key for one corpus file under one seed."""
    return (zlib.crc32(rel_name.encode("utf-8")) << 32 | (seed & 0xFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # splitmix64 finaliser: a well-mixed, vectorisable hash of consecutive integers.
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return x ^ (x >> np.uint64(31))


def val_mask(key: int, start: int, n: int, val_fraction: float) -> np.ndarray:
    """Boolean mask: which of documents ``start .. start+n-1`` of a file go to validation."""
    if val_fraction <= 0 or n == 0:
        return np.zeros(n, dtype=bool)
    idx = np.arange(start, start + n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = _splitmix64(idx ^ _splitmix64(np.full(n, key, dtype=np.uint64)))
    u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return u < val_fraction
