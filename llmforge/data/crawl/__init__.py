"""The crawl stage: seed URLs → WARC files (``llmforge data crawl``, stage ``crawl`` of ``llmforge run``).

Layout of ``runs/crawl/``:

* ``warc/crawl-NNNNN.warc.gz`` — complete WARC files (warcinfo + request/response pairs of stored HTML
  pages), rotated at ``crawl.warc_max_bytes`` or ``crawl.warc_max_records``; readable by warcio, datatrove's ``WarcReader`` and any WARC tool;
* ``warc.partial/`` — the file being written (moved into ``warc/`` when closed; repaired on resume);
* ``fetches.jsonl`` — one line per request or decision: url, final_url, status, content_type, bytes, ms,
  outcome (stored/redirect/skipped/failed/retry/ok), reason, attempt, kind (page/robots), depth;
* ``crawl_state.sqlite`` — frontier, seen set and per-URL outcomes; re-running resumes from it.

With ``crawl.local_site`` the crawl runs against a folder of the project served on loopback for the run, under
the fixed address ``http://site.localhost/`` (``local_site``): no internet, same URLs and WARC bytes every run.

Modules: ``urls`` (normalisation, scope, links, charsets), ``robots`` (robots.txt), ``state`` (SQLite +
fetch log), ``warc`` (rotating WARC writer), ``local_site`` (a project folder served on loopback), ``engine``
(scheduler and fetching). This module stays light:
httpx and warcio load only when a crawl runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...stage import StageContext, StageResult


def run_crawl(ctx: StageContext) -> StageResult:
    """Stage body: crawl ``crawl.seeds`` into ``ctx.out_dir`` and report what happened."""
    from ...stage import StageResult
    from .engine import crawl, reason_text

    cfg = ctx.manifest.crawl
    if ctx.options.get("force"):
        from ... import console
        from .engine import FETCH_LOG, PARTIAL_DIR, STATE_DB, WARC_DIR
        from .state import remove_state

        console.get_logger(__name__).info("crawl: forced, starting a fresh crawl in %s", ctx.out_dir)
        remove_state(ctx.out_dir, [STATE_DB, FETCH_LOG, WARC_DIR, PARTIAL_DIR])
    report = crawl(cfg, ctx.out_dir, ctx.resolve(cfg.local_site) if cfg.local_site else None)
    m = report.metrics()

    def by_reason(d: dict[str, int]) -> str:
        return ", ".join(f"{reason_text(r)} {n}" for r, n in d.items()) or "none"

    summary = [
        ("pages stored", f"{report.pages_stored:,} ({report.pages_stored_this_run:,} this run)"),
        (
            "requests",
            f"{report.requests_this_run:,} in {report.elapsed_s:.1f}s ({report.pages_per_s:.1f} pages/s)",
        ),
        ("skipped", by_reason(m["skipped_by_reason"])),
        ("errors", by_reason(m["errors_by_reason"])),
        ("WARC files", f"{len(report.warc_files)} in {report.warc_dir}"),
    ]
    if cfg.local_site:
        from .local_site import LOCAL_BASE

        summary.insert(0, ("local site", f"{cfg.local_site}/ served on loopback as {LOCAL_BASE}/"))
    if report.seeds_failed:
        summary.append(("seeds failed", "; ".join(f"{u} ({reason_text(r)})" for u, r in report.seeds_failed)))
    if not cfg.enabled:
        # Named on the command line (`llmforge run crawl data`), so it ran; but the data stage follows the
        # manifest's wiring and reads a crawl only when the crawl stage is enabled. Say so now, not never.
        note = (
            "`crawl.enabled` is false: this crawl ran because it was named, but the data stage will not read "
            f"it. Set `crawl.enabled: true` in the manifest, or add `- path: {report.warc_dir}` to `data.inputs`."
        )
        from ... import console

        console.get_logger(__name__).warning("crawl: %s", note)
        summary.append(("⚠ not wired", note))
    if report.frontier_left:
        summary.append(
            ("frontier left", f"{report.frontier_left:,} URLs (raise crawl.max_pages to continue)")
        )
    rows = [[o, reason_text(r), n] for o, reasons in report.outcomes.items() for r, n in reasons.items()]
    return StageResult(
        outputs={"warc": report.warc_dir},
        metrics=m,
        summary=summary,
        tables=[{"title": "crawl outcomes", "columns": ["outcome", "reason", "URLs"], "rows": rows}],
    )


def __getattr__(name: str):
    # Lazy re-exports so `from llmforge.data.crawl import crawl` works without importing httpx up front.
    if name in ("crawl", "Crawler", "CrawlReport"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(name)


__all__ = ["CrawlReport", "Crawler", "crawl", "run_crawl"]
