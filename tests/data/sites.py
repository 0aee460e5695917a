"""Local test sites for the data stage: a documentation-like site and a web-like site, served by ``Site``.

Both are generated from a seed (the same seed, the same pages), with real page chrome (nav, sidebar,
footer, cookie banner) around the content so extraction has work to do:

* ``docs_site(n)`` — documentation pages of a made-up Python library: prose paragraphs, a code block
  (braces, ``#`` comments, indentation), a parameters table, an API reference with "Parameters"/"Returns"
  headings repeated per function, bullet lists of options; every fourth page is a prose-only concepts page.
  Every page is real prose a user wants kept.
* ``web_site(n_articles, n_spam)`` — news-like articles (kept by every profile) plus pages that no profile
  should keep: keyword-stuffed spam, link farms and tag pages that are only navigation.

``crawl_site`` crawls one with llmforge's crawler into a project's ``runs/crawl/warc`` (as the crawl stage
would), so tests read real WARC files.
"""

from __future__ import annotations

import random
from pathlib import Path

from .crawl_site import Resp, Site

_SUBJECTS = [
    "the scheduler",
    "the cache layer",
    "each worker",
    "the configuration loader",
    "the connection pool",
    "this function",
    "the client",
    "the retry policy",
    "the exporter",
    "the parser",
    "the index builder",
    "a background task",
]
_VERBS = [
    "reads",
    "validates",
    "writes",
    "returns",
    "stores",
    "retries",
    "compresses",
    "splits",
    "merges",
    "checks",
    "resolves",
    "records",
]
_ADJECTIVES = [
    "pending",
    "cached",
    "remote",
    "local",
    "default",
    "nested",
    "optional",
    "compressed",
    "signed",
    "partial",
    "stale",
    "fresh",
    "shared",
    "private",
    "temporary",
    "persistent",
    "verbose",
    "sorted",
    "empty",
    "current",
]
_NOUNS = [
    "request",
    "record",
    "batch",
    "header",
    "setting",
    "token",
    "index",
    "queue",
    "session",
    "snapshot",
    "value",
    "result",
    "message",
    "file",
    "column",
    "limit",
    "handler",
    "callback",
    "timestamp",
    "checksum",
]
_TAILS = [
    "before it starts the next step",
    "so that a restart can resume where it stopped",
    "when the value is missing",
    "and logs a warning if that fails",
    "because the server may be slow to answer",
    "which keeps memory use bounded",
    "unless you pass a different value",
    "in the order the items were added",
    "after the lock has been released",
    "so you rarely need to call it yourself",
    "while holding no other locks",
    "if the caller asked for it",
    "as described in the previous section",
    "to avoid reading the disk twice",
    "whenever the file changes on disk",
    "once per connection",
    "without blocking the event loop",
    "for every tenant separately",
    "and raises an error otherwise",
    "at most once per minute",
    "on the first call only",
    "so that tests stay fast",
    "even when the network is down",
    "with the defaults shown above",
]
_NAMES = [
    "load_config",
    "open_pool",
    "fetch_batch",
    "write_index",
    "retry_call",
    "merge_results",
    "parse_header",
    "flush_queue",
    "resolve_path",
    "export_table",
    "check_limits",
    "close_session",
]


