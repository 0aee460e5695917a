"""The contract between the stage runner (`pipeline.py`) and a stage's body.

A stage body is a plain function ``run(ctx: StageContext) -> StageResult`` living in its stage's package
(e.g. ``llmforge.data.stage:run_data``). It:

* reads its configuration from ``ctx.manifest`` (the whole validated manifest) and resolves relative paths
  with ``ctx.resolve``;
* finds upstream artifacts with ``ctx.input("tokenizer", "shards")`` (raises a clear ``StageInputError`` when
  the upstream stage has not run), never through hard-coded paths;
* writes everything under ``ctx.out_dir`` (= ``<runs_dir>/<stage>/``, already created), atomically where a
  file could be mistaken for finished (see ``llmforge.utils.atomic``);
* reports progress through ``llmforge.console``; never prints;
* returns a ``StageResult`` naming its outputs (files or folders under ``out_dir``; their content hashes go into
  ``lineage.json`` and into the fingerprints of downstream stages), metrics, and summary rows for the CLI.

The runner writes ``lineage.json`` only after the body returns, so a stage that raises or is killed is never
recorded as done and is re-run (resumed, where the stage supports it) next time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import StageInputError


@dataclass
class StageContext:
    name: str
    loaded: Any  # llmforge.manifest.LoadedManifest
    out_dir: Path
    upstream: dict[str, dict[str, Path]] = field(default_factory=dict)  # stage -> {output name -> path}
    # command-line extras, e.g. {"eval": True}; {"force": True} when the user forced the stage (--force), in
    # which case a stage that resumes from earlier work must start from scratch instead
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def manifest(self):
        return self.loaded.manifest

    @property
    def project_dir(self) -> Path:
        return self.loaded.root

    @property
    def runs_dir(self) -> Path:
        return self.loaded.runs_dir

    def resolve(self, p: str | os.PathLike) -> Path:
        return self.loaded.resolve(p)

    def has_input(self, stage: str, output: str) -> bool:
        return output in self.upstream.get(stage, {})

    def input(self, stage: str, output: str) -> Path:
        """Path of an upstream stage's named output, or a clear error saying what to run first."""
        outs = self.upstream.get(stage)
        if outs is None:
            raise StageInputError(
                f"stage '{self.name}' needs the output of stage '{stage}', which has not completed. "
                f"Run `llmforge run {stage}` first (or enable `{stage}` in the manifest)."
            )
        if output not in outs:
            raise StageInputError(f"stage '{stage}' did not produce an output named '{output}'")
        path = outs[output]
        if not path.exists():
            raise StageInputError(
                f"{path}: output '{output}' of stage '{stage}' is missing on disk; "
                f"re-run it with `llmforge run {stage} --force {stage}`"
            )
        return path


@dataclass
class StageResult:
    outputs: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    summary: list[tuple[str, str]] = field(default_factory=list)  # (label, value) rows for the CLI
    tables: list[dict[str, Any]] = field(
        default_factory=list
    )  # {"title": str, "columns": [...], "rows": [[...]]}
