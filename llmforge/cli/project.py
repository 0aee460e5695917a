"""Project-level commands: init, validate, run, status, lineage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..console import format_duration
from ..errors import UserInputError
from .common import (
    DEFAULT_MANIFEST,
    ManifestOpt,
    OverridesArg,
    fmt_metric,
    load_manifest,
    only_overrides,
    out,
    run_stages,
    split_overrides,
)


def register(app: typer.Typer) -> None:
    app.command("init", help="Scaffold a new project from a template.")(init)
    app.command("validate", help="Check the manifest; --explain prints the documented reference.")(validate)
    app.command(
        "run",
        help="Run the pipeline: every enabled stage (or the named STAGES and what they need), in order, "
        "skipping stages whose inputs did not change.",
    )(run)
    app.command("status", help="Show each stage's state, fingerprint, time and key metrics.")(status)
    app.command(
        "report",
        help="Rebuild runs/report.md and runs/report.html (results, per-stage times, loss and reward curves) "
        "from what is on disk; `llmforge run` writes them when it ends.",
    )(report)
    app.command("lineage", help="Show the chain of stages and inputs that produced an artifact.")(lineage)


# ---------------------------------------------------------------------------------------------------- init


def init(
    directory: Annotated[
        Path | None, typer.Argument(help="Project folder to create.", show_default=False)
    ] = None,
    template: Annotated[str, typer.Option("--template", "-t", help="Template name (see --list).")] = "tiny",
    force: Annotated[
        bool, typer.Option("--force", help="Write into a non-empty folder (overwrites template files).")
    ] = False,
    list_: Annotated[bool, typer.Option("--list", help="List the available templates and exit.")] = False,
) -> None:
    from rich.table import Table

    from .. import scaffold as templates

    console = out()
    if list_:
        t = Table(show_header=True, box=None, padding=(0, 2))
        t.add_column("template", style="bold")
        t.add_column("description")
        for name, desc in templates.available().items():
            t.add_row(name, desc)
        console.print(t)
        return
    if directory is None:
        raise UserInputError(
            "missing DIRECTORY: `llmforge init DIR [--template NAME]` (see `llmforge init --list`)"
        )
    written = templates.scaffold(template, directory, force=force)
    console.print(
        f"[bold green]✓[/] created project [bold]{directory}[/] from template '{template}' "
        f"({len(written)} files)"
    )
    console.print(
        f"  next: [bold]cd {directory} && llmforge validate && llmforge run[/]  (see {directory}/README.md)"
    )


# ---------------------------------------------------------------------------------------------------- validate


def validate(
    overrides: OverridesArg = None,
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    explain: Annotated[
        bool, typer.Option("--explain", help="Print every knob with type, default and description.")
    ] = False,
    section: Annotated[
        str | None, typer.Option("--section", "-s", help="With --explain: only this section.")
    ] = None,
    show: Annotated[
        bool, typer.Option("--show", help="Print the resolved manifest (defaults filled in) as YAML.")
    ] = False,
) -> None:
    from rich.markup import escape
    from rich.table import Table

    from .. import manifest as mf

    console = out()
    if explain:
        rows = mf.explain(section)
        t = Table(title="llmforge.yaml reference" + (f": {section}" if section else ""), title_justify="left")
        t.add_column("key", style="bold", no_wrap=True)
        t.add_column("type")
        t.add_column("default")
        t.add_column("description")
        for key, typ, default, desc in rows:
            t.add_row(escape(key), escape(typ), escape(default), escape(desc))
        console.print(t)
        if not Path(manifest).exists():
            return
    loaded = load_manifest(manifest, only_overrides(overrides))
    if show:
        import yaml

        data = loaded.manifest.model_dump(mode="json", by_alias=True)
        console.print(yaml.safe_dump(data, sort_keys=False), markup=False, highlight=False)
    from .. import pipeline

    stages = pipeline.Pipeline().stages
    enabled = [s.name for s in stages if s.enabled(loaded)]
    unbuilt = [s.name for s in stages if s.enabled(loaded) and not s.built]
    console.print(f"[bold green]✓[/] {loaded.path} is valid — enabled stages: {', '.join(enabled) or 'none'}")
    if unbuilt:
        console.print(
            f"[yellow]![/] enabled but not built in this version: {', '.join(unbuilt)} "
            "(`llmforge run` will refuse them)"
        )


# ---------------------------------------------------------------------------------------------------- run


def run(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            help="Stages to run (default: all enabled) and/or dotted overrides (key=value).",
            show_default=False,
        ),
    ] = None,
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    force: Annotated[
        list[str] | None,
        typer.Option(
            "--force", "-f", help="Re-run STAGE even if cached (repeatable; 'all' for every stage)."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would run and why, run nothing.")
    ] = False,
    serve: Annotated[
        bool,
        typer.Option(
            "--serve",
            help="When every stage succeeded, serve the final model as `llmforge serve` does, until Ctrl-C.",
        ),
    ] = False,
) -> None:
    from .. import pipeline

    names, overrides = split_overrides(args)
    loaded = load_manifest(manifest, overrides)
    forced = list(force or [])
    if "all" in forced:
        forced = [s.name for s in pipeline.plan(loaded, names or None)]
    if dry_run:
        _dry_run(loaded, names, forced)
        return
    run_stages(loaded, names, force=forced, report=True)
    if serve:  # only reached when the pipeline succeeded: a failed stage raised above
        from ..serve import cli as serve_cli

        out().print("[bold]Serving the final model[/] (Ctrl-C stops)")
        serve_cli.serve(overrides=overrides, manifest=manifest, port=None, host=None, engine=None, model=None)


def _dry_run(loaded, names, forced) -> None:
    from rich.markup import escape
    from rich.table import Table

    from .. import pipeline

    stages = pipeline.plan(loaded, names or None)
    st = {s.name: s for s in pipeline.status(loaded)}
    t = Table(title="Plan", title_justify="left")
    t.add_column("stage")
    t.add_column("would")
    t.add_column("why")
    for s in stages:
        cur = st[s.name]
        if s.name in forced:
            t.add_row(s.name, "run", "forced")
        elif cur.state == "done":
            t.add_row(s.name, "[dim]skip (cached)[/]", "")
        else:
            t.add_row(s.name, "run", escape(cur.reason or cur.state))
    out().print(t)


# ---------------------------------------------------------------------------------------------------- status


_STATE_STYLE = {
    "done": "green",
    "stale": "yellow",
    "never run": "cyan",
    "running": "bold cyan",
    "interrupted": "red",
    "failed": "red",
    "disabled": "dim",
    "not built": "dim",
    "waiting": "cyan",
}


def status(
    overrides: OverridesArg = None,
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    from rich.markup import escape
    from rich.table import Table

    from .. import pipeline

    loaded = load_manifest(manifest, only_overrides(overrides))
    rows = pipeline.status(loaded)
    if as_json:
        payload = [
            {
                "stage": r.name,
                "state": r.state,
                "reason": r.reason,
                "enabled": r.enabled,
                "built": r.built,
                "fingerprint": (r.lineage or {}).get("fingerprint"),
                "finished_at": (r.lineage or {}).get("finished_at"),
                "wall_time_s": (r.lineage or {}).get("wall_time_s"),
                "metrics": (r.lineage or {}).get("metrics", {}),
            }
            for r in rows
        ]
        out().print_json(json.dumps(payload))
        return
    t = Table(title=f"{loaded.manifest.project.name} — {loaded.runs_dir}", title_justify="left")
    for col in ("stage", "state", "fingerprint", "finished", "time", "key metrics", "note"):
        t.add_column(col)
    for r in rows:
        lin = r.lineage or {}
        key = ", ".join(f"{k}={fmt_metric(v)}" for k, v in r.key_metrics.items())
        t.add_row(
            r.name,
            f"[{_STATE_STYLE.get(r.state, '')}]{r.state}[/]",
            (lin.get("fingerprint") or "")[:12],
            _ago(lin.get("finished_at")),
            format_duration(lin.get("wall_time_s")) if lin else "",
            escape(key),
            escape(r.reason),
        )
    out().print(t)


def _ago(iso: str | None) -> str:
    if not iso:
        return ""
    import datetime as dt

    try:
        then = dt.datetime.fromisoformat(iso)
    except ValueError:
        return iso
    secs = (dt.datetime.now(dt.UTC) - then).total_seconds()
    if secs < 90:
        return f"{int(secs)}s ago"
    if secs < 5400:
        return f"{int(secs // 60)}m ago"
    if secs < 172800:
        return f"{int(secs // 3600)}h ago"
    return then.strftime("%Y-%m-%d")


# ---------------------------------------------------------------------------------------------------- report


def report(overrides: OverridesArg = None, manifest: ManifestOpt = DEFAULT_MANIFEST) -> None:
    from rich.markup import escape
    from rich.table import Table

    from .. import report as run_report

    loaded = load_manifest(manifest, only_overrides(overrides))
    written = run_report.write(loaded)
    rep = written.report
    console = out()
    if rep.results:
        t = Table(title="Results", title_justify="left")
        for col in ("stage", "measure", "before", "after", "note"):
            t.add_column(col)
        for row in rep.results:
            t.add_row(*[escape(c) for c in row])
        console.print(t)
    unfinished = [s.name for s in rep.stages if s.state in ("failed", "interrupted", "running")]
    console.print(
        f"[bold green]✓[/] report of {len(rep.stages)} stage(s)"
        + (f" ([red]not finished: {', '.join(unfinished)}[/])" if unfinished else "")
        + f": {written.markdown}, {written.html} ({len(written.images)} picture(s) in {written.markdown.parent / run_report.ASSETS})"
    )


# ---------------------------------------------------------------------------------------------------- lineage


def lineage(
    path: Annotated[Path, typer.Argument(help="An artifact (file or folder) under the runs folder.")],
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    from rich.tree import Tree

    from .. import pipeline

    manifest = _find_manifest(manifest, path)
    loaded = load_manifest(manifest, [])
    if not path.exists():
        raise UserInputError(f"{path}: no such file or folder")
    node = pipeline.lineage_tree(loaded, path)

    if as_json:

        def to_dict(n):
            lin = n.lineage
            return {
                "stage": n.stage,
                "output": n.matched_output,
                "fingerprint": lin["fingerprint"],
                "finished_at": lin.get("finished_at"),
                "outputs": lin.get("outputs"),
                "external_inputs": lin.get("inputs", {}).get("external", {}),
                "modified_since": n.modified,
                "superseded": n.superseded,
                "inputs": [to_dict(c) for c in n.inputs],
            }

        out().print_json(json.dumps(to_dict(node)))
        return

    def label(n) -> str:
        lin = n.lineage
        s = (
            f"[bold]{n.stage}[/] [dim]{lin['fingerprint'][:12]}[/] finished {lin.get('finished_at', '?')} "
            f"in {format_duration(lin.get('wall_time_s'))} (llmforge {lin.get('llmforge_version')})"
        )
        if n.modified:
            s += f" [red]outputs modified since: {', '.join(n.modified)}[/]"
        if n.superseded:
            s += " [yellow]re-ran since; its downstream read an earlier run's outputs[/]"
        return s

    def add(tree, n) -> None:
        lin = n.lineage
        for name, rec in lin.get("outputs", {}).items():
            mark = " ◀" if name == n.matched_output else ""
            tree.add(f"[green]output[/] {name}: {rec['path']} [dim]sha256 {rec['sha256'][:12]}[/]{mark}")
        for p, h in lin.get("inputs", {}).get("external", {}).items():
            tree.add(f"[cyan]input file[/] {p} [dim]sha256 {h[:12]}[/]")
        overrides = lin.get("overrides") or []
        if overrides:
            tree.add(f"[magenta]overrides[/] {' '.join(overrides)}")
        for child in n.inputs:
            add(tree.add(label(child)), child)

    root = Tree(label(node))
    add(root, node)
    out().print(root)


def _find_manifest(manifest: Path, artifact: Path) -> Path:
    """Default manifest, or the nearest llmforge.yaml above the artifact if run from elsewhere."""
    if Path(manifest).exists() or manifest != DEFAULT_MANIFEST:
        return manifest
    for parent in Path(artifact).absolute().parents:
        cand = parent / DEFAULT_MANIFEST
        if cand.exists():
            return cand
    return manifest
