"""Building the engine the `serve:` section asks for (`local` or `vllm`), for `llmforge serve` and the deploy
check alike, so both serve exactly the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserInputError


def require_serving(purpose: str, *, client: bool = False) -> None:
    """Fail with the install hint, not an ImportError traceback, when the `serve` extra is missing."""
    from ..errors import require

    modules = [("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("prometheus_client", "prometheus-client")]
    if client:
        modules.append(("openai", "openai"))
    for module, package in modules:
        require(module, extra="serve", purpose=purpose, package=package)


def build_engine(section, model_dir: Path, *, model_name: str, adapter: Path | None = None) -> Any:
    """An unstarted ``AsyncEngine`` over ``model_dir`` configured by a ``ServeSection``."""
    adapter = adapter if adapter is not None else section.adapter
    if section.engine == "local":
        if adapter is not None:
            raise UserInputError(
                f"serve.adapter: the local engine serves full checkpoints; merge the adapter first "
                f"(`llmforge train merge-lora {adapter} --out merged`) and set serve.model, or use "
                "serve.engine: vllm"
            )
        from ..infer import load_engine

        return load_engine(
            model_dir,
            device=section.device,
            dtype=section.dtype,
            max_batch=section.max_batch,
            max_queue=section.max_queue,
            max_model_len=section.max_model_len,
            model_name=model_name,
            quantized=section.quantized,
        )
    from .vllm_engine import VLLMEngine

    v = section.vllm
    return VLLMEngine(
        model_dir,
        model_name=model_name,
        max_model_len=section.max_model_len,
        max_batch=section.max_batch,
        max_queue=section.max_queue,
        device=section.device,
        dtype=section.dtype,
        adapter=adapter,
        python=v.python,
        startup_timeout_s=v.startup_timeout_s,
        kvcache_space_gib=v.kvcache_space_gib,
        reserved_cpus=v.reserved_cpus,
        tensor_parallel_size=v.tensor_parallel_size,
        gpu_memory_utilization=v.gpu_memory_utilization,
        enforce_eager=v.enforce_eager,
        extra_args=v.extra_args,
    )
