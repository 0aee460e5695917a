"""URLs: normalisation, crawl scope (domains, patterns), link extraction and charset detection.

Normalisation rules (``normalize_url``), chosen so that two spellings of one resource dedup to one key while
two resources a server could tell apart never collapse:

* only ``http``/``https``; scheme and host lowercased; internationalised hosts IDNA-encoded; a trailing dot
  on the host dropped; user-info dropped (a crawler must not replay credentials found in links);
* default ports (80 for http, 443 for https) dropped;
* the fragment dropped (it never reaches the server);
* an empty path becomes ``/``; ``.`` and ``..`` segments resolved (RFC 3986 §5.2.4);
* percent-encoding normalised: escapes of unreserved characters (``A-Z a-z 0-9 - . _ ~``) decoded, other
  escapes upper-cased, characters that may not appear raw (spaces, non-ASCII) encoded as UTF-8;
* the query string is kept in its original order by default: servers may treat ``?a=1&b=2`` and
  ``?b=2&a=1`` differently, so sorting is opt-in (``crawl.sort_query``). An empty ``?`` is dropped.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit, urlunsplit

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters left raw in a path (RFC 3986 pchar plus '/'); everything else outside this set is escaped.
_PATH_SAFE = _UNRESERVED | frozenset("!$&'()*+,;=:@/")
_QUERY_SAFE = _PATH_SAFE | frozenset("?")
_HEX = frozenset("0123456789abcdefABCDEF")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _normalize_escapes(text: str, safe: frozenset[str]) -> str:
    """Decode escapes of unreserved characters, upper-case the others, escape what may not appear raw."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "%" and i + 2 < n and text[i + 1] in _HEX and text[i + 2] in _HEX:
            byte = int(text[i + 1 : i + 3], 16)
            decoded = chr(byte)
            out.append(decoded if decoded in _UNRESERVED else f"%{byte:02X}")
            i += 3
            continue
        if ch in safe:
            out.append(ch)
        else:
            # A lone '%' (not followed by two hex digits) is data, so it is escaped too.
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
        i += 1
    return "".join(out)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4: resolve ``.`` and ``..`` segments (``/a/./b/../c`` → ``/a/c``)."""
    if "." not in path:
        return path
    out: list[str] = []
    segments = path.split("/")
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
            continue
        if seg == "..":
            if len(out) > 1:
                out.pop()
            if last:
                out.append("")
            continue
        out.append(seg)
    result = "/".join(out)
    if path.startswith("/") and not result.startswith("/"):
        result = "/" + result
    return result


def _normalize_host(host: str) -> str | None:
    host = host.rstrip(".").lower()
    if not host:
        return None
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return None


def normalize_url(url: str, base: str | None = None, *, sort_query: bool = False) -> str | None:
    """The canonical form of ``url`` (resolved against ``base``), or None if it is not a crawlable URL."""
    url = url.strip()
    if not url:
        return None
    try:
        if base is not None:
            url = urljoin(base, url)
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            return None
        raw_host = parts.hostname
        port = parts.port  # raises ValueError on a malformed port
    except ValueError:
        return None
    if not raw_host:
        return None
    host = _normalize_host(raw_host)
    if host is None:
        return None
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    path = remove_dot_segments(_normalize_escapes(parts.path, _PATH_SAFE)) or "/"
    if not path.startswith("/"):
        path = "/" + path
    query = _normalize_escapes(parts.query, _QUERY_SAFE)
    if sort_query and query:
        query = "&".join(sorted(query.split("&")))
    return urlunsplit((scheme, netloc, path, query, ""))


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a normalised URL: the unit robots.txt applies to."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def host_of(url: str) -> str:
    """Hostname of a normalised URL (no port): the unit politeness limits apply to."""
    return urlsplit(url).hostname or ""


def path_and_query(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


class UrlScope:
    """Which discovered URLs the crawl may fetch: allowed domains and include/exclude regexes.

    Seeds are fetched whatever the scope says (they were asked for by name). URLs at depth 0 — seeds and
    the targets they redirect to — are exempt from include/exclude patterns, so that ``include_patterns:
    ['/blog/']`` with the seed ``https://site/`` still discovers the blog; the domain rule still applies
    to them, so a seed that redirects off-site does not drag the crawl with it.
    """

    def __init__(
        self,
        seeds: Iterable[str],
        allowed_domains: Iterable[str] = (),
        include: Iterable[str] = (),
        exclude: Iterable[str] = (),
    ):
        domains = [d.strip().lower().lstrip(".").rstrip(".") for d in allowed_domains if d.strip()]
        if not domains:
            domains = [host_of(s) for s in seeds if host_of(s)]
        self.domains = tuple(dict.fromkeys(domains))
        self.include = [re.compile(p) for p in include]
        self.exclude = [re.compile(p) for p in exclude]

    def domain_allowed(self, url: str) -> bool:
        host = host_of(url)
        return any(host == d or host.endswith("." + d) for d in self.domains)

    def rejects(self, url: str, depth: int) -> str | None:
        """Why ``url`` is out of scope (``off_domain`` / ``excluded`` / ``not_included``), or None."""
        if not self.domain_allowed(url):
            return "off_domain"
        if depth == 0:
            return None
        if any(p.search(url) for p in self.exclude):
            return "excluded"
        if self.include and not any(p.search(url) for p in self.include):
            return "not_included"
        return None


# ------------------------------------------------------------------------------------------------------
# HTML: content type, charset, links
# ------------------------------------------------------------------------------------------------------

HTML_TYPES = ("text/html", "application/xhtml+xml")


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def looks_like_html(head: bytes) -> bool:
    """Sniff a body that came without a Content-Type (WHATWG-style: leading markup of an HTML document)."""
    start = head[:1024].lstrip().lower()
    if start.startswith(codecs.BOM_UTF8):
        start = start[len(codecs.BOM_UTF8) :].lstrip()
    return start.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<!--", b"<title", b"<meta"))


_HEADER_CHARSET = re.compile(r"charset\s*=\s*[\"']?([A-Za-z0-9._:-]+)", re.I)
_META_CHARSET = re.compile(rb"<meta[^>]+charset\s*=\s*[\"']?\s*([A-Za-z0-9._:-]+)", re.I)


def _valid_codec(name: str | bytes | None) -> str | None:
    if not name:
        return None
    if isinstance(name, bytes):
        name = name.decode("ascii", "ignore")
    try:
        found = codecs.lookup(name).name
    except LookupError:
        return None
    # WHATWG Encoding Standard: pages labelled latin-1 or ascii are decoded as windows-1252 by every
    # browser, and authors write them that way (curly quotes in 0x80-0x9F).
    return "cp1252" if found in ("iso8859-1", "ascii") else found


def detect_charset(body: bytes, content_type: str | None) -> str:
    """Encoding to decode a page with: BOM, then the header's charset, then ``<meta charset>``, else UTF-8."""
    if body.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if body.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    m = _HEADER_CHARSET.search(content_type or "")
    found = _valid_codec(m.group(1)) if m else None
    if found is None:
        m2 = _META_CHARSET.search(body[:4096])
        found = _valid_codec(m2.group(1)) if m2 else None
    return found or "utf-8"


def decode_html(body: bytes, content_type: str | None) -> str:
    """Text of a page for link extraction only; the WARC keeps the raw bytes."""
    return body.decode(detect_charset(body, content_type), errors="replace")


class _LinkParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []
        self.base: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("a", "area"):
            for name, value in attrs:
                if name == "href" and value:
                    self.hrefs.append(value)
        elif tag == "base" and self.base is None:
            for name, value in attrs:
                if name == "href" and value:
                    self.base = value


def extract_links(html: str, page_url: str, *, sort_query: bool = False) -> list[str]:
    """Normalised absolute http(s) links of ``<a>``/``<area>`` in ``html``, in document order, deduplicated."""
    parser = _LinkParser()
    try:
        parser.feed(html)
        parser.close()
    except (AssertionError, ValueError):  # HTMLParser is lenient, but malformed markup can still trip it
        pass
    base = urljoin(page_url, parser.base) if parser.base else page_url
    out: dict[str, None] = {}
    for href in parser.hrefs:
        url = normalize_url(href, base, sort_query=sort_query)
        if url is not None:
            out[url] = None
    return list(out)
