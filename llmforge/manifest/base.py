"""Shared base for every manifest section.

Every section is a pydantic v2 model with ``extra="forbid"`` (a typo'd key is an error, not a silent
default) and a ``Field(description=...)`` on every knob: those descriptions *are* the reference
documentation (``llmforge validate --explain``) and a test fails if one is missing.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """Base class of all manifest models."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class StageSection(Section):
    """A manifest section that belongs to a pipeline stage and can be switched on/off."""

    enabled: bool = Field(
        default=False,
        description="Run this stage as part of `llmforge run`. Disabled stages are skipped; a later stage "
        "that needs their output must then get it from an explicit path.",
    )
