"""Tokenizer stage: sentencepiece training, exact Hugging Face export, chat template, corpus → token shards.

Modules (one concept each): ``train`` (sentencepiece), ``export`` (HF directory + parity check), ``chat``
(template rendering, ids and assistant masks), ``info`` (ids later stages check against), ``existing``
(``tokenizer.from``), ``corpus``/``split``/``shards`` (token shards), ``evaluate`` (compression), ``stage``
(the stage body). Importing this package is cheap: sentencepiece, tokenizers and jinja2 load on use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .chat import encode_chat, render
    from .info import LoadedTokenizer, TokenizerInfo, load_tokenizer, load_tokenizer_info
    from .shards import ShardStats, tokenize_corpus
    from .stage import run_tokenizer

_EXPORTS = {
    "encode_chat": "chat",
    "render": "chat",
    "LoadedTokenizer": "info",
    "TokenizerInfo": "info",
    "load_tokenizer": "info",
    "load_tokenizer_info": "info",
    "ShardStats": "shards",
    "tokenize_corpus": "shards",
    "run_tokenizer": "stage",
}


def __getattr__(name: str) -> Any:
    # Lazy: `from llmforge.tokenizer import tokenize_corpus` works without paying numpy/tokenizers imports
    # for code paths (like `llmforge --help`) that only import the package.
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'llmforge.tokenizer' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{mod}", __name__), name)


__all__ = [
    "LoadedTokenizer",
    "ShardStats",
    "TokenizerInfo",
    "encode_chat",
    "load_tokenizer",
    "load_tokenizer_info",
    "render",
    "run_tokenizer",
    "tokenize_corpus",
]
