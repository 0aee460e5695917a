"""The Llama-architecture model: config and presets, the module, generation, Hugging Face checkpoints.

Names are imported lazily, so ``from llmforge.model import LlamaConfig, PRESETS, config_from_manifest`` does
not import torch (the CLI resolves model shapes without it); ``Llama``, ``KVCache``, ``generate``,
``save_pretrained`` and ``load_pretrained`` import it on first use. LoRA adapters (PEFT format) live in ``lora``.
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
    "generate": "generation",
    "sample_next": "generation",
    "save_pretrained": "checkpoint",
    "load_pretrained": "checkpoint",
    "hf_state_dict": "checkpoint",
    "load_hf_state_dict": "checkpoint",
    "unwrap": "checkpoint",
    "DistillTarget": "fused",
    "DistillOutput": "fused",
    "LossSum": "fused",
    "linear_cross_entropy": "fused",
    "linear_token_logprobs": "fused",
    "linear_kd_loss": "fused",
    "kd_divergence": "fused",
    "kd_divergence_topk": "fused",
    "LoRALinear": "lora",
    "LoraSpec": "lora",
    "apply_lora": "lora",
    "has_lora": "lora",
    "lora_modules": "lora",
    "lora_parameters": "lora",
    "lora_spec": "lora",
    "reset_lora_parameters": "lora",
    "lora_state_dict": "lora",
    "load_lora_state_dict": "lora",
    "save_adapter": "lora",
    "load_adapter": "lora",
    "read_adapter_config": "lora",
    "merge_lora": "lora",
    "quantize_base_nf4": "lora",
    "base_weight_nbytes": "lora",
    "vllm_max_lora_rank": "lora",
}

__all__ = [
    "PRESETS",
    "DistillOutput",
    "DistillTarget",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "LoRALinear",
    "LoraSpec",
    "LossSum",
    "apply_lora",
    "base_weight_nbytes",
    "config_from_manifest",
    "generate",
    "has_lora",
    "hf_state_dict",
    "kd_divergence",
    "kd_divergence_topk",
    "linear_cross_entropy",
    "linear_kd_loss",
    "linear_token_logprobs",
    "load_adapter",
    "load_hf_state_dict",
    "load_lora_state_dict",
    "load_pretrained",
    "lora_modules",
    "lora_parameters",
    "lora_spec",
    "lora_state_dict",
    "merge_lora",
    "preset_config",
    "quantize_base_nf4",
    "read_adapter_config",
    "reset_lora_parameters",
    "sample_next",
    "save_adapter",
    "save_pretrained",
    "unwrap",
    "vllm_max_lora_rank",
]

if TYPE_CHECKING:
    from .checkpoint import hf_state_dict, load_hf_state_dict, load_pretrained, save_pretrained, unwrap
    from .config import PRESETS, LlamaConfig, config_from_manifest, preset_config
    from .fused import (
        DistillOutput,
        DistillTarget,
        LossSum,
        kd_divergence,
        kd_divergence_topk,
        linear_cross_entropy,
        linear_kd_loss,
        linear_token_logprobs,
    )
    from .generation import generate, sample_next
    from .llama import KVCache, Llama
    from .lora import (
        LoRALinear,
        LoraSpec,
        apply_lora,
        base_weight_nbytes,
        has_lora,
        load_adapter,
        load_lora_state_dict,
        lora_modules,
        lora_parameters,
        lora_spec,
        lora_state_dict,
        merge_lora,
        quantize_base_nf4,
        read_adapter_config,
        reset_lora_parameters,
        save_adapter,
        vllm_max_lora_rank,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llmforge.model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
