"""The interface a quantization backend implements, and the table of backends.

A backend takes a full-precision Hugging Face directory and writes a complete one in the standard GPTQ layout
(``layout.py``) — weights and ``config.json``; the stage adds tokenizer files and evaluates. Calibration comes
in as token ids, already chosen and tokenized by the stage, so every backend sees exactly the same sequences
and the choice is recorded once in lineage.

``check()`` runs before any work (the stage calls it first), so a missing library is a clear install hint
rather than a failure after minutes of calibration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from ..errors import UserInputError
from .spec import QuantSpec


@runtime_checkable
class QuantBackend(Protocol):
    name: str

    def check(self) -> None:
        """Raise ``MissingDependencyError`` (or another ``LLMForgeError``) when this backend cannot run here."""
        ...

    def quantize(self, model_dir: Path, out_dir: Path, spec: QuantSpec, calibration: list[list[int]]) -> None:
        """Write the quantized model of ``model_dir`` into the existing, empty folder ``out_dir``."""
        ...


def get_backend(method: str, backend: str = "gptqmodel") -> QuantBackend:
    """The backend for ``quantize.method`` / ``quantize.backend``."""
    if method == "rtn":
        from .rtn import RTNBackend

        return RTNBackend()
    if method == "gptq" and backend == "gptqmodel":
        from .gptq import GPTQModelBackend

        return GPTQModelBackend()
    raise UserInputError(f"quantize.backend: no backend {backend!r} for method {method!r}; use gptqmodel")
