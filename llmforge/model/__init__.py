"""The Llama-architecture model: config and presets, the module, generation, Hugging Face checkpoints.

Names are imported lazily, so ``from llmforge.model import LlamaConfig, PRESETS, config_from_manifest`` does
not import torch (the CLI resolves model shapes without it); ``Llama``, ``KVCache``, ``generate``,
``save_pretrained`` and ``load_pretrained`` import it on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "LlamaConfig": "config",
    "PRESETS": "config",
    "config_from_manifest": "config",
    "preset_config": "config",
    "Llama": "llama",
    "KVCache": "llama",
    "generate": "generate",
    "sample_next": "generate",
    "save_pretrained": "checkpoint",
    "load_pretrained": "checkpoint",
    "hf_state_dict": "checkpoint",
    "load_hf_state_dict": "checkpoint",
    "unwrap": "checkpoint",
}

__all__ = [
    "PRESETS",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "config_from_manifest",
    "generate",
    "hf_state_dict",
    "load_hf_state_dict",
    "load_pretrained",
    "preset_config",
    "sample_next",
    "save_pretrained",
    "unwrap",
]

if TYPE_CHECKING:
    from .checkpoint import hf_state_dict, load_hf_state_dict, load_pretrained, save_pretrained, unwrap
    from .config import PRESETS, LlamaConfig, config_from_manifest, preset_config
    from .generate import generate, sample_next
    from .llama import KVCache, Llama


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llmforge.model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
