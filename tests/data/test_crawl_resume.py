"""Kill a crawl with SIGKILL mid-way, re-run it, and check that it continued from its frontier."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from llmforge.data.crawl import crawl
from llmforge.manifest import CrawlSection

from .crawl_site import Resp, Site, page

N_PAGES = 40
REPO = Path(__file__).resolve().parents[2]

CHILD = """
import sys
from llmforge.data.crawl import crawl
from llmforge.manifest import CrawlSection
crawl(CrawlSection.model_validate_json(sys.argv[1]), sys.argv[2])
"""


def _stored(db: Path) -> set[str]:
    if not db.exists():
        return set()
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return {r[0] for r in con.execute("SELECT url FROM urls WHERE outcome = 'stored'")}
        finally:
            con.close()
    except sqlite3.OperationalError:  # schema not created yet
        return set()


def _responses(warc_dir: Path) -> list[str]:
    from warcio.archiveiterator import ArchiveIterator

    uris = []
    for path in sorted(warc_dir.glob("*.warc.gz")):
        with open(path, "rb") as f:
            uris += [
                r.rec_headers.get_header("WARC-Target-URI")
                for r in ArchiveIterator(f)
                if r.rec_type == "response"
            ]
    return uris


def test_sigkill_then_resume_fetches_nothing_twice(tmp_path) -> None:
    routes = {f"/p{i}.html": Resp(body=page(f"p{i}", [f"/p{i + 1}.html", "/"])) for i in range(N_PAGES)}
    routes["/"] = Resp(body=page("home", ["/p0.html"]))
    with Site(routes) as site:
        cfg = CrawlSection(
            seeds=[site.url("/")],
            max_depth=N_PAGES + 1,
            per_host_delay_s=0.03,
            concurrency=1,
            per_host_concurrency=1,
            warc_max_bytes=3_000,  # rotate every few pages: closed files plus, usually, an open one
            respect_robots=False,
        )
        db = tmp_path / "crawl_state.sqlite"
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, cfg.model_dump_json(), str(tmp_path)], env=env, cwd=REPO
        )
        try:
            deadline = time.monotonic() + 30
            while len(_stored(db)) < 12:
                assert proc.poll() is None, "the crawl finished before it could be killed"
                assert time.monotonic() < deadline, "the crawl made no progress"
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        time.sleep(0.2)  # let the server log anything already on the wire
        before = site.paths()
        committed = _stored(db)
        assert 12 <= len(committed) < N_PAGES
        # Some files were rotated into warc/ before the kill (the one in progress, if any, is in
        # warc.partial/; cutting its uncommitted tail is tested in test_crawl_units.py).
        assert list((tmp_path / "warc").glob("*.warc.gz"))

        report = crawl(cfg, tmp_path)
        after = site.paths()[len(before) :]

    assert report.resumed
    assert report.pages_stored == N_PAGES + 1
    # Nothing stored before the kill is fetched again ...
    assert not {site.url(p) for p in after} & committed
    # ... and at most the one page in flight at the kill (concurrency 1) is requested by both runs.
    assert len(set(before) & set(after)) <= 1
    # The final WARC set holds every page exactly once, and nothing is left half-written.
    uris = _responses(tmp_path / "warc")
    assert sorted(uris) == sorted({site.url("/")} | {site.url(f"/p{i}.html") for i in range(N_PAGES)})
    assert not (tmp_path / "warc.partial").exists()
    # A second re-run of a finished crawl fetches nothing.
    n = len(site.hits)
    again = crawl(cfg, tmp_path)
    assert again.pages_stored == N_PAGES + 1 and again.requests_this_run == 0 and len(site.hits) == n


def test_fetch_log_torn_tail_is_repaired(tmp_path) -> None:
    from llmforge.data.crawl.state import FetchLog, read_fetch_log

    path = tmp_path / "fetches.jsonl"
    path.write_text('{"url": "a"}\n{"url": "b", "sta')
    log = FetchLog(path)
    log.write(url="c")
    log.close()
    assert [e["url"] for e in read_fetch_log(path)] == ["a", "c"]