class _Prose:
    """Sentences for one page: objects and endings are drawn without replacement, as real pages rarely
    repeat a phrase (with replacement, a small vocabulary trips Gopher's repeated-n-gram rule)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.objects = [f"the {a} {n}" for a in _ADJECTIVES for n in _NOUNS]
        rng.shuffle(self.objects)
        self.tails = list(_TAILS)
        rng.shuffle(self.tails)

    def __call__(self) -> str:
        rng = self.rng
        if not self.tails:
            self.tails = list(_TAILS)
            rng.shuffle(self.tails)
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {self.objects.pop()} {self.tails.pop()}."
        return s[0].upper() + s[1:]


def _sentence(rng: random.Random) -> str:
    return _Prose(rng)()


def _paragraph(prose: _Prose, n: int) -> str:
    return " ".join(prose() for _ in range(n))


def _chrome(title: str, body: str, links: list[str]) -> bytes:
    nav = "".join(f'<li><a href="{h}">{h.strip("/").replace("-", " ")}</a></li>' for h in links)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>"
        f"{title}</title><style>body {{ font-family: sans-serif; }}</style>"
        "<script>window.dataLayer = window.dataLayer || []; function gtag(){dataLayer.push(arguments);}</script>"
        "</head><body>"
        "<div class='cookie-banner'>We use cookies to improve your experience. <button>Accept</button></div>"
        f"<header><nav><ul>{nav}</ul></nav></header>"
        f"<aside class='sidebar'><h3>On this page</h3><ul>{nav}</ul></aside>"
        f"<main><article>{body}</article></main>"
        "<footer><p>Copyright 2024 Example Project. All rights reserved.</p>"
        "<p><a href='/privacy'>Privacy policy</a> | <a href='/terms'>Terms of use</a></p></footer>"
        "</body></html>"
    ).encode()


def docs_page(i: int, links: list[str], seed: int = 0) -> bytes:
    """One documentation page: prose, a code block, a parameters table and an API reference."""
    rng = random.Random(seed * 100_003 + i)
    prose = _Prose(rng)
    fn, other = rng.sample(_NAMES, 2)
    title = f"{fn.replace('_', ' ').title()} — guide {i}"
    code = (
        f"from example import {fn}, {other}\n\n"
        f"def main(path: str) -> dict:\n"
        f"    # read the settings, then call {fn}\n"
        f'    options = {{"timeout": {rng.randint(1, 60)}, "retries": {rng.randint(0, 5)}}}\n'
        f"    result = {fn}(path, **options)\n"
        f"    if not result:\n"
        f'        raise ValueError("nothing to do")\n'
        f"    return {other}(result)\n"
    )
    rows = "".join(
        f"<tr><td><code>{name}</code></td><td>{typ}</td><td>{prose()}</td></tr>"
        for name, typ in rng.sample(
            [("path", "str"), ("timeout", "float"), ("retries", "int"), ("strict", "bool"), ("mode", "str")],
            3,
        )
    )
    api = "".join(
        f"<h3><code>{name}(path, timeout=30)</code></h3><p>{_paragraph(prose, 2)}</p>"
        f"<h4>Parameters</h4><ul><li><code>path</code> — {prose()}</li>"
        f"<li><code>timeout</code> — {prose()}</li></ul>"
        f"<h4>Returns</h4><p>{prose()}</p>"
        for name in (fn, other)
    )
    if i % 4 == 3:  # a concepts page: prose and a list, no code (every docs site has some)
        body = (
            f"<h1>{title}</h1><p>{_paragraph(prose, 4)}</p><p>{_paragraph(prose, 4)}</p>"
            f"<h2>How it works</h2><p>{_paragraph(prose, 4)}</p>"
            f"<ul><li>{prose()}</li><li>{prose()}</li></ul><p>{_paragraph(prose, 3)}</p>"
        )
        return _chrome(title, body, links)
    body = (
        f"<h1>{title}</h1><p>{_paragraph(prose, 4)}</p><p>{_paragraph(prose, 3)}</p>"
        f"<h2>Example</h2><pre><code>{code}</code></pre><p>{_paragraph(prose, 3)}</p>"
        f"<h2>Options</h2><table><tr><th>Name</th><th>Type</th><th>Description</th></tr>{rows}</table>"
        f"<h2>API reference</h2>{api}"
        f"<h2>See also</h2><ul><li>{prose()}</li></ul>"
    )
    return _chrome(title, body, links)


_NEWS = [
    "The city council met on Tuesday evening to discuss the new budget for public libraries.",
    "Residents said the plan would help families who rely on the libraries for internet access.",
    "A spokesperson for the mayor explained that the money would come from savings elsewhere.",
    "Several members of the council asked for more details before the final vote next month.",
    "The local school board has also asked for funding to repair two of its oldest buildings.",
    "Volunteers have organised a reading programme for children during the summer holidays.",
    "Critics of the plan argued that the city should first fix the roads in the northern district.",
    "The weather service expects heavy rain at the weekend, so the market may move indoors.",
    "Shop owners in the old town reported that visitor numbers were higher than last year.",
    "The football club announced that its new stadium will open at the start of next season.",
    "Doctors at the regional hospital are testing a faster way to book appointments online.",
    "A new bus line will connect the university with the train station from September.",
    "The museum will show paintings from private collections that have never been seen in public.",
    "Farmers in the valley said that the dry spring had made the harvest smaller than usual.",
    "The festival committee thanked everyone who helped to clean the park after the concert.",
]


def article_page(i: int, links: list[str], seed: int = 0) -> bytes:
    rng = random.Random(seed * 7919 + i)
    prose = _Prose(rng)
    news = rng.sample(_NEWS, 12)  # each sentence once per page, as a reporter writes
    paras = [" ".join(news[k : k + 3]) for k in range(0, 12, 3)]
    body = f"<h1>Local news, story {i}</h1>" + "".join(f"<p>{p} {prose()}</p>" for p in paras)
    return _chrome(f"Story {i}", body, links)


def spam_page(i: int, links: list[str]) -> bytes:
    """Pages no filter profile should keep: keyword stuffing, link farms, tag pages (navigation only)."""
    kind = i % 3
    if kind == 0:
        phrase = "buy cheap watches online best price free shipping buy now "
        body = f"<h1>Cheap watches {i}</h1>" + "".join(f"<p>{phrase * 6}</p>" for _ in range(6))
    elif kind == 1:
        body = f"<h1>Partner links {i}</h1><ul>" + "".join(
            f"<li><a href='https://casino{j}.example/'>best casino bonus {j}</a></li>" for j in range(60)
        )
        body += "</ul>"
    else:
        body = f"<h1>Tag: news {i}</h1><ul>" + "".join(
            f"<li><a href='/story-{j}'>Story {j}</a></li>" for j in range(40)
        )
        body += "</ul>"
    return _chrome(f"Offers {i}", body, links)


def docs_site(n: int = 24, seed: int = 0) -> Site:
    """``/`` links to ``/page-0`` … ``/page-{n-1}``; every page is a documentation page."""
    paths = [f"/page-{i}" for i in range(n)]
    index = "".join(f'<a href="{p}">{p}</a> ' for p in paths)
    routes: dict = {"/": Resp(body=f"<html><body><h1>Docs</h1>{index}</body></html>".encode())}
    for i, p in enumerate(paths):
        routes[p] = Resp(body=docs_page(i, paths[:8], seed))
    return Site(routes)


def web_site(n_articles: int = 12, n_spam: int = 9, seed: int = 0) -> Site:
    """``/`` links to ``/story-i`` (articles) and ``/offer-j`` (spam, link farms, tag pages)."""
    stories = [f"/story-{i}" for i in range(n_articles)]
    offers = [f"/offer-{j}" for j in range(n_spam)]
    index = "".join(f'<a href="{p}">{p}</a> ' for p in stories + offers)
    routes: dict = {"/": Resp(body=f"<html><body><h1>News</h1>{index}</body></html>".encode())}
    for i, p in enumerate(stories):
        routes[p] = Resp(body=article_page(i, stories[:6], seed))
    for j, p in enumerate(offers):
        routes[p] = Resp(body=spam_page(j, stories[:6]))
    return Site(routes)


def crawl_site(site: Site, project: Path, **crawl: object) -> Path:
    """Crawl ``site`` from ``/`` into ``project/runs/crawl`` with the real crawler; returns the WARC folder."""
    from llmforge.data.crawl import crawl as run_crawl
    from llmforge.manifest.crawl import CrawlSection

    settings = {
        "enabled": True,
        "seeds": [site.url("/")],
        "per_host_delay_s": 0,
        "per_host_concurrency": 4,
        "concurrency": 4,
        "max_depth": 1,
        "respect_robots": False,
        **crawl,
    }
    report = run_crawl(CrawlSection(**settings), project / "runs" / "crawl")
    return report.warc_dir
