"""The crawl stage against a real local HTTP site: politeness, robots, redirects, retries, caps, charsets,
dedup, scope, WARC output (warcio + datatrove), fetch log, bad seeds and the stage contract.

The site is served on 127.0.0.1; the only other host used is under ``.invalid``, which never resolves.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from llmforge.data.crawl import crawl, run_crawl
from llmforge.data.crawl.state import read_fetch_log
from llmforge.errors import DataError
from llmforge.manifest import CrawlSection, LoadedManifest, Manifest
from llmforge.stage import StageContext

from .crawl_site import Resp, Site, page

UA = "llmforge-test/1.0 (+https://example.invalid/bot)"
CRAWL_DELAY = 0.05

SJIS_BODY = (
    '<html><head><meta charset="shift_jis"><title>日本語</title></head>'
    '<body><p>こんにちは世界</p><a href="/日本.html">日本</a></body></html>'
).encode("shift_jis")
CP1252_BODY = "<html><body><p>Caf\u00e9 \u201cquoted\u201d \u20ac5</p></body></html>".encode("cp1252")
HUGE = b"<html><body>" + b"x" * 300_000 + b"</body></html>"


def _routes(port: int) -> dict:
    def flaky_page(n: int) -> Resp:
        return Resp(500, b"oops") if n == 1 else Resp(body=page("flaky"))

    home_links = [
        "/a.html",
        "/b.html",
        "/private/secret.html",  # disallowed by robots.txt
        "/private/open.html",  # allowed by the longer Allow rule
        "/loop1",  # redirect loop
        "/chain1",  # redirect chain to an allowed page
        "/flaky.html",  # 500 then 200
        "/broken.html",  # permanent 500
        "/slow.html",  # slower than timeout_s
        "/file.bin",  # not HTML
        "/huge.html",  # over max_page_bytes, with Content-Length
        "/huge-stream.html",  # over max_page_bytes, no Content-Length
        "/sjis.html",
        "/cp1252.html",
        "/no-ct.html",  # no Content-Type: sniffed
        "/missing.html",  # 404: no retry
        "http://offsite.invalid/page.html",  # off-domain: never followed
        "/excluded/page.html",  # exclude_patterns
        # duplicates of /a.html after normalisation
        "/a.html#section",
        "/./a.html",
        "/x/../a.html",
        "/%61.html",
        "HTTP://127.0.0.1:{port}/a.html",
        "mailto:someone@example.invalid",
    ]
    return {
        "/robots.txt": Resp(
            body=(
                "User-agent: *\nDisallow: /private/\nAllow: /private/open.html\n"
                f"Crawl-delay: {CRAWL_DELAY}\n\nUser-agent: otherbot\nDisallow: /\n"
            ).encode(),
            content_type="text/plain",
        ),
        "/": Resp(body=page("home", [h.replace("{port}", str(port)) for h in home_links])),
        "/a.html": Resp(body=page("a", ["/deep1.html", "/"])),
        "/b.html": Resp(body=page("b", ["/a.html"])),
        "/deep1.html": Resp(body=page("deep1", ["/deep2.html"])),  # depth 2
        "/deep2.html": Resp(body=page("deep2")),  # depth 3 > max_depth
        "/private/secret.html": Resp(body=page("secret")),
        "/private/open.html": Resp(body=page("open")),
        "/loop1": Resp(302, headers={"Location": "/loop2"}, content_type=None),
        "/loop2": Resp(302, headers={"Location": "/loop1"}, content_type=None),
        "/chain1": Resp(301, headers={"Location": "/chain2"}, content_type=None),
        "/chain2": Resp(302, headers={"Location": "/chain-end.html"}, content_type=None),
        "/chain-end.html": Resp(body=page("chain end")),
        "/flaky.html": flaky_page,
        "/broken.html": Resp(500, b"always broken"),
        "/slow.html": Resp(body=page("slow"), delay=1.5),
        "/file.bin": Resp(body=bytes(range(256)) * 8, content_type="application/octet-stream"),
        "/huge.html": Resp(body=HUGE),
        "/huge-stream.html": Resp(body=HUGE, stream=True),
        "/sjis.html": Resp(body=SJIS_BODY, content_type="text/html"),
        "/%E6%97%A5%E6%9C%AC.html": Resp(body=page("nihon")),
        "/cp1252.html": Resp(body=CP1252_BODY, content_type="text/html; charset=windows-1252"),
        "/no-ct.html": Resp(body=page("no content type"), content_type=None),
        "/excluded/page.html": Resp(body=page("excluded")),
    }


STORED_PATHS = {
    "/",
    "/a.html",
    "/b.html",
    "/deep1.html",
    "/private/open.html",
    "/chain-end.html",
    "/flaky.html",
    "/sjis.html",
    "/%E6%97%A5%E6%9C%AC.html",
    "/cp1252.html",
    "/no-ct.html",
}


def _cfg(site: Site, **kw) -> CrawlSection:
    base = {
        "enabled": True,
        "seeds": [site.url("/"), "http://nonexistent.invalid/"],
        "user_agent": UA,
        "max_depth": 2,
        "max_pages": 100,
        "per_host_delay_s": 0.0,
        "concurrency": 4,
        "per_host_concurrency": 2,
        "timeout_s": 0.5,
        "retries": 1,
        "backoff_s": 0.05,
        "max_page_bytes": 100_000,
        "exclude_patterns": ["/excluded/"],
    }
    base.update(kw)
    return CrawlSection(**base)


@pytest.fixture(scope="module")
def crawled(tmp_path_factory):
    """One full crawl of the test site, shared by the assertions below (it is the slow part)."""
    site = Site()
    site.routes.update(_routes(site.port))
    with site:
        out = tmp_path_factory.mktemp("crawl")
        report = crawl(_cfg(site), out)
        yield site, out, report


def _warc_records(warc_dir: Path) -> list:
    from warcio.archiveiterator import ArchiveIterator

    records = []
    for path in sorted(warc_dir.glob("*.warc.gz")):
        with open(path, "rb") as f:
            for r in ArchiveIterator(f):
                records.append(
                    {
                        "file": path.name,
                        "type": r.rec_type,
                        "uri": r.rec_headers.get_header("WARC-Target-URI"),
                        "id": r.rec_headers.get_header("WARC-Record-ID"),
                        "concurrent": r.rec_headers.get_header("WARC-Concurrent-To"),
                        "payload_type": r.rec_headers.get_header("WARC-Identified-Payload-Type"),
                        "status": r.http_headers.get_statuscode() if r.http_headers else None,
                        "ua": r.http_headers.get_header("User-Agent") if r.http_headers else None,
                        "payload": r.content_stream().read(),
                    }
                )
    return records


def test_stores_exactly_the_reachable_html_pages(crawled) -> None:
    site, out, report = crawled
    records = _warc_records(out / "warc")
    responses = [r for r in records if r["type"] == "response"]
    stored = sorted(r["uri"].removeprefix(site.base) for r in responses)
    assert stored == sorted(STORED_PATHS)
    assert report.pages_stored == len(STORED_PATHS)
    assert not (out / "warc.partial").exists()


def test_wire_behaviour(crawled) -> None:
    site, _out, _report = crawled
    paths = site.paths()
    # Every page once; transient failures exactly once more (retries=1); robots.txt once.
    for p in STORED_PATHS - {"/flaky.html"}:
        assert paths.count(p) == 1, p
    assert paths.count("/flaky.html") == 2
    assert paths.count("/broken.html") == 2
    assert paths.count("/slow.html") == 2
    assert paths.count("/missing.html") == 1  # 404 is final
    assert paths.count("/robots.txt") == 1
    assert paths.count("/loop1") == 1 and paths.count("/loop2") == 1
    # Never requested: robots-disallowed, excluded, too deep.
    for p in ("/private/secret.html", "/excluded/page.html", "/deep2.html"):
        assert p not in paths
    assert {h.user_agent for h in site.hits} == {UA}
    assert {h.host for h in site.hits} == {f"127.0.0.1:{site.port}"}


def test_crawl_delay_is_respected(crawled) -> None:
    site, out, _report = crawled
    # Crawler side: when each request to the site started (robots.txt, pages, retries).
    started = sorted(
        e["started"]
        for e in read_fetch_log(out / "fetches.jsonl")
        if "started" in e and e["url"].startswith(site.base)
    )
    assert len(started) == len(site.hits)
    gaps = [b - a for a, b in itertools.pairwise(started)]
    assert min(gaps) >= CRAWL_DELAY - 0.001, gaps  # 0.001: the log rounds to 0.1 ms
    # Server side: n requests spaced by the Crawl-delay span at least (n-1) delays. (Single arrival gaps
    # jitter by a thread switch, so only the span is checked here.)
    times = sorted(h.t for h in site.hits)
    assert times[-1] - times[0] >= (len(times) - 1) * CRAWL_DELAY * 0.95


def test_warc_records_are_standard(crawled) -> None:
    site, out, _report = crawled
    records = _warc_records(out / "warc")
    assert records[0]["type"] == "warcinfo"
    by_id = {r["id"]: r for r in records}
    responses = [r for r in records if r["type"] == "response"]
    requests = [r for r in records if r["type"] == "request"]
    assert len(requests) == len(responses)
    for req in requests:
        resp = by_id[req["concurrent"]]
        assert resp["type"] == "response" and resp["uri"] == req["uri"]
        assert req["ua"] == UA
    for r in responses:
        assert r["status"] == "200"
        assert r["payload_type"] == "text/html"
    payload = {r["uri"].removeprefix(site.base): r["payload"] for r in responses}
    # Raw bytes, byte for byte: no charset decoding on the way in.
    assert payload["/sjis.html"] == SJIS_BODY
    assert payload["/cp1252.html"] == CP1252_BODY
    assert payload["/b.html"] == page("b", ["/a.html"])


def test_warc_is_readable_by_datatrove(crawled) -> None:
    from datatrove.pipeline.readers import WarcReader

    site, out, _report = crawled
    docs = list(WarcReader(str(out / "warc"))())
    urls = sorted(d.metadata["url"].removeprefix(site.base) for d in docs)
    assert urls == sorted(STORED_PATHS)
    text = {d.metadata["url"].removeprefix(site.base): d.text for d in docs}
    assert "Some text about b." in text["/b.html"]


def test_fetch_log_records_every_fetch(crawled) -> None:
    site, out, _report = crawled
    entries = list(read_fetch_log(out / "fetches.jsonl"))
    required = {"url", "final_url", "status", "content_type", "bytes", "ms", "outcome", "reason", "attempt"}
    assert all(required <= e.keys() for e in entries)
    final = {
        e["url"].removeprefix(site.base): e
        for e in entries
        if e["kind"] == "page" and e["outcome"] != "retry"
    }
    assert (
        final["/private/secret.html"]["outcome"] == "skipped"
        and final["/private/secret.html"]["reason"] == "robots"
    )
    assert final["/loop1"]["outcome"] == "redirect" and final["/loop1"]["final_url"] == site.url("/loop2")
    assert final["/loop2"]["reason"] == "redirect_loop"
    assert final["/chain1"]["status"] == 301 and final["/chain2"]["final_url"] == site.url("/chain-end.html")
    assert final["/flaky.html"]["outcome"] == "stored" and final["/flaky.html"]["attempt"] == 2
    assert final["/broken.html"]["reason"] == "http_500" and final["/broken.html"]["attempt"] == 2
    assert final["/slow.html"]["reason"] == "timeout"
    assert final["/file.bin"]["reason"] == "content_type"
    assert final["/huge.html"]["reason"] == "too_large"
    assert final["/huge-stream.html"]["reason"] == "too_large"
    # The streamed page was cut off near the cap rather than downloaded whole.
    assert final["/huge-stream.html"]["bytes"] < len(HUGE)
    assert final["/missing.html"]["reason"] == "http_404" and final["/missing.html"]["attempt"] == 1
    assert final["http://nonexistent.invalid/"]["reason"] == "dns"
    retries = [e for e in entries if e["outcome"] == "retry"]
    assert {e["url"].removeprefix(site.base) for e in retries} == {
        "/flaky.html",
        "/broken.html",
        "/slow.html",
    }
    assert not any("offsite.invalid" in e["url"] for e in entries)
    assert sum(1 for e in entries if e["kind"] == "page" and e["url"] == site.url("/a.html")) == 1


def test_metrics_and_bad_seed_reported(crawled) -> None:
    _site, _out, report = crawled
    m = report.metrics()
    assert m["pages_stored"] == len(STORED_PATHS)
    assert m["robots_disallowed"] == 1
    assert m["skipped_by_reason"]["content_type"] == 1
    assert m["skipped_by_reason"]["too_large"] == 2
    assert m["errors_by_reason"] == {
        "dns": 1,
        "redirect_loop": 1,
        "http_500": 1,
        "timeout": 1,
        "http_404": 1,
    }
    assert m["links_filtered"] == {"off_domain": 1, "excluded": 1}
    assert m["seeds_failed"] == 1 and report.seeds_failed[0][0] == "http://nonexistent.invalid/"
    assert m["pages_per_s"] > 0 and m["frontier_left"] == 0
    json.dumps(m)  # lineage.json must be able to hold it


# --------------------------------------------------------------------------------------------------------
# Smaller crawls
# --------------------------------------------------------------------------------------------------------


def _chain_site(n: int) -> dict:
    routes = {f"/p{i}.html": Resp(body=page(f"p{i}", [f"/p{i + 1}.html", "/"])) for i in range(n)}
    routes["/"] = Resp(body=page("home", ["/p0.html"]))
    return routes


def test_max_pages_then_resume_continues(tmp_path) -> None:
    with Site(_chain_site(10)) as site:
        cfg = _cfg(site, seeds=[site.url("/")], max_depth=50, max_pages=3)
        r1 = crawl(cfg, tmp_path)
        assert r1.pages_stored == 3 and r1.frontier_left == 1
        r2 = crawl(cfg.model_copy(update={"max_pages": 6}), tmp_path)
        assert r2.resumed and r2.pages_stored == 6 and r2.pages_stored_this_run == 3
        pages = [p for p in site.paths() if p != "/robots.txt"]
        assert len(pages) == len(set(pages)) == 6  # nothing fetched twice across the two runs
        assert "/p5.html" not in site.paths()
    responses = [r for r in _warc_records(tmp_path / "warc") if r["type"] == "response"]
    assert len(responses) == 6 and len({r["uri"] for r in responses}) == 6


def test_include_patterns_and_depth_zero(tmp_path) -> None:
    routes = {
        "/": Resp(body=page("home", ["/blog/1.html", "/blog/2.html", "/about.html"])),
        "/blog/1.html": Resp(body=page("b1")),
        "/blog/2.html": Resp(body=page("b2")),
        "/about.html": Resp(body=page("about")),
    }
    with Site(routes) as site:
        report = crawl(_cfg(site, seeds=[site.url("/")], include_patterns=[r"/blog/\d+\.html$"]), tmp_path)
        assert report.pages_stored == 3
        assert "/about.html" not in site.paths()
        zero = crawl(_cfg(site, seeds=[site.url("/")], max_depth=0), tmp_path / "zero")
        assert zero.pages_stored == 1


def test_warc_rotation_and_stage_contract(tmp_path) -> None:
    with Site(_chain_site(12)) as site:
        manifest = Manifest(crawl=_cfg(site, seeds=[site.url("/")], max_depth=50, warc_max_bytes=2_000))
        loaded = LoadedManifest(manifest=manifest, path=tmp_path / "llmforge.yaml")
        out = tmp_path / "runs" / "crawl"
        out.mkdir(parents=True)
        result = run_crawl(StageContext(name="crawl", loaded=loaded, out_dir=out))
    assert result.outputs == {"warc": out / "warc"}
    files = sorted((out / "warc").glob("*.warc.gz"))
    assert len(files) > 2 and result.metrics["warc_files"] == len(files)
    responses = [r for r in _warc_records(out / "warc") if r["type"] == "response"]
    assert len(responses) == 13 == result.metrics["pages_stored"]
    assert len({r["uri"] for r in responses}) == 13
    for f in files:  # every file starts with its own warcinfo record
        assert _warc_records_in(f)[0] == "warcinfo"
    labels = dict(result.summary)
    assert labels["pages stored"].startswith("13")
    assert result.tables and result.tables[0]["rows"]


def _warc_records_in(path: Path) -> list[str]:
    from warcio.archiveiterator import ArchiveIterator

    with open(path, "rb") as f:
        return [r.rec_type for r in ArchiveIterator(f)]


def test_changed_scope_starts_fresh(tmp_path) -> None:
    with Site(_chain_site(3)) as site:
        assert crawl(_cfg(site, seeds=[site.url("/")], max_depth=50), tmp_path).pages_stored == 4
        report = crawl(_cfg(site, seeds=[site.url("/p1.html")], max_depth=0), tmp_path)
    assert not report.resumed and report.pages_stored == 1
    uris = [r["uri"] for r in _warc_records(tmp_path / "warc") if r["type"] == "response"]
    assert uris == [site.url("/p1.html")]  # nothing left over from the other crawl


# --------------------------------------------------------------------------------------------------------
# Crawls that store nothing
# --------------------------------------------------------------------------------------------------------


def test_every_seed_failing_is_a_clear_error(tmp_path) -> None:
    cfg = CrawlSection(seeds=["http://nonexistent.invalid/", "http://also-missing.invalid/x"], backoff_s=0.01)
    with pytest.raises(DataError) as info:
        crawl(cfg, tmp_path)
    msg = str(info.value)
    assert "every seed failed" in msg
    assert "http://nonexistent.invalid/ (host name does not resolve)" in msg
    assert "http://also-missing.invalid/x" in msg
    assert "fetches.jsonl" in msg and "reachable from this machine" in msg


def test_everything_disallowed_is_a_clear_error(tmp_path) -> None:
    routes = {
        "/robots.txt": Resp(body=b"User-agent: *\nDisallow: /\n", content_type="text/plain"),
        "/": Resp(body=page("home")),
    }
    with Site(routes) as site, pytest.raises(DataError, match=r"disallowed by robots\.txt"):
        crawl(_cfg(site, seeds=[site.url("/"), site.url("/other")]), tmp_path)
    assert "/" not in site.paths()


def test_robots_5xx_means_crawl_nothing_and_no_html_is_explained(tmp_path) -> None:
    with Site({"/robots.txt": Resp(503, b"down")}) as site:
        with pytest.raises(DataError, match="robots"):
            crawl(_cfg(site, seeds=[site.url("/")]), tmp_path / "a")
        assert site.paths() == ["/robots.txt", "/robots.txt"]  # retried once, then gave up on the site
    not_html = pytest.raises(DataError, match=r"every seed failed: .* \(not HTML\)\. Use seeds that are HTML")
    with Site({"/": Resp(body=b"%PDF-1.4", content_type="application/pdf")}) as site, not_html:
        crawl(_cfg(site, seeds=[site.url("/")]), tmp_path / "b")


def test_forced_stage_recrawls_from_scratch(tmp_path) -> None:
    """`llmforge data crawl --force` must fetch again, not find its finished frontier and do nothing."""
    with Site(_chain_site(3)) as site:
        manifest = Manifest(crawl=_cfg(site, seeds=[site.url("/")], max_depth=50))
        loaded = LoadedManifest(manifest=manifest, path=tmp_path / "llmforge.yaml")
        out = tmp_path / "runs" / "crawl"
        out.mkdir(parents=True)
        first = run_crawl(StageContext(name="crawl", loaded=loaded, out_dir=out))
        again = run_crawl(StageContext(name="crawl", loaded=loaded, out_dir=out))
        forced = run_crawl(StageContext(name="crawl", loaded=loaded, out_dir=out, options={"force": True}))
    assert first.metrics["pages_stored_this_run"] == 4
    assert again.metrics["pages_stored_this_run"] == 0  # resumed a finished crawl: nothing to do
    assert forced.metrics["pages_stored_this_run"] == 4 and forced.metrics["pages_stored"] == 4
    responses = [r for r in _warc_records(out / "warc") if r["type"] == "response"]
    assert len(responses) == 4  # the old WARC files were replaced, not appended to
