"""The manifest (`llmforge.yaml`): schema, loading, dotted overrides, validation, reference docs.

One YAML file, one section per stage, parsed into pydantic v2 models with ``extra="forbid"``. Errors name
the file, the line, the dotted key, what is wrong and what is allowed::

    llmforge.yaml:14: pretrain.lr: must be greater than 0 (got -1)

Overrides use dotted keys with YAML-typed values: ``pretrain.max_steps=50``, ``serve.api_key_env=null``,
``data.language.languages=[en,de]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from ..errors import ManifestError, UserInputError
from .align import AlignSection, RewardSection
from .base import Section, StageSection
from .crawl import CrawlSection
from .data import DataSection
from .model import ModelSection
from .project import ProjectSection
from .quantize import QuantizeSection
from .serve import ServeSection
from .tokenizer import TokenizerSection
from .train import DistillSection, PretrainSection, SFTSection

DEFAULT_MANIFEST = "llmforge.yaml"


class Manifest(Section):
    """Root of `llmforge.yaml`. Sections appear in pipeline order."""

    project: ProjectSection = Field(default_factory=ProjectSection, description="Project identity and paths.")
    crawl: CrawlSection = Field(default_factory=CrawlSection, description="Web crawl → WARC files.")
    data: DataSection = Field(default_factory=DataSection, description="Extraction, filtering, PII, dedup.")
    tokenizer: TokenizerSection = Field(
        default_factory=TokenizerSection, description="Tokenizer training/export and token shards."
    )
    model: ModelSection = Field(default_factory=ModelSection, description="Model architecture.")
    pretrain: PretrainSection = Field(default_factory=PretrainSection, description="Pretraining run.")
    sft: SFTSection = Field(default_factory=SFTSection, description="Supervised fine-tuning (chat).")
    reward: RewardSection = Field(
        default_factory=RewardSection, description="Reward model (Bradley–Terry on preference pairs)."
    )
    align: AlignSection = Field(
        default_factory=AlignSection, description="DPO and variants, GRPO, PPO, rejection sampling."
    )
    distill: DistillSection = Field(
        default_factory=DistillSection, description="Distillation into a student."
    )
    quantize: QuantizeSection = Field(default_factory=QuantizeSection, description="GPTQ quantization.")
    serve: ServeSection = Field(default_factory=ServeSection, description="OpenAI-compatible serving.")


SECTIONS: tuple[str, ...] = tuple(Manifest.model_fields)


@dataclass
class LoadedManifest:
    """A validated manifest plus where it came from (paths in it are relative to ``root``)."""

    manifest: Manifest
    path: Path
    overrides: list[str] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def runs_dir(self) -> Path:
        return self.resolve(self.manifest.project.runs_dir)

    def resolve(self, p: str | os.PathLike) -> Path:
        """Resolve a path from the manifest against the manifest's folder."""
        p = Path(os.path.expanduser(str(p)))
        return p if p.is_absolute() else (self.root / p)

    def section_dump(self, name: str) -> dict[str, Any]:
        return getattr(self.manifest, name).model_dump(mode="json", by_alias=True)

    def semantic_section(self, name: str) -> dict[str, Any]:
        """The section without its runtime-only knobs: what fingerprints hash (see ``base.runtime_only``)."""
        return getattr(self.manifest, name).semantic_dump()


# ----------------------------------------------------------------------------------------------------
# YAML with line numbers
# ----------------------------------------------------------------------------------------------------


