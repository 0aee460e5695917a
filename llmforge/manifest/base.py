"""Shared base for every manifest section.

Every section is a pydantic v2 model with ``extra="forbid"`` (a typo'd key is an error, not a silent
default) and a ``Field(description=...)`` on every knob: those descriptions *are* the reference
documentation (``llmforge validate --explain``) and a test fails if one is missing.

Knobs that change how a stage runs or is observed, not what it produces (worker counts, logging and
checkpoint cadence, executors, the `enabled` switch), are declared with ``runtime_only(...)``. That one mark is
what every fingerprint reads: the pipeline's stage fingerprints, training's resume config hash and the data
stage's work-folder key all hash ``semantic_dump()``, so changing such a knob never re-runs a stage.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

RUNTIME_ONLY = "runtime_only"


def runtime_only(default: Any = ..., **kwargs: Any) -> Any:
    """``Field(...)`` for a knob that must not change any fingerprint (see the module docstring)."""
    extra = dict(kwargs.pop("json_schema_extra", None) or {})
    extra[RUNTIME_ONLY] = True
    return Field(default, json_schema_extra=extra, **kwargs)


def is_runtime_only(model: type[BaseModel], name: str) -> bool:
    extra = model.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and bool(extra.get(RUNTIME_ONLY))


def _holds_section(value: Any) -> bool:
    if isinstance(value, Section):
        return True
    if isinstance(value, list | tuple):
        return any(_holds_section(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_section(v) for v in value.values())
    return False


def _semantic(value: Any) -> Any:
    if isinstance(value, Section):
        return value.semantic_dump()
    if isinstance(value, list | tuple):
        return [_semantic(v) for v in value]
    if isinstance(value, dict):
        return {k: _semantic(v) for k, v in value.items()}
    return value


class Section(BaseModel):
    """Base class of all manifest models."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    def semantic_dump(self) -> dict[str, Any]:
        """``model_dump(mode="json", by_alias=True)`` without the runtime-only knobs, at every depth: what
        defines a stage's result, and so what fingerprints hash."""
        out: dict[str, Any] = {}
        dumped = self.model_dump(mode="json", by_alias=True)
        cls = type(self)
        for name, info in cls.model_fields.items():
            if is_runtime_only(cls, name):
                continue
            key = info.alias or name
            value = getattr(self, name)
            out[key] = _semantic(value) if _holds_section(value) else dumped[key]
        return out


class StageSection(Section):
    """A manifest section that belongs to a pipeline stage and can be switched on/off."""

    enabled: bool = runtime_only(
        default=False,
        description="Run this stage as part of `llmforge run`. Disabled stages are skipped; a later stage "
        "that needs their output must then get it from an explicit path.",
    )
