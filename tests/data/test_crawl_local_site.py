"""``crawl.local_site``: a project folder served on loopback and crawled with the real crawler.

Covers the server (files, folder redirects, 404s, no escape from the folder), the port-free addresses
(``http://site.localhost/...`` in the state, the fetch log and the WARC), byte-identical WARC files across runs on
different ports, an edited site being crawled afresh, the manifest rules for seeds, the shipped demo site (in sync
with its generator; what a crawl of it meets) and the pipeline: the data stage reads the crawl, a re-crawl that
finds the same site leaves the data stage cached, and the pages planted for dropping are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import runpy
import shutil
import socket
from pathlib import Path

import httpx
import pytest
import yaml
from pydantic import ValidationError

from llmforge.data.crawl import crawl, local_site
from llmforge.data.crawl.state import read_fetch_log
from llmforge.errors import UserInputError
from llmforge.manifest import CrawlSection

ROOT = Path(__file__).resolve().parents[2]
DEMO_SITE = ROOT / "llmforge" / "templates" / "tiny" / "site"
BASE = local_site.LOCAL_BASE


def _page(title: str, links: list[str] = (), text: str = "") -> str:  # type: ignore[assignment]
    anchors = "".join(f'<a href="{h}">{h}</a>\n' for h in links)
    return f"<html><head><title>{title}</title></head><body><h1>{title}</h1><p>{text or title}</p>{anchors}</body></html>"


def _make_site(root: Path) -> Path:
    files = {
        "robots.txt": "User-agent: *\nDisallow: /private/\n",
        "index.html": _page(
            "home",
            [
                "docs",
                "private/x.html",
                "missing.html",
                "notes.txt",
                "https://example.invalid/",
                "docs/a.html#top",
            ],
        ),
        "docs/index.html": _page("docs", ["a.html", "b.html"]),
        "docs/a.html": _page("a", ["../", "b.html"]),
        "docs/b.html": _page("b", ["/docs/"]),
        "private/x.html": _page("secret"),
        "notes.txt": "plain text, not a page\n",
        ".hidden.html": _page("hidden"),
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return root


def _cfg(**kw) -> CrawlSection:
    return CrawlSection(**{"enabled": True, "local_site": "site", "per_host_delay_s": 0, **kw})


def _warc_bytes(out: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "warc").glob("*.warc.gz"))
    }


def _records(out: Path) -> list:
    from warcio.archiveiterator import ArchiveIterator

    recs = []
    for path in sorted((out / "warc").glob("*.warc.gz")):
        with open(path, "rb") as f:
            for r in ArchiveIterator(f):
                recs.append(
                    (
                        r.rec_type,
                        r.rec_headers.get_header("WARC-Target-URI"),
                        r.rec_headers.get_header("WARC-Date"),
                        r.http_headers.get_header("Host") if r.rec_type == "request" else None,
                        r.content_stream().read() if r.rec_type == "response" else b"",
                    )
                )
    return recs


class _RecordPorts:
    """Wraps ``LocalSite`` so a test learns which port each crawl's server got."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.ports: list[int] = []
        real = local_site.LocalSite
        ports = self.ports

        class Recording(real):  # type: ignore[misc, valid-type]
            def __enter__(self):
                ports.append(self.port)
                return super().__enter__()

        monkeypatch.setattr(local_site, "LocalSite", Recording)


# --------------------------------------------------------------------------------------------------------
# the server and the transport


