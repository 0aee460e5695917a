"""Unit tests of the crawler's pure parts: URL normalisation, scope, robots.txt, charsets, WARC repair."""

from __future__ import annotations

import gzip
import urllib.robotparser

import pytest

from llmforge.data.crawl.robots import RobotsRules
from llmforge.data.crawl.urls import (
    UrlScope,
    decode_html,
    detect_charset,
    extract_links,
    looks_like_html,
    normalize_url,
    remove_dot_segments,
)

# --------------------------------------------------------------------------------------------------------
# URL normalisation
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("HTTP://Example.COM/a", "http://example.com/a"),
        ("http://example.com:80/a", "http://example.com/a"),
        ("https://example.com:443/a", "https://example.com/a"),
        ("http://example.com:8080/a", "http://example.com:8080/a"),
        ("https://example.com:80/a", "https://example.com:80/a"),
        ("http://example.com", "http://example.com/"),
        ("http://example.com/a#frag", "http://example.com/a"),
        ("http://example.com/a/./b/../c", "http://example.com/a/c"),
        ("http://example.com/../../a", "http://example.com/a"),
        ("http://example.com/%61%62c", "http://example.com/abc"),  # unreserved escapes decoded
        ("http://example.com/a%2fb", "http://example.com/a%2Fb"),  # reserved escapes kept, upper-cased
        ("http://example.com/a b", "http://example.com/a%20b"),
        ("http://example.com/caf\u00e9", "http://example.com/caf%C3%A9"),
        ("http://example.com/100%", "http://example.com/100%25"),
        ("http://example.com/?", "http://example.com/"),
        ("http://example.com/p?b=2&a=1", "http://example.com/p?b=2&a=1"),  # order kept by default
        ("http://user:pw@example.com/", "http://example.com/"),
        ("http://example.com./", "http://example.com/"),
        ("http://b\u00fccher.example/", "http://xn--bcher-kva.example/"),
        ("http://[::1]:8080/x", "http://[::1]:8080/x"),
    ],
)
def test_normalize_url(raw: str, expected: str) -> None:
    assert normalize_url(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "mailto:a@b.c",
        "javascript:void(0)",
        "ftp://example.com/",
        "data:text/html,hi",
        "http://",
        "http://x:99999/",
        "",
    ],
)
def test_normalize_rejects_non_crawlable(raw: str) -> None:
    assert normalize_url(raw) is None


def test_normalize_relative_and_sorted_query() -> None:
    assert normalize_url("../c.html#x", "http://h/a/b/index.html") == "http://h/a/c.html"
    assert normalize_url("http://h/p?b=2&a=1", sort_query=True) == "http://h/p?a=1&b=2"


def test_remove_dot_segments_rfc_examples() -> None:
    # RFC 3986 §5.2.4 examples
    assert remove_dot_segments("/a/b/c/./../../g") == "/a/g"
    assert remove_dot_segments("/a/b/..") == "/a/"
    assert remove_dot_segments("/a/.") == "/a/"


def test_scope_domains_patterns_and_depth0_exemption() -> None:
    scope = UrlScope(["http://example.com/"], include=[r"/blog/"], exclude=[r"\.pdf$"])
    assert scope.rejects("http://sub.example.com/blog/x", 1) is None  # subdomains allowed
    assert scope.rejects("http://notexample.com/blog/x", 1) == "off_domain"
    assert scope.rejects("http://example.com/about", 1) == "not_included"
    assert scope.rejects("http://example.com/blog/a.pdf", 1) == "excluded"
    assert scope.rejects("http://example.com/about", 0) is None  # seeds' redirects skip patterns
    assert scope.rejects("http://other.org/", 0) == "off_domain"  # ... but not the domain rule
    explicit = UrlScope(["http://example.com/"], allowed_domains=["Example.org"])
    assert explicit.rejects("http://www.example.org/", 1) is None
    assert explicit.rejects("http://example.com/", 1) == "off_domain"


# --------------------------------------------------------------------------------------------------------
# HTML: links and charsets
# --------------------------------------------------------------------------------------------------------