def _key_lines(text: str, duplicates: list[str] | None = None) -> dict[tuple, int]:
    """Map dotted key tuples to 1-based line numbers, from the YAML node tree (best effort).

    A key repeated in one mapping (YAML keeps only the last, silently) is appended to ``duplicates``.
    """
    lines: dict[tuple, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines

    def walk(node, prefix: tuple):
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for k, v in node.value:
                key = (*prefix, str(k.value))
                line = k.start_mark.line + 1
                if k.tag != "tag:yaml.org,2002:merge" and key[-1] in first and duplicates is not None:
                    duplicates.append(
                        f"{line}: {'.'.join(map(str, key))}: duplicate key (first at line {first[key[-1]]}); "
                        "YAML silently keeps only the last one — merge them"
                    )
                first.setdefault(key[-1], line)
                lines[key] = line
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                key = (*prefix, i)
                lines[key] = v.start_mark.line + 1
                walk(v, key)

    if root is not None:
        walk(root, ())
    return lines


def _read_yaml(path: Path) -> tuple[dict, dict[tuple, int]]:
    if not path.exists():
        hint = (
            " (run `llmforge init DIR` to create a project, or pass -m PATH)"
            if path.name == DEFAULT_MANIFEST
            else ""
        )
        raise UserInputError(f"{path}: manifest not found{hint}")
    if path.is_dir():
        raise UserInputError(f"{path}: is a directory, expected a manifest file (llmforge.yaml)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ManifestError(
            str(path), [f"{path}: not UTF-8 text ({err.reason} at byte {err.start})"]
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ManifestError(str(path), [f"{where}: invalid YAML: {problem}"]) from None
    if data is None:
        raise ManifestError(
            str(path),
            [f"{path}: the manifest is empty; it needs at least a `project:` section (see `llmforge init`)"],
        )
    if not isinstance(data, dict):
        raise ManifestError(
            str(path), [f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"]
        )
    duplicates: list[str] = []
    lines = _key_lines(text, duplicates)
    if duplicates:
        raise ManifestError(str(path), [f"{path.name}:{d}" for d in duplicates])
    return data, lines


# ----------------------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------------------


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (["a","b","c"], yaml-typed value)."""
    if "=" not in item:
        raise UserInputError(
            f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. pretrain.max_steps=50"
        )
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserInputError(f"override {item!r}: empty key part in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides in place; a number indexes a list (``data.inputs.0.path=x``)."""
    for item in overrides:
        parts, value = parse_override(item)
        node: Any = data
        for i, part in enumerate(parts):
            key: Any = part
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    where = ".".join(parts[:i])
                    raise UserInputError(
                        f"override {item!r}: {where} has {len(node)} items; index it from 0 "
                        f"or set the whole list, e.g. {where}=[...]"
                    )
                key = int(part)
            if i == len(parts) - 1:
                node[key] = value
                break
            nxt = node[key] if isinstance(node, list) else node.get(key)
            if nxt is None:
                nxt = node[key] = {}
            elif not isinstance(nxt, dict | list):
                raise UserInputError(
                    f"override {item!r}: {'.'.join(parts[: i + 1])} is a {type(nxt).__name__}, not a section"
                )
            node = nxt
    return data


# ----------------------------------------------------------------------------------------------------
# Validation errors → messages
# ----------------------------------------------------------------------------------------------------


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names allowed at the mapping that contains ``loc[-1]``."""
    model: Any = Manifest
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fld = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if fld is None:
            fld = next((f for f in model.model_fields.values() if f.alias == part), None)
        if fld is None:
            return []
        ann = fld.annotation
        sub = _first_model(ann)
        if sub is None:
            return []
        model = sub
    return [f.alias or n for n, f in model.model_fields.items()]


def _first_model(ann) -> type | None:
    import typing

    if isinstance(ann, type) and issubclass(ann, Section):
        return ann
    for arg in typing.get_args(ann):
        m = _first_model(arg)
        if m is not None:
            return m
    return None


def _suggest(word: str, options: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def _format_error(err: dict, path: Path, lines: dict[tuple, int], overridden: set[str]) -> str:
    loc = tuple(p for p in err["loc"])
    dotted = ".".join(str(p) for p in loc) if loc else "(top level)"
    line = None
    probe = loc
    while probe and line is None:
        line = lines.get(probe)
        probe = probe[:-1]
    where = f"{path.name}:{line}" if line else path.name
    if any(dotted == o or dotted.startswith(o + ".") for o in overridden):
        where = "command-line override"
    elif any(o.startswith(dotted + ".") for o in overridden) or (not loc and overridden):
        where = f"{where} (with command-line overrides)"
    typ = err["type"]
    msg = err["msg"]
    if typ == "extra_forbidden":
        allowed = _allowed_keys(loc)
        key = str(loc[-1])
        hint = _suggest(key, allowed)
        allowed_txt = ", ".join(allowed) if len(allowed) <= 14 else ", ".join(allowed[:14]) + ", …"
        return f"{where}: {dotted}: unknown key{hint} (allowed: {allowed_txt})"
    if typ == "missing":
        return f"{where}: {dotted}: required key is missing"
    if typ == "value_error":
        msg = msg.removeprefix("Value error, ")
    else:
        msg = msg[0].lower() + msg[1:] if msg else msg
    got = err.get("input")
    if typ not in ("value_error", "model_type", "dict_type") and not isinstance(got, dict | list):
        msg += f" (got {got!r})"
    return f"{where}: {dotted}: {msg}"


def validate_data(
    data: dict, path: Path, lines: dict | None = None, overrides: list[str] | None = None
) -> Manifest:
    overridden = {o.partition("=")[0].strip() for o in overrides or []}
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = [_format_error(e, path, lines or {}, overridden) for e in exc.errors()]
        raise ManifestError(str(path), problems) from None


def load(path: str | os.PathLike = DEFAULT_MANIFEST, overrides: list[str] | None = None) -> LoadedManifest:
    """Read, override and validate a manifest. Raises ``ManifestError`` / ``UserInputError``."""
    path = Path(path).absolute()
    data, lines = _read_yaml(path)
    if overrides:
        data = apply_overrides(data, list(overrides))
    manifest = validate_data(data, path, lines, overrides)
    return LoadedManifest(manifest=manifest, path=path, overrides=list(overrides or []))


# ----------------------------------------------------------------------------------------------------
# Reference documentation (`llmforge validate --explain`)
# ----------------------------------------------------------------------------------------------------


def _type_name(ann) -> str:
    import typing

    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(ann))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in typing.get_args(ann))
    if origin in (list, tuple):
        args = typing.get_args(ann)
        return f"list[{_type_name(args[0])}]" if args else "list"
    if ann is type(None):
        return "null"
    return getattr(ann, "__name__", str(ann)).replace("PosixPath", "path").replace("Path", "path")


def explain(section: str | None = None) -> list[tuple[str, str, str, str]]:
    """Rows of (dotted key, type, default, description) for the whole schema or one section."""
    from pydantic_core import PydanticUndefined

    rows: list[tuple[str, str, str, str]] = []

    def walk(model: type[Section], prefix: str):
        for name, fld in model.model_fields.items():
            key = f"{prefix}{fld.alias or name}"
            sub = _first_model(fld.annotation)
            if sub is not None and prefix:
                rows.append((key, sub.__name__, "", fld.description or ""))
                walk(sub, key + ".")
                continue
            if sub is not None:
                walk(sub, key + ".")
                continue
            if fld.default_factory is not None:
                default = fld.default_factory()
            elif fld.default is PydanticUndefined:
                default = "(required)"
            else:
                default = fld.default
            rows.append((key, _type_name(fld.annotation), _short(default), fld.description or ""))

    if section is None:
        walk(Manifest, "")
    else:
        if section not in Manifest.model_fields:
            raise UserInputError(f"unknown section {section!r}; sections: {', '.join(SECTIONS)}")
        walk(_first_model(Manifest.model_fields[section].annotation), section + ".")
    return rows


def _short(v: Any) -> str:
    if isinstance(v, Path):
        v = str(v)
    s = yaml.safe_dump(v, default_flow_style=True, width=10_000).strip()
    s = s.removesuffix("\n...").removesuffix("...").strip()
    return s if len(s) <= 60 else s[:57] + "..."


__all__ = [
    "DEFAULT_MANIFEST",
    "SECTIONS",
    "AlignSection",
    "CrawlSection",
    "DataSection",
    "DistillSection",
    "LoadedManifest",
    "Manifest",
    "ModelSection",
    "PretrainSection",
    "ProjectSection",
    "QuantizeSection",
    "SFTSection",
    "Section",
    "ServeSection",
    "StageSection",
    "TokenizerSection",
    "apply_overrides",
    "explain",
    "load",
    "parse_override",
]