def test_server_serves_the_folder_and_nothing_outside_it(tmp_path: Path) -> None:
    root = _make_site(tmp_path / "site")
    (tmp_path / "outside.html").write_text("<p>outside</p>")
    (root / "escape.html").symlink_to(tmp_path / "outside.html")
    with local_site.LocalSite(root) as srv, httpx.Client(base_url=f"http://127.0.0.1:{srv.port}") as c:
        home = c.get("/")
        assert home.status_code == 200 and home.text == (root / "index.html").read_text()
        assert home.headers["content-type"] == "text/html; charset=utf-8"
        assert home.headers["date"] == "Thu, 01 Jan 2026 00:00:00 GMT"  # local_site.SITE_DATE, not now
        assert "last-modified" not in home.headers
        assert home.headers["server"] == "llmforge-local-site"
        folder = c.get("/docs")
        assert folder.status_code == 301 and folder.headers["location"] == "/docs/"
        assert c.get("/docs/").text == (root / "docs" / "index.html").read_text()
        assert c.get("/robots.txt").headers["content-type"] == "text/plain"
        assert c.get("/notes.txt").headers["content-type"] == "text/plain"
        for path in (
            "/missing.html",
            "/escape.html",
            "/.hidden.html",
            "/../outside.html",
            "/%2e%2e/outside.html",
        ):
            assert c.get(path).status_code == 404, path
        assert c.head("/").status_code == 200


def test_transport_routes_the_site_host_to_loopback_and_keeps_the_url(tmp_path: Path) -> None:
    root = _make_site(tmp_path / "site")

    async def fetch(port: int) -> tuple[str, str, int]:
        mounts = {f"all://{local_site.LOCAL_HOST}": local_site.LoopbackTransport(port)}
        async with httpx.AsyncClient(mounts=mounts) as client:
            resp = await client.get(f"{BASE}/docs/a.html")
            return str(resp.url), resp.request.headers["host"], resp.status_code

    with local_site.LocalSite(root) as srv:
        url, host, status = asyncio.run(fetch(srv.port))
    assert (url, host, status) == (f"{BASE}/docs/a.html", local_site.LOCAL_HOST, 200)


# --------------------------------------------------------------------------------------------------------
# crawling it


def test_crawl_uses_fixed_addresses_and_the_real_crawler_rules(tmp_path: Path, monkeypatch) -> None:
    _make_site(tmp_path / "site")
    monkeypatch.chdir(tmp_path)
    report = crawl(_cfg(), tmp_path / "out")
    recs = _records(tmp_path / "out")
    stored = sorted(uri for kind, uri, *_ in recs if kind == "response")
    assert stored == [f"{BASE}/", f"{BASE}/docs/", f"{BASE}/docs/a.html", f"{BASE}/docs/b.html"]
    assert {host for kind, _, _, host, _ in recs if kind == "request"} == {local_site.LOCAL_HOST}
    assert {date for kind, _, date, *_ in recs if kind in ("request", "response")} == {
        "2026-01-01T00:00:00.000000Z"
    }
    by_url = {e["url"]: e for e in read_fetch_log(tmp_path / "out" / "fetches.jsonl")}
    assert all(u.startswith(BASE + "/") for u in by_url)  # never 127.0.0.1:<port>
    assert by_url[f"{BASE}/robots.txt"]["outcome"] == "ok"
    assert (by_url[f"{BASE}/private/x.html"]["outcome"], by_url[f"{BASE}/private/x.html"]["reason"]) == (
        "skipped",
        "robots",
    )
    assert by_url[f"{BASE}/docs"]["outcome"] == "redirect" and by_url[f"{BASE}/docs"]["status"] == 301
    assert by_url[f"{BASE}/missing.html"]["reason"] == "http_404"
    assert by_url[f"{BASE}/notes.txt"]["reason"] == "content_type"
    assert report.metrics()["links_filtered"] == {"off_domain": 1}
    assert report.pages_stored == 4 and report.metrics()["robots_disallowed"] == 1


def test_warc_bytes_do_not_depend_on_the_port_or_the_run(tmp_path: Path, monkeypatch) -> None:
    _make_site(tmp_path / "site")
    monkeypatch.chdir(tmp_path)
    ports = _RecordPorts(monkeypatch)
    crawl(_cfg(), tmp_path / "one")
    # Hold the first run's port, so the second server cannot get it.
    with socket.socket() as held:
        with contextlib.suppress(OSError):
            held.bind(("127.0.0.1", ports.ports[0]))
        crawl(_cfg(), tmp_path / "two")
    assert len(ports.ports) == 2 and ports.ports[0] != ports.ports[1]
    one, two = _warc_bytes(tmp_path / "one"), _warc_bytes(tmp_path / "two")
    assert one and one == two
    ids = []
    from warcio.archiveiterator import ArchiveIterator

    with open(next((tmp_path / "one" / "warc").glob("*.warc.gz")), "rb") as f:
        ids = [r.rec_headers.get_header("WARC-Record-ID") for r in ArchiveIterator(f)]
    assert len(ids) == len(set(ids)) == 1 + 2 * 4  # warcinfo + a request/response pair per page