def test_extract_links_base_area_and_dedup() -> None:
    html = """<html><head><base href="/dir/"></head><body>
      <a href="a.html">a</a> <a href="a.html#top">again</a> <area href="/map.html">
      <a href="mailto:x@y.z">mail</a> <a href="&#47;ent.html">entity</a> <a>no href</a>
      <a href="http://Other.example:80/x">abs</a></body></html>"""
    links = extract_links(html, "http://h/index.html")
    assert links == [
        "http://h/dir/a.html",
        "http://h/map.html",
        "http://h/ent.html",
        "http://other.example/x",
    ]


def test_charset_precedence() -> None:
    meta = b'<html><head><meta charset="shift_jis"></head>'
    assert detect_charset(meta, "text/html; charset=windows-1252") == "cp1252"  # header beats meta
    assert detect_charset(meta, "text/html") == "shift_jis"
    http_equiv = b'<meta http-equiv="Content-Type" content="text/html; charset=ISO-8859-1">'
    assert detect_charset(http_equiv, None) == "cp1252"  # WHATWG: latin-1 labels mean windows-1252
    assert detect_charset(b"\xef\xbb\xbf<html>", "text/html; charset=latin-1") == "utf-8-sig"  # BOM wins
    assert detect_charset(b"<html>", "text/html; charset=bogus") == "utf-8"
    assert decode_html(b"caf\xe9 \xff", None) == "caf\ufffd \ufffd"  # invalid UTF-8 never raises


def test_sniff_html_without_content_type() -> None:
    assert looks_like_html(b"  <!DOCTYPE html><html>")
    assert looks_like_html(b"\xef\xbb\xbf<html><body>")
    assert not looks_like_html(b"%PDF-1.7")
    assert not looks_like_html(b"\x89PNG\r\n")


# --------------------------------------------------------------------------------------------------------
# robots.txt
# --------------------------------------------------------------------------------------------------------

ROBOTS = """\
# comment
User-agent: *
Disallow: /private/
Allow: /private/open.html
Disallow: /*.pdf$
Disallow: /tmp
Crawl-delay: 2

User-agent: llmforge-crawler
User-agent: otherbot
Disallow: /only-us/
Crawl-delay: 0.5

User-agent: llmforge-crawler
Disallow: /also-us/
"""


def test_robots_longest_match_wildcards_and_ties() -> None:
    r = RobotsRules.parse(ROBOTS, "somebot/1.0")
    assert not r.allowed("/private/secret.html")
    assert r.allowed("/private/open.html")  # the longer Allow beats the shorter Disallow
    assert not r.allowed("/docs/a.pdf")
    assert r.allowed("/docs/a.pdf?x=1")  # '$' anchors the end
    assert not r.allowed("/tmp/x") and not r.allowed("/tmpfile")
    assert r.allowed("/")
    assert r.allowed("/robots.txt")
    assert r.crawl_delay == 2
    tie = RobotsRules.parse("User-agent: *\nDisallow: /a\nAllow: /a\n", "x")
    assert tie.allowed("/a")  # equal length: Allow wins (RFC 9309)


def test_robots_stdlib_first_match_differs() -> None:
    # Why we do not use urllib.robotparser: it applies the first matching rule in file order.
    stdlib = urllib.robotparser.RobotFileParser()
    stdlib.parse(ROBOTS.splitlines())
    assert not stdlib.can_fetch("somebot", "http://h/private/open.html")
    assert RobotsRules.parse(ROBOTS, "somebot").allowed("/private/open.html")


def test_robots_group_selection_and_merging() -> None:
    ours = RobotsRules.parse(ROBOTS, "llmforge-crawler/0.1 (+https://x)")
    assert not ours.allowed("/only-us/x")
    assert not ours.allowed("/also-us/x")  # groups naming the same agent are merged
    assert ours.allowed("/private/secret.html")  # the specific group replaces '*'
    assert ours.crawl_delay == 0.5
    empty = RobotsRules.parse("User-agent: *\nDisallow:\n", "x")
    assert empty.allowed("/anything")
    assert RobotsRules.allow_all().allowed("/x")
    assert not RobotsRules.disallow_all().allowed("/x")
    assert RobotsRules.parse("Disallow: /\n", "x").allowed("/x")  # rules outside any group are ignored


# --------------------------------------------------------------------------------------------------------
# WARC repair
# --------------------------------------------------------------------------------------------------------


