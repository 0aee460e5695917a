"""`project:` — identity of the project and where artifacts go."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from .base import Section


class ProjectSection(Section):
    name: str = Field(
        default="my-llm",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Project name: letters, digits, '.', '_' and '-'. Used as the served model id by default.",
    )
    runs_dir: Path = Field(
        default=Path("runs"),
        description="Where every stage writes its artifacts (`<runs_dir>/<stage>/`), relative to the manifest.",
    )
    seed: int = Field(
        default=1234, ge=0, description="Global random seed; stages derive their own seeds from it."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        default="auto",
        description="Compute device for training and the local engine. `auto` picks CUDA, then MPS, then CPU.",
    )
