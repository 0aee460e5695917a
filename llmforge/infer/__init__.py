"""llmforge's inference engine: per-sequence KV slots, continuous batching, per-request sampling, streaming.

Layers, from the bottom: ``kv_cache`` (the slot pool the model writes through), ``sampling`` (batched
per-request logit processing and seeded draws), ``detokenize`` and ``stop`` (text deltas that never split a
character and hold back possible stop strings), ``scheduler`` (who runs each step), ``engine`` (the synchronous
``Engine``: ``add_request / step / abort / run``) and ``async_engine`` (``LocalEngine``, the ``AsyncEngine``
the gateway holds). Names are imported lazily: ``from llmforge.infer import SamplingParams`` does not import
torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "SamplingParams": "params",
    "TokenLogprob": "params",
    "GenerationEvent": "params",
    "EngineError": "errors",
    "EngineOverloaded": "errors",
    "ContextLengthExceeded": "errors",
    "EngineNotReady": "errors",
    "RequestError": "errors",
    "AsyncEngine": "async_engine",
    "LocalEngine": "async_engine",
    "load_engine": "async_engine",
    "Engine": "engine",
    "Request": "engine",
    "RequestOutput": "engine",
    "SlotKVCache": "kv_cache",
}

__all__ = [
    "AsyncEngine",
    "ContextLengthExceeded",
    "Engine",
    "EngineError",
    "EngineNotReady",
    "EngineOverloaded",
    "GenerationEvent",
    "LocalEngine",
    "Request",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
    "SlotKVCache",
    "TokenLogprob",
    "load_engine",
]

if TYPE_CHECKING:
    from .async_engine import AsyncEngine, LocalEngine, load_engine
    from .engine import Engine, Request, RequestOutput
    from .errors import ContextLengthExceeded, EngineError, EngineNotReady, EngineOverloaded, RequestError
    from .kv_cache import SlotKVCache
    from .params import GenerationEvent, SamplingParams, TokenLogprob


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
