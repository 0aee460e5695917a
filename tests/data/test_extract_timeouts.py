"""Extraction timeouts: a CPU-time budget (not wall time), and the fallback extractor that rescues a page."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("datatrove")

from llmforge.data.steps import CpuTimeSandbox, cpu_seconds, fallback_text

from .crawl_site import Resp, Site
from .sites import article_page, crawl_site
from .test_process import read_output, run_stage


def _sleepy(text: str) -> str:
    time.sleep(0.6)  # waits (a busy machine, a slow disk) but uses no CPU
    return text.upper()


def _busy(text: str) -> str:
    if not text:
        return text  # the sandbox's warm-up call
    end = time.process_time() + 5
    while time.process_time() < end:
        pass
    return text


@pytest.mark.skipif(cpu_seconds(os.getpid()) is None, reason="needs Linux /proc")
def test_budget_counts_cpu_seconds_not_wall_time() -> None:
    # (a sandbox's child process is bound to the first function it runs: one sandbox per function)
    sleepy, busy = CpuTimeSandbox(timeout=0.2), CpuTimeSandbox(timeout=0.2)
    try:
        # 0.6 s of wall time but ~0 CPU: a wall-clock timeout of 0.2 s would have dropped it
        assert sleepy.process_document("ok", _sleepy) == "OK"
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="CPU seconds"):
            busy.process_document("x", _busy)
        assert time.monotonic() - t0 < 4  # stopped after ~0.2 CPU s, not after the work's 5 s
    finally:
        sleepy.__exit__(None, None, None)
        busy.__exit__(None, None, None)


def test_fallback_text_keeps_code_and_tables_and_skips_chrome() -> None:
    html = (
        "<html><head><script>var tracker = 1;</script></head><body><nav>Home | Blog</nav><main>"
        "<h1>Install</h1><p>Run the   command below.</p><pre>def f():\n    return {1: 2}\n</pre>"
        "<table><tr><th>key</th><th>value</th></tr><tr><td>a</td><td>1</td></tr></table>"
        + "<p>More text about the install steps, long enough to count as the main part.</p>" * 3
        + "</main><footer>(c) 2024</footer></body></html>"
    )
    text = fallback_text(html)
    assert "Run the command below." in text
    assert "def f():\n    return {1: 2}" in text
    assert "key | value\na | 1" in text
    assert "tracker" not in text and "Home | Blog" not in text and "(c) 2024" not in text


def _big_page() -> bytes:
    """An article with 3,000 more paragraphs: ~1 CPU s of trafilatura, ~0.07 s of the fallback."""
    base = article_page(99, []).decode()
    extra = "".join(
        f"<div><p>Paragraph {k}: the committee discussed item {k} of the agenda and agreed on a plan.</p></div>"
        for k in range(3000)
    )
    return base.replace("<main><article>", "<main><article>" + extra).encode()


@pytest.fixture(scope="module")
def slow_site_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tmp_path_factory.mktemp("slow-site")
    paths = [f"/story-{i}" for i in range(4)]
    index = "".join(f'<a href="{p}">{p}</a> ' for p in [*paths, "/huge"])
    routes = {"/": Resp(body=f"<html><body>{index}</body></html>".encode()), "/huge": Resp(body=_big_page())}
    routes.update({p: Resp(body=article_page(i, [])) for i, p in enumerate(paths)})
    with Site(routes) as site:
        crawl_site(site, project)
    return project


def _run(project: Path, fallback: bool) -> tuple[dict, dict]:
    data = {
        "enabled": True,
        "inputs": [{"path": "runs/crawl/warc"}],
        "tasks": 1,
        "workers": 1,
        "extract": {"timeout_s": 0.3, "fallback": fallback},
        # extraction is under test: the heuristic filters (the huge page is repetitive on purpose) are off
        "quality": {k: {"enabled": False} for k in ("gopher_repetition", "gopher_quality", "c4", "fineweb")},
        "dedup": {"exact": False, "minhash": {"enabled": False}},
    }
    res = run_stage(project, data)
    report = json.loads(res.outputs["report"].read_text())
    return report, read_output(res.outputs["corpus"])


def test_timed_out_page_is_rescued_by_the_fallback(slow_site_project: Path) -> None:
    report, out = _run(slow_site_project, fallback=True)
    extract = next(r for r in report["steps"] if r["step"] == "extract")
    assert extract["rescued"] == {"timeout": 1}
    assert "timeout" not in extract["drop_reasons"]
    (huge,) = [r for r in out.values() if r["metadata"]["url"].endswith("/huge")]
    assert huge["metadata"]["extractor"] == "fallback"
    assert "Paragraph 2999: the committee discussed item 2999" in huge["text"]
    assert "We use cookies" not in huge["text"]  # the page chrome is still left out
    stories = [r for r in out.values() if "/story-" in r["metadata"]["url"]]
    assert len(stories) == 4 and all(r["metadata"]["extractor"] == "trafilatura" for r in stories)


def test_without_fallback_the_loss_is_counted_by_reason(slow_site_project: Path) -> None:
    report, out = _run(slow_site_project, fallback=False)
    extract = next(r for r in report["steps"] if r["step"] == "extract")
    assert extract["drop_reasons"].get("timeout") == 1 and "rescued" not in extract
    assert not any(r["metadata"]["url"].endswith("/huge") for r in out.values())
    assert report["dropped_samples"]["extract"][0]["reason"] == "timeout"
