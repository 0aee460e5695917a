"""The crawl engine: one scheduler over per-origin queues, politeness per host, one task per request chain.

How a URL travels:

1. It enters the frontier (``state.py``, SQLite) when it is a seed or a link/redirect target in scope and
   not seen before (seen = every normalised URL ever enqueued).
2. The scheduler (``_dispatch``) walks origins with queued URLs. An origin first gets its robots.txt
   (one task); then each queued URL is either decided without a request (robots-disallowed, host
   unreachable) or launched as a fetch task when the global concurrency, the host's concurrency, its
   minimum interval (max of ``per_host_delay_s`` and Crawl-delay) and the ``max_pages`` budget allow.
   Deciding *at dispatch* rather than in a worker pool keeps one slow host from holding every worker.
3. A fetch task sends the GET (redirects are *not* followed by httpx), retries transient failures
   (timeouts, connection resets, 429, 5xx) with exponential backoff + jitter, honouring ``Retry-After``,
   and ends in one outcome: ``stored`` (HTML page → WARC), ``redirect`` (the target is enqueued as a new
   URL at the same depth, so every hop gets the scope, robots, politeness and dedup checks a link gets),
   ``skipped`` or ``failed``, each with a reason. Every request is a line in ``fetches.jsonl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import json
import random
import socket
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from ... import console
from ...errors import DataError, UserInputError
from ...manifest.crawl import CrawlSection
from . import local_site as site
from .robots import MAX_ROBOTS_BYTES, RobotsRules
from .state import CrawlState, FetchLog, Item, remove_state
from .urls import (
    HTML_TYPES,
    UrlScope,
    decode_html,
    extract_links,
    host_of,
    looks_like_html,
    media_type,
    normalize_url,
    origin_of,
    path_and_query,
)
from .warc import WarcSink

log = console.get_logger(__name__)

STATE_DB = "crawl_state.sqlite"
FETCH_LOG = "fetches.jsonl"
WARC_DIR = "warc"
PARTIAL_DIR = "warc.partial"

# A server may ask for any Retry-After; waiting longer than this inside one crawl is not useful.
MAX_RETRY_AFTER_S = 60.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

_REASON_TEXT = {
    "dns": "host name does not resolve",
    "connect": "connection failed",
    "timeout": "timed out",
    "network": "connection broke off",
    "robots": "disallowed by robots.txt",
    "robots_unreachable": "robots.txt answered 5xx/429, so RFC 9309 says crawl nothing there",
    "content_type": "not HTML",
    "too_large": "larger than crawl.max_page_bytes",
    "redirect_loop": "redirect loop",
    "too_many_redirects": "more redirects than crawl.max_redirects",
    "redirect_off_domain": "redirects outside the allowed domains",
}


def reason_text(reason: str | None) -> str:
    if reason is None:
        return "unknown"
    if reason.startswith("http_"):
        return f"HTTP {reason[5:]}"
    return _REASON_TEXT.get(reason, reason)


# --------------------------------------------------------------------------------------------------------
# Small records
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Slot:
    """Politeness for one host name: requests in flight and the earliest time of the next request."""

    delay: float
    limit: int  # requests in flight allowed (crawl.per_host_concurrency; 1 for crawl.local_site)
    active: int = 0
    next_time: float = 0.0

    def reserve(self, now: float) -> float:
        """Claim the next request time on this host; returns how long to wait for it."""
        start = max(now, self.next_time)
        self.next_time = start + self.delay
        return start - now


@dataclass
class _Origin:
    """``scheme://host:port``: the unit robots.txt applies to, with its queue of frontier items."""

    origin: str
    slot: _Slot
    queue: deque[Item] = field(default_factory=deque)
    robots: RobotsRules | None = None
    robots_loading: bool = False
    disallow_reason: str = "robots"
    failed: str | None = None  # set when the origin cannot be reached at all (e.g. DNS)


@dataclass
class _Attempt:
    """What one HTTP request produced."""

    kind: str  # page | redirect | http_error | skip | error
    url: str
    reason: str | None = None
    status: int | None = None
    content_type: str | None = None
    body: bytes = b""
    nbytes: int = 0
    location: str | None = None
    transient: bool = False
    retry_after: float | None = None
    ms: float = 0.0
    fetched_at: float = 0.0
    http_version: str = "HTTP/1.1"
    reason_phrase: str = ""
    request_line: str = ""
    request_headers: list[tuple[str, str]] = field(default_factory=list)
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    final_url: str | None = None
    error: str | None = None  # transport error text, for the fetch log