def test_resume_keeps_an_unchanged_site_and_recrawls_an_edited_one(tmp_path: Path, monkeypatch) -> None:
    site = _make_site(tmp_path / "site")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    first = crawl(_cfg(), out)
    before = _warc_bytes(out)
    again = crawl(_cfg(), out)
    assert first.pages_stored_this_run == 4
    assert again.resumed and again.requests_this_run == 0 and _warc_bytes(out) == before
    (site / "docs" / "b.html").write_text(_page("b, edited", ["/docs/c.html"]), encoding="utf-8")
    (site / "docs" / "c.html").write_text(_page("c"), encoding="utf-8")
    edited = crawl(_cfg(), out)
    assert not edited.resumed and edited.pages_stored == edited.pages_stored_this_run == 5
    payloads = {uri: body for kind, uri, _, _, body in _records(out) if kind == "response"}
    assert b"b, edited" in payloads[f"{BASE}/docs/b.html"] and f"{BASE}/docs/c.html" in payloads


def test_seeds_are_paths_inside_the_site(tmp_path: Path) -> None:
    _make_site(tmp_path / "site")
    report = crawl(_cfg(seeds=["docs/a.html"], max_depth=0), tmp_path / "out", local_site=tmp_path / "site")
    assert [uri for kind, uri, *_ in _records(tmp_path / "out") if kind == "response"] == [
        f"{BASE}/docs/a.html"
    ]
    assert report.pages_stored == 1


def test_allowed_domains_never_exclude_the_local_site(tmp_path: Path) -> None:
    _make_site(tmp_path / "site")
    report = crawl(_cfg(allowed_domains=["example.org"]), tmp_path / "out", local_site=tmp_path / "site")
    assert report.pages_stored == 4


def test_stage_resolves_the_site_against_the_project(tmp_path: Path, monkeypatch) -> None:
    from llmforge.data.crawl import run_crawl
    from llmforge.manifest import LoadedManifest, Manifest
    from llmforge.stage import StageContext

    project = tmp_path / "project"
    _make_site(project / "site")
    monkeypatch.chdir(tmp_path)  # not the project: the folder must be found through the manifest
    manifest = Manifest.model_validate(
        {"project": {"name": "t"}, "crawl": {"enabled": True, "local_site": "site", "per_host_delay_s": 0}}
    )
    loaded = LoadedManifest(manifest=manifest, path=project / "llmforge.yaml")
    out = project / "runs" / "crawl"
    out.mkdir(parents=True)
    result = run_crawl(StageContext(name="crawl", loaded=loaded, out_dir=out))
    assert result.metrics["pages_stored"] == 4
    assert dict(result.summary)["local site"] == f"site/ served on loopback as {BASE}/"


def test_manifest_rules_for_local_site_seeds() -> None:
    assert _cfg().seeds == []  # defaults to the site's index at crawl time
    assert _cfg(seeds=["/", "guide/", "https://example.org/"]).seeds == [
        "/",
        "guide/",
        "https://example.org/",
    ]
    with pytest.raises(ValidationError, match="must start with http:// or https://"):
        CrawlSection(enabled=True, seeds=["/docs/"])
    with pytest.raises(ValidationError, match="a path inside the site"):
        _cfg(seeds=["ftp://example.org/"])
    with pytest.raises(ValidationError, match="`seeds` is empty"):
        CrawlSection(enabled=True)


def test_missing_site_folder_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"crawl\.local_site: .*nope is not a folder"):
        crawl(_cfg(local_site="nope"), tmp_path / "out", local_site=tmp_path / "nope")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------
# the shipped demo site


