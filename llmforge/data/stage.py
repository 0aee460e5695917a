"""The `data` stage body: ``run_data(ctx) -> StageResult`` (``llmforge data process`` / ``llmforge run data``).

Reads every ``data.inputs`` entry plus the crawl's WARC files (when the crawl stage produced them), runs the
datatrove passes assembled by ``llmforge.data.process`` and writes:

* ``<out>/output/`` (or ``data.output_dir``) — the cleaned corpus, ``*.jsonl.gz`` shards, one JSON object per
  line with ``text``, ``id`` and ``metadata``. It appears only when every pass has finished (moved in whole);
* ``<out>/report.json`` — per-step counts, drop reasons, languages, PII, duplicates, samples, timing;
* ``<out>/work/<config hash>/`` — datatrove logs, completion markers, signatures (resume state).

Zero output documents is a ``DataError`` naming the step that dropped everything, raised as soon as the
cleaning pass shows it (dedup is not run on nothing); the report is still written for inspection.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from .. import console
from ..errors import DataError, UserInputError, require
from ..stage import StageContext, StageResult
from ..utils.atomic import write_json

log = console.get_logger(__name__)


def unread_crawl(ctx: StageContext) -> str | None:
    """A plain note when a crawl's WARC files exist but this run does not read them (``crawl.enabled: false``).

    The data stage reads the crawl only through the pipeline's wiring (so that a new crawl re-runs it); with
    the crawl disabled that wiring is off, even when ``llmforge run crawl data`` has just run the crawl because
    it was named. Reading the files anyway would leave the data stage's cache blind to them, so instead we
    say so, and how to change it. None when there is nothing to say.
    """
    if ctx.has_input("crawl", "warc") or ctx.manifest.crawl.enabled:
        return None
    warc_dir = ctx.runs_dir / "crawl" / "warc"
    found = sorted(warc_dir.glob("*.warc.gz")) if warc_dir.is_dir() else []
    if not found:
        return None
    wanted = warc_dir.resolve()
    for spec in ctx.manifest.data.inputs:
        p = ctx.resolve(spec.path).resolve()
        if p == wanted or wanted in p.parents or p in wanted.parents:
            return None  # the user lists the crawl folder (or a folder holding it) as an input
    try:
        shown = warc_dir.relative_to(ctx.project_dir)
    except ValueError:
        shown = warc_dir
    return (
        f"not reading the crawl in {shown} ({len(found)} WARC files) because `crawl.enabled` is false. To "
        "use it, set `crawl.enabled: true` (the data stage then reads every crawl and re-runs when it "
        f"changes), or add `- path: {shown}` to `data.inputs`."
    )


def _sources(ctx: StageContext, crawl_note: str | None = None) -> list[Any]:
    from .readers import InputSource

    cfg = ctx.manifest.data
    sources = [
        InputSource(ctx.resolve(spec.path), f"data.inputs[{i}].path", spec.format, spec.text_key, spec.id_key)
        for i, spec in enumerate(cfg.inputs)
    ]
    if ctx.has_input("crawl", "warc"):
        sources.append(InputSource(ctx.input("crawl", "warc"), "crawl output (warc)", "warc"))
    if not sources:
        if crawl_note:
            raise UserInputError(f"data: nothing to process: `data.inputs` is empty, and {crawl_note}")
        raise UserInputError(
            "data: nothing to process: `data.inputs` is empty and the crawl stage produced no WARC files. "
            "Add entries to `data.inputs` (files, folders or globs of WARC/JSONL/Parquet/txt/md) or enable `crawl`."
        )
    return sources


def _move_into_place(src: Path, dest: Path) -> None:
    """Replace ``dest`` with the finished ``src`` folder so that a complete corpus is always what is there."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    try:
        os.replace(src, dest)
    except OSError:  # another file system (data.output_dir elsewhere): copy next to dest, then rename
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.copytree(src, tmp)
        os.replace(tmp, dest)
        shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def run_data(ctx: StageContext) -> StageResult:
    require("datatrove", extra="data", purpose="The data stage")
    from . import process, report
    from .readers import discover_inputs, write_inputs_list

    cfg = ctx.manifest.data
    out = Path(ctx.out_dir)
    corpus_dir = ctx.resolve(cfg.output_dir) if cfg.output_dir else out / "output"
    crawl_note = unread_crawl(ctx)
    stage_notes = [crawl_note] if crawl_note else []
    files, notes = discover_inputs(_sources(ctx, crawl_note))
    for note in [*stage_notes, *notes]:
        log.warning(f"data: {note}")
    if not files:
        raise UserInputError(
            "data: the inputs hold no readable files (.warc[.gz], .jsonl[.gz], .parquet, .txt, .md). "
            "Check `data.inputs` paths, or set `format` on an entry to read other extensions."
        )
    digest = process.config_hash(cfg, files)
    work, resumed = process.prepare_work_dir(
        out / "work", digest, {"data": cfg.model_dump(mode="json"), "files": len(files)}
    )
    write_inputs_list(work / "inputs.json", files)
    if resumed:
        log.info(f"data: resuming an interrupted run (work folder {work})")
    plan = process.build_plan(cfg, files, work)
    log.info(
        f"data: {len(files)} input files, {len(plan.passes)} passes "
        f"({', '.join(p.name for p in plan.passes)}), executor {cfg.executor}, {cfg.tasks} tasks"
    )

    def write_report(pass_seconds: dict[str, float], wall: float, error: str | None = None) -> dict[str, Any]:
        rep = report.build_report(
            plan,
            cfg=cfg,
            wall_s=wall,
            pass_seconds=pass_seconds,
            corpus_dir=corpus_dir if error is None else plan.output_dir,
            notes=notes,
            resumed=resumed,
            config_digest=digest,
        )
        rep["notes"] = stage_notes
        if error:
            rep["status"] = "error"
            rep["error"] = error
        write_json(out / "report.json", rep)
        return rep

    t0 = time.perf_counter()
    pass_seconds: dict[str, float] = {}

    def check_clean(p: Any) -> None:
        # Fail fast: if cleaning kept nothing, dedup has nothing to do and the error should say which step.
        if p.name != "clean":
            return
        rows = report.step_rows(plan, report.load_stats(plan.logging_dir(p.name)))
        if rows and rows[-1]["docs_out"] == 0:
            err = report.empty_error(rows, len(files))
            write_report(pass_seconds, time.perf_counter() - t0, error=str(err))
            raise err

    pass_seconds = process.run_plan(cfg, plan, after_pass=check_clean)
    wall = time.perf_counter() - t0

    if plan.output_dir.exists():
        _move_into_place(plan.output_dir, corpus_dir)
    elif not corpus_dir.exists():
        raise DataError(
            f"data: every pass is marked complete but the output folder {plan.output_dir} is missing; "
            f"delete {work} and re-run the stage"
        )
    rep = write_report(pass_seconds, wall)
    if rep["documents"]["out"] == 0:
        err = report.empty_error(rep["steps"], len(files))
        rep["status"] = "error"
        rep["error"] = str(err)
        write_json(out / "report.json", rep)
        raise err
    (work / "DONE").write_text("ok\n", encoding="utf-8")
    for w in rep["warnings"]:
        log.warning(f"data: {w['message']}")

    rows, tables = report.summary(rep)
    pii = rep["pii"]["matches"]
    metrics: dict[str, Any] = {
        "docs_in": rep["documents"]["in"],
        "docs_out": rep["documents"]["out"],
        "bytes_in": rep["bytes"]["in"],
        "bytes_out": rep["bytes"]["out"],
        "duplicates_removed": rep["dedup"]["exact"]["removed"] + rep["dedup"]["near"]["removed"],
        "exact_duplicates_removed": rep["dedup"]["exact"]["removed"],
        "near_duplicates_removed": rep["dedup"]["near"]["removed"],
        "near_duplicate_clusters": rep["dedup"]["near"]["clusters"],
        "pii_matches": sum(pii.values()),
        **{f"pii_{k}": v for k, v in pii.items()},
        "docs_per_s": rep["timing"]["docs_per_s"],
        "wall_s": rep["timing"]["wall_s"],
        "high_drop_warnings": len(rep["warnings"]),
    }
    log.info(
        f"data: {rep['documents']['in']:,} documents in → {rep['documents']['out']:,} out ({corpus_dir})"
    )
    return StageResult(
        outputs={"corpus": corpus_dir, "report": out / "report.json"},
        metrics=metrics,
        summary=rows,
        tables=tables,
    )
