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
    """rich Console on stdout for results (tables, summaries); logs and progress go to stderr. Under a pipe or
    in CI it is wide (see ``console.output_width``), so nothing is cut to fit 80 columns. ``state.stdout``, when
    set, is used instead."""
    if state.stdout is not None:
        return state.stdout
    from ..console import stdout_console

    return stdout_console()


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
        if abs(v) >= 1000:  # 12,079 rather than 1.208e+04: a throughput or a token count reads in full
            return f"{v:,.0f}"
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.3g}"
        return f"{v:,.4g}"
    return str(v)


def render_result(name: str, result) -> None:
    """Print a stage's summary rows and tables (values escaped: `list[float]` is text, not rich markup)."""
    from rich.markup import escape
    from rich.table import Table

    console = out()
    if result is None:
        return
    if result.summary:
        t = Table(title=f"{name}", show_header=False, title_justify="left", box=None, padding=(0, 2))
        t.add_column(style="dim")
        t.add_column()
        for label, value in result.summary:
            t.add_row(escape(str(label)), escape(str(value)))
        console.print(t)
    for tab in result.tables or []:
        t = Table(title=tab.get("title"), title_justify="left")
        for col in tab.get("columns", []):
            t.add_column(str(col))
        for row in tab.get("rows", []):
            t.add_row(*[escape(fmt_metric(c)) for c in row])
        console.print(t)


def run_stages(loaded, targets, *, force=(), only=False, options=None, report: bool = False) -> list:
    """Run through the pipeline, printing each stage as it starts and ends, then a summary table.

    ``report``: afterwards (also when a stage failed) write ``runs/report.md`` / ``report.html`` from what is
    on disk, as `llmforge report` does. A report that cannot be written is a warning, never the run's error.
    """
    from rich.markup import escape

    from .. import pipeline

    console = out()
    outcomes: list = []
    started: list = []  # stage names whose body began, in order (the last one without an outcome failed)

    def on_event(kind, spec, payload):
        if kind == "start":
            started.append(spec.name)
            console.print(f"[bold cyan]▶ {spec.name}[/] running — {escape(str(payload))}")
        elif kind == "done":
            outcomes.append(payload)
            if payload.action == "cached":
                console.print(
                    f"[green]•[/] {spec.name} [dim]cached (inputs unchanged, {payload.fingerprint[:12]})[/]"
                )
            else:
                console.print(f"[bold green]✓ {spec.name}[/] done in {format_duration(payload.wall_time_s)}")
                render_result(spec.name, payload.result)

    failed: BaseException | None = None
    try:
        pipeline.run(loaded, targets or None, force=force, only=only, options=options, on_event=on_event)
    except BaseException as e:  # the summary of what did run, and the report, still matter; then re-raise
        failed = e
        raise
    finally:
        if outcomes or failed is None:
            finished = {o.name for o in outcomes}
            broken = next((n for n in reversed(started) if n not in finished), None) if failed else None
            _print_summary(loaded, outcomes, broken)
        # not when nothing started (a usage error, another run holding the lock) or on Ctrl-C
        if report and (outcomes or started) and not isinstance(failed, KeyboardInterrupt):
            _write_report(loaded)
    return outcomes


def _print_summary(loaded, outcomes: list, failed: str | None) -> None:
    """The table at the end of a run: per stage what happened, its time, key metrics and outputs; ``failed``
    names the stage that raised (shown last, as failed)."""
    from rich.markup import escape
    from rich.table import Table

    console = out()
    if not outcomes and failed is None:
        console.print("[yellow]No stage is enabled in the manifest; nothing to run.[/]")
        return
    t = Table(title="Summary", title_justify="left")
    for col in ("stage", "result", "time", "key metrics", "outputs"):
        t.add_column(col)
    from .. import pipeline

    specs = pipeline.Pipeline().by_name
    for o in outcomes:
        lin = o.lineage or {}
        metrics = lin.get("metrics", {})
        spec = specs.get(o.name)
        keys = [k for k in (spec.key_metrics if spec else ()) if k in metrics] or [
            k for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
        ][:3]
        t.add_row(
            o.name,
            "ran" if o.action == "ran" else "[dim]cached[/]",
            format_duration(o.wall_time_s) if o.action == "ran" else "",
            escape(", ".join(f"{k}={fmt_metric(metrics[k])}" for k in keys)),
            escape("\n".join(v["path"] for v in lin.get("outputs", {}).values())),
        )
    if failed:
        t.add_row(failed, "[bold red]failed[/]", "", "", "")
    console.print(t)
    ran = sum(o.action == "ran" for o in outcomes)
    console.print(f"{ran} stage(s) ran, {len(outcomes) - ran} cached. Artifacts under {loaded.runs_dir}")


def _write_report(loaded) -> None:
    from .. import console as con
    from .. import report

    try:
        written = report.write(loaded)
    except Exception as e:  # a report problem must not hide the run's own outcome
        con.get_logger("cli").warning("could not write the run report: %s (`llmforge report` retries)", e)
        return
    out().print(f"Report: {written.markdown} (and {written.html.name}, {len(written.images)} picture(s))")