def test_demo_site_is_what_its_generator_writes(tmp_path: Path) -> None:
    gen = runpy.run_path(str(ROOT / "scripts" / "make_demo_site.py"))
    gen["build"](tmp_path / "site", gen["SEED"])

    def listing(root: Path) -> dict[str, str]:
        return {
            p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    assert listing(tmp_path / "site") == listing(DEMO_SITE), "re-run scripts/make_demo_site.py and commit"


def test_crawl_of_the_demo_site(tmp_path: Path) -> None:
    report = crawl(_cfg(max_depth=4), tmp_path / "out", local_site=DEMO_SITE)
    m = report.metrics()
    html_files = sorted(p for p in DEMO_SITE.rglob("*.html") if p.relative_to(DEMO_SITE).parts[0] != "drafts")
    assert m["pages_stored"] == len(html_files) == 49
    assert m["skipped_by_reason"] == {"robots": 1, "content_type": 1}  # drafts/1.4.0.html, the cheat sheet
    assert m["errors_by_reason"] == {"http_404": 1}  # guide/old-setup.html
    assert m["redirects"] == 1 and m["links_filtered"]["off_domain"] >= 2
    assert m["frontier_left"] == 0 and report.elapsed_s < 30


@pytest.mark.slow
def test_pipeline_reads_the_crawl_and_a_same_site_recrawl_keeps_data_cached(tmp_path: Path) -> None:
    from llmforge import pipeline
    from llmforge.manifest import load

    shutil.copytree(DEMO_SITE, tmp_path / "site")
    manifest = {
        "project": {"name": "t"},
        "crawl": {"enabled": True, "local_site": "site", "max_depth": 4, "per_host_delay_s": 0},
        "data": {"enabled": True, "tasks": 1, "workers": 1},
    }
    (tmp_path / "llmforge.yaml").write_text(yaml.safe_dump(manifest), encoding="utf-8")
    loaded = load(tmp_path / "llmforge.yaml", [])
    first = {o.name: o.action for o in pipeline.run(loaded, ["crawl", "data"])}
    assert first == {"crawl": "ran", "data": "ran"}
    # The crawl re-runs from scratch on a new port and writes the same bytes, so the data stage stays cached.
    again = {o.name: o.action for o in pipeline.run(loaded, ["crawl", "data"], force=["crawl"])}
    assert again == {"crawl": "ran", "data": "cached"}

    rows = {}
    for shard in sorted((tmp_path / "runs" / "data" / "output").glob("*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                rows[row["metadata"]["url"].removeprefix(BASE)] = row
    for dropped in ("/community/deals.html", "/tags/", "/community/workers-stop.html"):
        assert dropped not in rows, dropped  # keyword spam, a page of links, a leaked AWS key
    assert ("/install.html" in rows) != ("/guide/install.html" in rows)  # exact duplicates: one kept
    assert ("/releases/1.2.0.html" in rows) != ("/releases/1.2.1.html" in rows)  # near duplicates: one kept
    team = rows["/about/team.html"]["text"]
    assert "<EMAIL>" in team and "<PHONE>" in team and "example.org" not in team and "7946" not in team
    assert len(rows) == 49 - 5


def test_edited_site_reruns_the_crawl_stage(tmp_path: Path) -> None:
    from llmforge import pipeline
    from llmforge.manifest import load

    _make_site(tmp_path / "site")
    manifest = {
        "project": {"name": "t"},
        "crawl": {"enabled": True, "local_site": "site", "per_host_delay_s": 0},
    }
    (tmp_path / "llmforge.yaml").write_text(yaml.safe_dump(manifest))
    loaded = load(tmp_path / "llmforge.yaml", [])
    assert [o.action for o in pipeline.run(loaded, ["crawl"])] == ["ran"]
    assert [o.action for o in pipeline.run(loaded, ["crawl"])] == ["cached"]
    (tmp_path / "site" / "docs" / "b.html").write_text(_page("b, edited"))
    (out,) = pipeline.run(loaded, ["crawl"])
    assert out.action == "ran" and out.reason == "input file changed: site"