@dataclass
class CrawlReport:
    """What a crawl did (totals across resumed runs unless the name says ``this_run``)."""

    out_dir: Path
    warc_dir: Path
    fetch_log: Path
    pages_stored: int
    pages_stored_this_run: int
    requests_this_run: int
    responses_this_run: int
    bytes_stored_this_run: int
    elapsed_s: float
    outcomes: dict[str, dict[str, int]]  # outcome -> reason -> URLs
    links_filtered_this_run: dict[str, int]
    frontier_left: int
    seeds_failed: list[tuple[str, str]]
    warc_files: list[str]
    resumed: bool

    @property
    def pages_per_s(self) -> float:
        return self.pages_stored_this_run / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def metrics(self) -> dict[str, Any]:
        skipped = self.outcomes.get("skipped", {})
        failed = self.outcomes.get("failed", {})
        return {
            "pages_stored": self.pages_stored,
            "pages_stored_this_run": self.pages_stored_this_run,
            "requests": self.requests_this_run,
            "responses": self.responses_this_run,
            "bytes_stored": self.bytes_stored_this_run,
            "pages_per_s": round(self.pages_per_s, 2),
            "elapsed_s": round(self.elapsed_s, 3),
            "redirects": sum(self.outcomes.get("redirect", {}).values()),
            "skipped": sum(skipped.values()),
            "skipped_by_reason": dict(skipped),
            "errors": sum(failed.values()),
            "errors_by_reason": dict(failed),
            "robots_disallowed": skipped.get("robots", 0) + skipped.get("robots_unreachable", 0),
            "links_filtered": dict(self.links_filtered_this_run),
            "frontier_left": self.frontier_left,
            "seeds_failed": len(self.seeds_failed),
            "warc_files": len(self.warc_files),
            "resumed": self.resumed,
        }


# --------------------------------------------------------------------------------------------------------
# The crawler
# --------------------------------------------------------------------------------------------------------


def _gaierror_in_chain(exc: BaseException) -> bool:
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 10:
        if isinstance(cur, socket.gaierror):
            return True
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return False


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    # Header bytes are latin-1 by HTTP's definition; keep them as sent.
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]