def _write_page(sink, url: str, body: bytes):
    return sink.write(
        url=url,
        request_line="GET / HTTP/1.1",
        request_headers=[("Host", "h")],
        http_version="HTTP/1.1",
        status=200,
        reason="OK",
        response_headers=[("Content-Type", "text/html"), ("Content-Encoding", "gzip")],
        body=body,
        payload_type="text/html",
        fetched_at=0.0,
    )


def test_warc_sink_recover_cuts_uncommitted_tail(tmp_path) -> None:
    from warcio.archiveiterator import ArchiveIterator

    from llmforge.data.crawl.warc import WarcSink

    warc_dir, partial = tmp_path / "warc", tmp_path / "warc.partial"
    sink = WarcSink(warc_dir, partial, 10**9, "ua")
    name, committed = _write_page(sink, "http://h/1", b"<html>one</html>")
    _write_page(sink, "http://h/2", b"<html>two</html>")  # written, never committed
    with open(partial / name, "ab") as f:
        f.write(gzip.compress(b"WARC/1.1\r\ntorn"))  # and a torn record after it
    (partial / "crawl-00099.warc.gz").write_bytes(b"stray")

    sink2 = WarcSink(warc_dir, partial, 10**9, "ua")
    assert sink2.recover(name, committed) == []
    assert not (partial / "crawl-00099.warc.gz").exists()
    _write_page(sink2, "http://h/3", b"<html>three</html>")
    sink2.close_current()
    assert list(partial.iterdir()) == []
    with open(warc_dir / name, "rb") as f:
        records = [(r.rec_type, r.rec_headers.get_header("WARC-Target-URI")) for r in ArchiveIterator(f)]
    responses = [u for t, u in records if t == "response"]
    assert responses == ["http://h/1", "http://h/3"]
    assert records[0][0] == "warcinfo"


def test_warc_sink_rotates_by_record_count(tmp_path) -> None:
    from llmforge.data.crawl.warc import WarcSink

    sink = WarcSink(tmp_path / "warc", tmp_path / "p", 10**9, "ua", max_records=2)
    names = []
    for i in range(5):
        name, _ = _write_page(sink, f"http://h/{i}", b"<html>x</html>")
        names.append(name)
        if sink.needs_rotation():
            sink.close_current()
    sink.close_current()
    assert names == ["crawl-00001.warc.gz"] * 2 + ["crawl-00002.warc.gz"] * 2 + ["crawl-00003.warc.gz"]
    assert sorted(p.name for p in (tmp_path / "warc").iterdir()) == sorted(set(names))
    # the byte cap still applies on its own
    big = WarcSink(tmp_path / "w2", tmp_path / "p2", 1, "ua", max_records=100)
    _write_page(big, "http://h/", b"<html>x</html>")
    assert big.needs_rotation()


def test_warc_headers_renamed_for_decoded_payload(tmp_path) -> None:
    from warcio.archiveiterator import ArchiveIterator

    from llmforge.data.crawl.warc import WarcSink

    sink = WarcSink(tmp_path / "warc", tmp_path / "p", 10**9, "ua")
    _write_page(sink, "http://h/", b"<html>x</html>")
    name = sink.close_current()
    with open(tmp_path / "warc" / name, "rb") as f:
        resp = next(r for r in ArchiveIterator(f) if r.rec_type == "response")
        # The stored payload is identity-encoded, so tools must not try to gunzip it.
        assert resp.http_headers.get_header("Content-Encoding") is None
        assert resp.http_headers.get_header("X-Crawler-Content-Encoding") == "gzip"
        assert resp.http_headers.get_header("Content-Length") == "14"
        assert resp.content_stream().read() == b"<html>x</html>"


def test_retry_after_parsing() -> None:
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    from llmforge.data.crawl.engine import _retry_after

    assert _retry_after("3") == 3.0
    assert _retry_after(None) is None
    assert _retry_after("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 < _retry_after(later) <= 30  # type: ignore[operator]


def test_manifest_rejects_bad_regex() -> None:
    from pydantic import ValidationError

    from llmforge.manifest import CrawlSection

    with pytest.raises(ValidationError, match=r"exclude_patterns\[0\].*not a valid regex"):
        CrawlSection(seeds=["http://h/"], exclude_patterns=["("])
