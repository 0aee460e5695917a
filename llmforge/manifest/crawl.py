"""`crawl:` — the polite web crawler that writes WARC files."""

from __future__ import annotations

import re

from pydantic import Field, model_validator

from .base import StageSection


class CrawlSection(StageSection):
    seeds: list[str] = Field(
        default_factory=list,
        description="Start URLs (http/https). Required when the crawl is enabled, unless `local_site` is set; "
        "with `local_site`, a seed may also be a path inside that site (`/`, `guide/index.html`).",
    )
    local_site: str | None = Field(
        default=None,
        description="A folder of HTML pages (plus robots.txt) in the project to crawl with no internet: it is "
        "served on a free loopback port for the duration of the crawl and its pages are recorded as "
        "`http://site.localhost/<path>`, the same on every run. Seeds default to `/` (its index.html).",
    )
    user_agent: str = Field(
        default="llmforge-crawler/0.1 (+https://github.com/llmforge/llmforge)",
        description="User-Agent header sent with every request and matched against robots.txt groups.",
    )
    respect_robots: bool = Field(
        default=True, description="Obey robots.txt Allow/Disallow rules and Crawl-delay for our user agent."
    )
    max_pages: int = Field(default=1000, gt=0, description="Stop after storing this many HTML pages.")
    max_depth: int = Field(default=3, ge=0, description="Link hops from a seed to follow (0 = seeds only).")
    allowed_domains: list[str] = Field(
        default_factory=list,
        description="Hosts (and their subdomains) the crawler may visit. Empty = the seeds' hosts. "
        "Seeds themselves are always fetched; links and redirects leaving these domains are not.",
    )
    include_patterns: list[str] = Field(
        default_factory=list,
        description="Regexes (searched in the normalised URL); when set, a discovered URL must match one of "
        "them to be fetched. Seeds and their redirects are exempt, so a home-page seed can lead into them.",
    )
    exclude_patterns: list[str] = Field(
        default_factory=list,
        description="Regexes (searched in the normalised URL); a discovered URL matching any is never fetched.",
    )
    sort_query: bool = Field(
        default=False,
        description="Sort query parameters when normalising URLs, so `?a=1&b=2` and `?b=2&a=1` are one page. "
        "Off by default: some servers treat parameter order as meaningful.",
    )
    concurrency: int = Field(default=16, gt=0, description="Requests in flight across all hosts.")
    per_host_concurrency: int = Field(default=2, gt=0, description="Requests in flight to one host.")
    per_host_delay_s: float = Field(
        default=0.5,
        ge=0,
        description="Minimum seconds between two requests to one host (robots Crawl-delay wins if larger).",
    )
    timeout_s: float = Field(default=20.0, gt=0, description="Per-request timeout (connect + read), seconds.")
    max_page_bytes: int = Field(
        default=5_000_000,
        gt=0,
        description="Pages larger than this (decoded bytes) are skipped, not stored; the download stops there.",
    )
    max_redirects: int = Field(default=5, ge=0, description="Redirect hops followed per URL.")
    retries: int = Field(
        default=3,
        ge=0,
        description="Retries for transient errors (timeouts, broken connections, 429, 5xx); 4xx is final.",
    )
    backoff_s: float = Field(
        default=1.0,
        ge=0,
        description="Base of the exponential backoff between retries (base·2^n, ±50% jitter; a longer "
        "Retry-After, up to 60 s, wins).",
    )
    warc_max_bytes: int = Field(
        default=1_000_000_000,
        gt=0,
        description="Start a new WARC file when the current one passes this size.",
    )
    warc_max_records: int = Field(
        default=500,
        gt=0,
        description="Start a new WARC file after this many stored pages. Many small files let the data stage "
        "give each of its `data.tasks` whole files (it also splits a file by records when there are fewer "
        "files than tasks, at the cost of every task decompressing it).",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.enabled and not self.seeds and not self.local_site:
            raise ValueError("crawl is enabled but `seeds` is empty: add at least one start URL")
        for s in self.seeds:
            if s.startswith(("http://", "https://")):
                continue
            if not self.local_site:
                raise ValueError(f"seed {s!r} must start with http:// or https://")
            if "://" in s or s.startswith("//"):
                raise ValueError(
                    f"seed {s!r}: with `local_site`, a seed is an http(s) URL or a path inside the site"
                )
        if self.per_host_concurrency > self.concurrency:
            raise ValueError("per_host_concurrency cannot exceed concurrency")
        for name in ("include_patterns", "exclude_patterns"):
            for i, pattern in enumerate(getattr(self, name)):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"{name}[{i}] {pattern!r} is not a valid regex: {err}") from None
        return self