def scope_key(cfg: CrawlSection, seeds: list[str], site_digest: str | None = None) -> str:
    """Hash of the settings that decide *which* URLs a crawl contains; a change means a fresh crawl.

    ``site_digest`` (the content of ``crawl.local_site``) joins it when set: an edited local site is crawled
    afresh, not resumed with its old pages.
    """
    parts: dict[str, Any] = {
        "seeds": sorted(seeds),
        "allowed_domains": sorted(cfg.allowed_domains),
        "include": cfg.include_patterns,
        "exclude": cfg.exclude_patterns,
        "max_depth": cfg.max_depth,
        "user_agent": cfg.user_agent,
        "respect_robots": cfg.respect_robots,
        "sort_query": cfg.sort_query,
    }
    if site_digest is not None:
        parts["local_site"] = site_digest
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class Crawler:
    """Runs one crawl (or resumes it) into ``out_dir``. Use ``crawl()`` rather than this class directly."""

    def __init__(self, cfg: CrawlSection, out_dir: Path, local_site: Path | None = None):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        if local_site is None and cfg.local_site:
            local_site = Path(cfg.local_site)
        self.site_dir = site.check_site_dir(local_site) if local_site is not None else None
        self.seeds = self._normalize_seeds(cfg, local=self.site_dir is not None)
        domains = list(cfg.allowed_domains)
        if self.site_dir is not None and domains:
            domains.append(site.LOCAL_HOST)  # the local site is always in scope
        self.scope = UrlScope(self.seeds, domains, cfg.include_patterns, cfg.exclude_patterns)
        self._origins: dict[str, _Origin] = {}
        self._slots: dict[str, _Slot] = {}
        self._pending: dict[str, _Origin] = {}  # origins with queued items, in arrival order
        self._tasks: set[asyncio.Task[None]] = set()
        self._pages_in_flight = 0
        self._stored_total = 0
        self._stored_run = 0
        self._requests = 0
        self._responses = 0
        self._bytes = 0
        self._filtered: Counter[str] = Counter()
        self._errors_run = 0
        self._bar: console.Progress | None = None
        self._client: httpx.AsyncClient | None = None

    @staticmethod
    def _normalize_seeds(cfg: CrawlSection, local: bool = False) -> list[str]:
        seeds: list[str] = []
        given = cfg.seeds or (["/"] if local else [])
        for i, s in enumerate(given):
            if local and not s.startswith(("http://", "https://")):
                s = site.site_url(s)  # a path inside crawl.local_site
            url = normalize_url(s, sort_query=cfg.sort_query)
            if url is None:
                raise UserInputError(f"crawl.seeds[{i}]: {s!r} is not a crawlable http(s) URL")
            seeds.append(url)
        if not seeds:
            raise UserInputError("crawl.seeds is empty: add at least one start URL to llmforge.yaml")
        return list(dict.fromkeys(seeds))

    # -- setup / resume ----------------------------------------------------------------------------------
    def _open_state(self) -> tuple[CrawlState, bool]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        digest = site.site_digest(self.site_dir) if self.site_dir is not None else None
        key = scope_key(self.cfg, self.seeds, digest)
        state = CrawlState(self.out_dir / STATE_DB)
        saved = state.get_meta("scope")
        if saved == key:
            return state, True
        if saved is not None:
            log.warning(
                "crawl: seeds/domains/patterns/depth/user agent (or the local site's files) changed since the "
                "last crawl in %s; starting a fresh crawl (the old WARC files are replaced)",
                self.out_dir,
            )
        state.close()
        # No state for this scope: anything left in the folder belongs to another crawl.
        remove_state(self.out_dir, [STATE_DB, FETCH_LOG, WARC_DIR, PARTIAL_DIR])
        state = CrawlState(self.out_dir / STATE_DB)
        state.set_meta(scope=key, warc_open=None, warc_offset=0)
        return state, False

    def _origin(self, url: str) -> _Origin:
        key = origin_of(url)
        o = self._origins.get(key)
        if o is None:
            host = host_of(url)
            slot = self._slots.get(host)
            if slot is None:
                local = self.site_dir is not None and host == site.LOCAL_HOST
                limit = site.LOCAL_CONCURRENCY if local else self.cfg.per_host_concurrency
                slot = self._slots[host] = _Slot(delay=self.cfg.per_host_delay_s, limit=limit)
            o = self._origins[key] = _Origin(key, slot)
            if not self.cfg.respect_robots:
                o.robots = RobotsRules.allow_all()
        return o

    def _enqueue(self, items: list[Item]) -> None:
        for it in items:
            o = self._origin(it.url)
            o.queue.append(it)
            self._pending.setdefault(o.origin, o)

    # -- main --------------------------------------------------------------------------------------------
    def run(self) -> CrawlReport:
        return asyncio.run(self._main())

    async def _main(self) -> CrawlReport:
        t0 = time.monotonic()
        state, resumed = self._open_state()
        self.state = state
        self.fetch_log = FetchLog(self.out_dir / FETCH_LOG)
        try:
            self.sink = WarcSink(
                self.out_dir / WARC_DIR,
                self.out_dir / PARTIAL_DIR,
                self.cfg.warc_max_bytes,
                self.cfg.user_agent,
                max_records=self.cfg.warc_max_records,
                reproducible=self.site_dir is not None,
                info_date=site.SITE_DATE if self.site_dir is not None else None,
            )
            lost = self.sink.recover(state.get_meta("warc_open"), state.get_meta("warc_offset", 0))
            for name in lost:
                state.requeue(state.stored_in(name))
            if self.sink.name is not None:  # reopened after a kill: it already holds these pages
                self.sink.records = len(state.stored_in(self.sink.name))
            if self.sink.name is None:
                state.set_meta(warc_open=None, warc_offset=0)
            state.add(Item(s, 0) for s in self.seeds)
            self._stored_total = state.count_stored()
            pending = state.pending()
            if resumed:
                log.info(
                    "crawl: resuming in %s: %d pages stored, %d URLs in the frontier",
                    self.out_dir,
                    self._stored_total,
                    len(pending),
                )
            self._enqueue(pending)
            if self.site_dir is None:
                await self._crawl()
            else:
                with site.LocalSite(self.site_dir) as served:
                    log.info(
                        "crawl: serving %s as %s/ on 127.0.0.1:%d",
                        self.site_dir,
                        site.LOCAL_BASE,
                        served.port,
                    )
                    await self._crawl({f"all://{site.LOCAL_HOST}": served.transport()})
            closed = self.sink.close_current()
            if closed is not None:
                state.set_meta(warc_open=None, warc_offset=0)
            with contextlib.suppress(OSError):  # only an empty warc.partial/ goes: nothing is in progress
                (self.out_dir / PARTIAL_DIR).rmdir()
            return self._report(time.monotonic() - t0, resumed)
        finally:
            self.fetch_log.close()
            state.close()

    async def _crawl(self, mounts: dict[str, httpx.AsyncBaseTransport] | None = None) -> None:
        cfg = self.cfg
        limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
        headers = {
            "User-Agent": cfg.user_agent,
            "Accept": "text/html,application/xhtml+xml;q=0.9,*/*;q=0.1",
        }
        async with httpx.AsyncClient(
            http1=True,
            http2=False,
            follow_redirects=False,  # every hop is checked (scope, robots, loops) by the scheduler
            timeout=httpx.Timeout(cfg.timeout_s),
            limits=limits,
            headers=headers,
            mounts=mounts,  # crawl.local_site: its host goes to the loopback server
        ) as client:
            self._client = client
            with console.progress("crawl", total=cfg.max_pages, unit="pages") as bar:
                bar.update(completed=self._stored_total)
                self._bar = bar
                try:
                    await self._schedule()
                finally:
                    for t in self._tasks:
                        t.cancel()
                    if self._tasks:
                        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _budget_left(self) -> int:
        return self.cfg.max_pages - self._stored_total - self._pages_in_flight

    async def _schedule(self) -> None:
        while True:
            self._dispatch()
            if not self._tasks and (not self._pending or self._budget_left() <= 0):
                return
            timeout = self._next_ready_in()
            if self._tasks:
                done, _ = await asyncio.wait(
                    self._tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                for t in done:
                    self._tasks.discard(t)
                    t.result()  # tasks raise only on fatal trouble (disk full) or a bug: let it surface
            elif timeout is not None:
                await asyncio.sleep(timeout)
            else:  # pragma: no cover - pending work that nothing can ever make ready would be a bug
                raise RuntimeError("crawl scheduler stalled with queued URLs and nothing in flight")

    def _next_ready_in(self) -> float | None:
        """Seconds until some host with queued work may be contacted again (None: wait for a task)."""
        if len(self._tasks) >= self.cfg.concurrency or self._budget_left() <= 0:
            return None  # only a finishing task can unblock the scheduler: no timed polling
        now = time.monotonic()
        best: float | None = None
        for o in self._pending.values():
            if o.slot.active >= o.slot.limit or o.robots_loading:
                continue
            wait = max(o.slot.next_time - now, 0.001)
            best = wait if best is None else min(best, wait)
        return best

    def _launch(self, o: _Origin, coro: Any) -> None:
        o.slot.active += 1
        o.slot.reserve(time.monotonic())
        self._tasks.add(asyncio.create_task(coro))

    def _dispatch(self) -> None:
        now = time.monotonic()
        cfg = self.cfg
        for key, o in list(self._pending.items()):
            while o.queue:
                if len(self._tasks) >= cfg.concurrency:
                    return
                slot_free = o.slot.active < o.slot.limit and o.slot.next_time <= now
                if o.robots is None and o.failed is None:
                    if not o.robots_loading and slot_free:
                        o.robots_loading = True
                        self._launch(o, self._load_robots(o))
                    break
                item = o.queue[0]
                instant = self._decide_without_request(o, item)
                if instant is not None:
                    o.queue.popleft()
                    self._finish(item, instant[0], instant[1], attempt=0)
                    continue
                if self._budget_left() <= 0:
                    return
                if not slot_free:
                    break
                o.queue.popleft()
                self._pages_in_flight += 1
                self._launch(o, self._fetch(o, item))
                now = time.monotonic()
                slot_free = o.slot.active < o.slot.limit and o.slot.next_time <= now
            if not o.queue:
                self._pending.pop(key, None)

    def _decide_without_request(self, o: _Origin, item: Item) -> tuple[str, str] | None:
        if o.failed is not None:
            return "failed", o.failed
        if item.depth > self.cfg.max_depth:
            return "skipped", "max_depth"
        assert o.robots is not None
        if not o.robots.allowed(path_and_query(item.url)):
            return "skipped", o.disallow_reason
        return None

    # -- requests ----------------------------------------------------------------------------------------
    async def _wait_turn(self, slot: _Slot) -> None:
        wait = slot.reserve(time.monotonic())
        if wait > 0:
            await asyncio.sleep(wait)

    def _backoff(self, retry: int, retry_after: float | None) -> float:
        delay = self.cfg.backoff_s * (2 ** (retry - 1)) * random.uniform(0.5, 1.5)
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
        return delay

    async def _with_retries(self, o: _Origin, url: str, *, robots: bool) -> tuple[_Attempt, int]:
        attempt = 1
        while True:
            a = await self._attempt(url, o.slot, robots=robots)
            if not a.transient or attempt > self.cfg.retries:
                return a, attempt
            self._log(url, a, "retry", a.reason, attempt, kind="robots" if robots else "page")
            await asyncio.sleep(self._backoff(attempt, a.retry_after))
            await self._wait_turn(o.slot)
            attempt += 1

    async def _attempt(self, url: str, slot: _Slot, *, robots: bool = False) -> _Attempt:
        assert self._client is not None
        cfg = self.cfg
        self._requests += 1
        t0 = time.monotonic()
        # The slot was reserved when the task was scheduled, but a busy event loop can start the task a
        # few ms late; counting the interval from the real send time keeps requests >= delay apart.
        slot.next_time = max(slot.next_time, t0 + slot.delay)
        a = _Attempt(kind="error", url=url, fetched_at=time.time())
        try:
            request = self._client.build_request("GET", url)
            a.request_line = f"GET {request.url.raw_path.decode('ascii')} HTTP/1.1"
            a.request_headers = _headers(request.headers.raw)
            # asyncio.timeout bounds the whole exchange: httpx's timeout is per read, so a server that
            # trickles bytes would otherwise hold the request open forever.
            async with asyncio.timeout(cfg.timeout_s):
                resp = await self._client.send(request, stream=True, follow_redirects=robots)
                try:
                    self._responses += 1
                    self._read_head(a, resp)
                    if robots:
                        await self._read_body(a, resp, MAX_ROBOTS_BYTES, truncate=True)
                        a.kind = "page" if 200 <= a.status < 300 else "http_error"  # type: ignore[operator]
                        a.transient = a.status == 429 or a.status >= 500  # type: ignore[operator]
                        return a
                    await self._classify(a, resp)
                finally:
                    await resp.aclose()
        except TimeoutError:
            a.kind, a.reason, a.transient = "error", "timeout", True
        except httpx.TimeoutException:
            a.kind, a.reason, a.transient = "error", "timeout", True
        except httpx.ConnectError as err:
            # An unresolvable host name will not resolve on a retry a second later; other connect
            # failures (refused, reset) may be a restarting server.
            dns = _gaierror_in_chain(err)
            a.kind, a.reason, a.transient = "error", "dns" if dns else "connect", not dns
            a.error = str(err)[:200] or None
        except httpx.TooManyRedirects:
            a.kind, a.reason = "error", "too_many_redirects"
        except (httpx.InvalidURL, httpx.UnsupportedProtocol):
            a.kind, a.reason = "error", "invalid_url"
        except httpx.TransportError:
            a.kind, a.reason, a.transient = "error", "network", True
        except httpx.DecodingError:
            a.kind, a.reason = "error", "bad_content_encoding"
        finally:
            a.ms = (time.monotonic() - t0) * 1000
        return a

    @staticmethod
    def _read_head(a: _Attempt, resp: httpx.Response) -> None:
        a.status = resp.status_code
        a.content_type = resp.headers.get("content-type")
        a.http_version = resp.http_version or "HTTP/1.1"
        a.reason_phrase = resp.reason_phrase
        a.response_headers = _headers(resp.headers.raw)
        a.final_url = str(resp.url)

    async def _read_body(
        self, a: _Attempt, resp: httpx.Response, cap: int, *, truncate: bool = False
    ) -> bool:
        """Stream the body up to ``cap`` bytes; False (and no body) if it is larger and not ``truncate``."""
        declared = resp.headers.get("content-length", "")
        if not truncate and declared.isdigit() and int(declared) > cap:
            a.nbytes = int(declared)
            return False
        body = bytearray()
        async for chunk in resp.aiter_bytes():
            body += chunk
            if len(body) > cap:
                a.nbytes = len(body)
                if truncate:
                    a.body = bytes(body[:cap])
                    return True
                return False  # stop reading: a huge page never sits in memory whole
        a.body = bytes(body)
        a.nbytes = len(body)
        return True

    async def _classify(self, a: _Attempt, resp: httpx.Response) -> None:
        status = resp.status_code
        if status in _REDIRECTS:
            a.location = resp.headers.get("location")
            a.kind = "redirect" if a.location else "http_error"
            a.reason = None if a.location else "redirect_without_location"
            return
        if status == 429 or status >= 500:
            a.kind, a.reason, a.transient = "http_error", f"http_{status}", True
            a.retry_after = _retry_after(resp.headers.get("retry-after"))
            return
        if not 200 <= status < 300:
            a.kind, a.reason = "http_error", f"http_{status}"  # 4xx: the answer will not change on retry
            return
        mtype = media_type(a.content_type)
        if mtype and mtype not in HTML_TYPES:
            a.kind, a.reason = "skip", "content_type"
            return
        if not await self._read_body(a, resp, self.cfg.max_page_bytes):
            a.kind, a.reason, a.body = "skip", "too_large", b""
            return
        if not mtype and not looks_like_html(a.body):
            a.kind, a.reason, a.body = "skip", "content_type", b""
            return
        a.kind = "page"

    def _log(
        self,
        url: str,
        a: _Attempt | None,
        outcome: str,
        reason: str | None,
        attempt: int,
        *,
        kind: str,
        depth: int | None = None,
        final_url: str | None = None,
    ) -> None:
        """One fetch-log line. ``attempt`` 0 means the URL was decided without a request."""
        entry: dict[str, Any] = {
            "url": url,
            "final_url": final_url or (a.final_url if a and a.final_url else url),
            "status": a.status if a else None,
            "content_type": a.content_type if a else None,
            "bytes": a.nbytes if a else 0,
            "ms": round(a.ms, 1) if a else 0.0,
            "outcome": outcome,
            "reason": reason,
            "attempt": attempt,
            "kind": kind,
        }
        if a is not None:
            entry["started"] = round(a.fetched_at, 4)  # wall-clock start of the request
        if depth is not None:
            entry["depth"] = depth
        if a is not None and a.error:
            entry["error"] = a.error
        self.fetch_log.write(**entry)

    # -- task bodies -------------------------------------------------------------------------------------
    async def _load_robots(self, o: _Origin) -> None:
        try:
            url = o.origin + "/robots.txt"
            a, attempt = await self._with_retries(o, url, robots=True)
            outcome, reason = "ok", None
            if a.kind == "error" and a.reason in ("dns", "connect", "timeout", "network"):
                # The host cannot be reached: every URL on it would fail the same way.
                o.failed = a.reason
                outcome, reason = "failed", a.reason
            elif a.kind == "page":
                text = decode_html(a.body, a.content_type)
                o.robots = RobotsRules.parse(text, self.cfg.user_agent)
            elif a.status is not None and (a.status == 429 or a.status >= 500):
                o.robots = RobotsRules.disallow_all()
                o.disallow_reason = "robots_unreachable"
                outcome, reason = "failed", "robots_unreachable"
                log.warning("crawl: %s answered %s; not crawling that site (RFC 9309)", url, a.status)
            else:  # 4xx, redirect trouble, bad URL: robots.txt is "unavailable" → everything allowed
                o.robots = RobotsRules.allow_all()
                reason = a.reason
            if o.robots is not None and o.robots.crawl_delay:
                o.slot.delay = max(o.slot.delay, o.robots.crawl_delay)
                # The robots.txt request itself was spaced with the manifest delay only; the first page
                # request must keep the site's Crawl-delay from it.
                o.slot.next_time = max(o.slot.next_time, time.monotonic() + o.slot.delay)
            self._log(url, a, outcome, reason, attempt, kind="robots")
        finally:
            o.robots_loading = False
            o.slot.active -= 1

    async def _fetch(self, o: _Origin, item: Item) -> None:
        try:
            a, attempt = await self._with_retries(o, item.url, robots=False)
            self._handle(item, a, attempt)
        finally:
            o.slot.active -= 1
            self._pages_in_flight -= 1

    def _handle(self, item: Item, a: _Attempt, attempt: int) -> None:
        if a.kind == "page":
            self._store(item, a, attempt)
        elif a.kind == "redirect":
            self._redirect(item, a, attempt)
        elif a.kind == "skip":
            self._finish(item, "skipped", a.reason, attempt=attempt, a=a)
        else:
            self._finish(item, "failed", a.reason, attempt=attempt, a=a)

    def _redirect(self, item: Item, a: _Attempt, attempt: int) -> None:
        assert a.location is not None
        target = normalize_url(a.location, item.url, sort_query=self.cfg.sort_query)
        if target is None:
            self._finish(item, "failed", "bad_redirect", attempt=attempt, a=a, final_url=a.location)
            return
        if target == item.url or target in item.chain:
            self._finish(item, "failed", "redirect_loop", attempt=attempt, a=a, final_url=target)
            return
        if item.redirects + 1 > self.cfg.max_redirects:
            self._finish(item, "failed", "too_many_redirects", attempt=attempt, a=a, final_url=target)
            return
        rejected = self.scope.rejects(target, item.depth)
        if rejected is not None:
            self._finish(item, "skipped", f"redirect_{rejected}", attempt=attempt, a=a, final_url=target)
            return
        nxt = Item(target, item.depth, (*item.chain, item.url))
        reason = None if target not in self.state.seen else "target_seen"
        self._finish(item, "redirect", reason, attempt=attempt, a=a, final_url=target, new_items=[nxt])

    def _store(self, item: Item, a: _Attempt, attempt: int) -> None:
        new: list[Item] = []
        if item.depth < self.cfg.max_depth:
            html = decode_html(a.body, a.content_type)
            for link in extract_links(html, item.url, sort_query=self.cfg.sort_query):
                if link in self.state.seen:
                    continue
                rejected = self.scope.rejects(link, item.depth + 1)
                if rejected is not None:
                    self._filtered[rejected] += 1
                    continue
                new.append(Item(link, item.depth + 1))
        mtype = media_type(a.content_type) or "text/html"
        try:
            name, offset = self._write_warc(item, a, mtype)
        except OSError as err:
            raise DataError(
                f"{self.sink.partial_dir}: cannot write the WARC file ({err}); free disk space or fix "
                f"permissions, then re-run: the crawl resumes where it stopped"
            ) from err
        self._stored_total += 1
        self._stored_run += 1
        self._bytes += len(a.body)
        self._finish(
            item,
            "stored",
            None,
            attempt=attempt,
            a=a,
            warc=name,
            new_items=new,
            meta={"warc_open": name, "warc_offset": offset},
        )
        if self.sink.needs_rotation():
            self.sink.close_current()
            self.state.set_meta(warc_open=None, warc_offset=0)

    def _write_warc(self, item: Item, a: _Attempt, mtype: str) -> tuple[str, int]:
        return self.sink.write(
            url=item.url,
            request_line=a.request_line,
            request_headers=a.request_headers,
            http_version=a.http_version,
            status=a.status or 200,
            reason=a.reason_phrase,
            response_headers=a.response_headers,
            body=a.body,
            payload_type=mtype,
            # A local site's pages get a fixed capture time, so its WARC files are reproducible byte for byte.
            fetched_at=site.SITE_DATE
            if self.site_dir is not None and site.is_local(item.url)
            else a.fetched_at,
        )

    def _finish(
        self,
        item: Item,
        outcome: str,
        reason: str | None,
        *,
        attempt: int,
        a: _Attempt | None = None,
        final_url: str | None = None,
        warc: str | None = None,
        new_items: list[Item] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Record the URL's outcome (state + fetch log) and enqueue what it led to."""
        added = self.state.finish(item.url, outcome, reason, warc=warc, new_items=new_items or (), meta=meta)
        self._enqueue(added)
        self._log(item.url, a, outcome, reason, attempt, kind="page", depth=item.depth, final_url=final_url)
        if outcome == "failed":
            self._errors_run += 1
        if item.depth == 0 and not item.chain and outcome in ("failed", "skipped"):
            log.warning("crawl: seed %s skipped: %s", item.url, reason_text(reason))
        if self._bar is not None:
            if outcome == "stored":
                self._bar.advance(1, requests=self._requests, errors=self._errors_run)
            else:
                self._bar.update(requests=self._requests, errors=self._errors_run)

    # -- report ------------------------------------------------------------------------------------------
    def _report(self, elapsed: float, resumed: bool) -> CrawlReport:
        outcomes: dict[str, dict[str, int]] = {}
        for (outcome, reason), n in sorted(self.state.outcome_counts().items(), key=lambda kv: -kv[1]):
            outcomes.setdefault(outcome, {})[reason or outcome] = n
        seeds_failed = []
        for s in self.seeds:
            res = self.state.outcome_of(s)
            if res is not None and res[0] in ("failed", "skipped"):
                seeds_failed.append((s, res[1] or "unknown"))
        warc_dir = self.out_dir / WARC_DIR
        report = CrawlReport(
            out_dir=self.out_dir,
            warc_dir=warc_dir,
            fetch_log=self.out_dir / FETCH_LOG,
            pages_stored=self.state.count_stored(),
            pages_stored_this_run=self._stored_run,
            requests_this_run=self._requests,
            responses_this_run=self._responses,
            bytes_stored_this_run=self._bytes,
            elapsed_s=elapsed,
            outcomes=outcomes,
            links_filtered_this_run=dict(self._filtered),
            frontier_left=self.state.count_pending(),
            seeds_failed=seeds_failed,
            warc_files=sorted(p.name for p in warc_dir.glob("*.warc.gz")),
            resumed=resumed,
        )
        if report.pages_stored == 0:
            raise DataError(self._why_nothing(report))
        return report

    def _why_nothing(self, report: CrawlReport) -> str:
        where = f"every request is listed in {report.fetch_log}"
        flat = {r: n for reasons in report.outcomes.values() for r, n in reasons.items()}
        total = sum(flat.values())
        robots = flat.get("robots", 0) + flat.get("robots_unreachable", 0)
        if total and robots == total:
            return (
                f"the crawl stored no pages: all {total} URLs were disallowed by robots.txt for user agent "
                f"{self.cfg.user_agent!r}. Pick seeds the site allows (set crawl.respect_robots=false only "
                f"for sites you have permission to crawl); {where}"
            )
        if report.seeds_failed and len(report.seeds_failed) == len(self.seeds):
            detail = "; ".join(f"{u} ({reason_text(r)})" for u, r in report.seeds_failed)
            unreachable = all(r in ("dns", "connect", "timeout", "network") for _, r in report.seeds_failed)
            hint = (
                "Check that crawl.seeds are spelled right and reachable from this machine"
                if unreachable
                else "Use seeds that are HTML pages the crawler may fetch"
            )
            return f"the crawl stored no pages: every seed failed: {detail}. {hint}; {where}"
        summary = ", ".join(f"{reason_text(r)}: {n}" for r, n in sorted(flat.items(), key=lambda kv: -kv[1]))
        return f"the crawl stored no pages; outcomes: {summary or 'nothing was fetched'}; {where}"


def crawl(cfg: CrawlSection, out_dir: str | Path, local_site: str | Path | None = None) -> CrawlReport:
    """Crawl ``cfg.seeds`` into ``out_dir`` (``warc/``, ``fetches.jsonl``, state), resuming if it can.

    ``local_site`` is the folder of ``cfg.local_site`` resolved by the caller (the stage resolves it against the
    project); by default ``cfg.local_site`` is taken relative to the working directory.
    Raises ``DataError`` when the crawl ends with zero stored pages, saying why.
    """
    return Crawler(cfg, Path(out_dir), Path(local_site) if local_site is not None else None).run()
