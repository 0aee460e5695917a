"""Shared CLI plumbing: options, manifest loading, output rendering. The CLI is the only layer that prints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from ..console import format_duration
from ..errors import UserInputError

ManifestOpt = Annotated[
    Path,
    typer.Option("--manifest", "-m", help="Path to the project manifest.", show_default=True),
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="Dotted overrides applied on top of the manifest, e.g. pretrain.max_steps=50.",
        show_default=False,
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Re-run even if the stage is cached.")]

DEFAULT_MANIFEST = Path("llmforge.yaml")


class _State:
    debug: bool = os.environ.get("LLMFORGE_DEBUG", "") not in ("", "0")
    stdout: Any = None


state = _State()


def out():
    """rich Console on stdout for results (tables, summaries). Logs and progress go to stderr."""
    if state.stdout is None:
        from rich.console import Console

        state.stdout = Console(highlight=False, soft_wrap=False)
    return state.stdout


def load_manifest(path: Path, overrides: list[str] | None):
    from .. import manifest

    return manifest.load(path, overrides or [])


def split_overrides(args: list[str] | None) -> tuple[list[str], list[str]]:
    """Split positional args into (names, dotted overrides)."""
    names, overrides = [], []
    for a in args or []:
        (overrides if "=" in a else names).append(a)
    return names, overrides


def only_overrides(args: list[str] | None) -> list[str]:
    names, overrides = split_overrides(args)
    if names:
        raise UserInputError(
            f"unexpected argument {names[0]!r}: overrides look like section.key=value (e.g. pretrain.max_steps=50)"
        )
    return overrides


def fmt_metric(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3g}"
        return f"{v:,.4g}"
    return str(v)


def render_result(name: str, result) -> None:
    """Print a stage's summary rows and tables."""
    from rich.table import Table

    console = out()
    if result is None:
        return
    if result.summary:
        t = Table(title=f"{name}", show_header=False, title_justify="left", box=None, padding=(0, 2))
        t.add_column(style="dim")
        t.add_column()
        for label, value in result.summary:
            t.add_row(str(label), str(value))
        console.print(t)
    for tab in result.tables or []:
        t = Table(title=tab.get("title"), title_justify="left")
        for col in tab.get("columns", []):
            t.add_column(str(col))
        for row in tab.get("rows", []):
            t.add_row(*[fmt_metric(c) for c in row])
        console.print(t)


def run_stages(loaded, targets, *, force=(), only=False, options=None) -> list:
    """Run through the pipeline, printing each stage as it starts and ends, then a summary table."""
    from rich.table import Table

    from .. import pipeline

    console = out()

    def on_event(kind, spec, payload):
        if kind == "start":
            console.print(f"[bold cyan]▶ {spec.name}[/] running — {payload}")
        elif kind == "done":
            if payload.action == "cached":
                console.print(
                    f"[green]•[/] {spec.name} [dim]cached (inputs unchanged, {payload.fingerprint[:12]})[/]"
                )
            else:
                console.print(f"[bold green]✓ {spec.name}[/] done in {format_duration(payload.wall_time_s)}")
                render_result(spec.name, payload.result)

    outcomes = pipeline.run(
        loaded, targets or None, force=force, only=only, options=options, on_event=on_event
    )
    if not outcomes:
        console.print("[yellow]No stage is enabled in the manifest; nothing to run.[/]")
        return outcomes
    t = Table(title="Summary", title_justify="left")
    for col in ("stage", "result", "time", "outputs"):
        t.add_column(col)
    for o in outcomes:
        outs = (o.lineage or {}).get("outputs", {})
        t.add_row(
            o.name,
            "ran" if o.action == "ran" else "[dim]cached[/]",
            format_duration(o.wall_time_s) if o.action == "ran" else "",
            "\n".join(v["path"] for v in outs.values()),
        )
    console.print(t)
    ran = sum(o.action == "ran" for o in outcomes)
    console.print(f"{ran} stage(s) ran, {len(outcomes) - ran} cached. Artifacts under {loaded.runs_dir}")
    return outcomes
