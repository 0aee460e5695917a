"""Filter profiles on real crawls of local sites: what each profile keeps, and the high-drop warning.

The sites (``tests/data/sites.py``) are crawled once per module with llmforge's crawler; each profile then runs
the data stage on the same WARC file (dedup off: these tests are about the filters).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("datatrove")

from llmforge.manifest.data import PROFILES, DataSection

from .sites import crawl_site, docs_site, web_site
from .test_process import read_output, run_stage

NO_DEDUP = {"exact": False, "minhash": {"enabled": False}}


def kept_kinds(project: Path, profile: str, **extra: object) -> tuple[Counter, dict, object]:
    data = {
        "enabled": True,
        "profile": profile,
        "inputs": [{"path": "runs/crawl/warc"}],
        "dedup": NO_DEDUP,
        **extra,
    }
    res = run_stage(project, data)
    report = json.loads(res.outputs["report"].read_text())
    out = read_output(res.outputs["corpus"])
    # /page-3 → "page", /story-1 → "story", /offer-2 → "offer", / → "index"
    kinds = Counter(row["metadata"]["url"].rsplit("/", 1)[1].split("-")[0] or "index" for row in out.values())
    return kinds, report, res


@pytest.fixture(scope="module")
def docs_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tmp_path_factory.mktemp("docs-site")
    with docs_site(24) as site:
        crawl_site(site, project)
    return project


@pytest.fixture(scope="module")
def web_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tmp_path_factory.mktemp("web-site")
    with web_site(12, 9) as site:
        crawl_site(site, project)
    return project


def test_profile_overlay_and_overrides() -> None:
    default = DataSection()
    assert default.profile == "docs"
    assert default.quality.c4.filter_curly_bracket is False and default.quality.c4.edit_lines is False
    assert default.quality.gopher_quality.min_doc_words == 25
    web = DataSection(profile="web")
    assert web.quality.c4.filter_curly_bracket is True and web.quality.gopher_quality.min_doc_words == 50
    assert web.language.min_score == 0.65
    # a key the manifest sets wins over the profile; its neighbours keep the profile's values
    mixed = DataSection(profile="docs", quality={"gopher_quality": {"min_doc_words": 80}})
    assert mixed.quality.gopher_quality.min_doc_words == 80
    assert mixed.quality.gopher_quality.max_non_alpha_words_ratio == 0.5
    code = DataSection(profile="code", quality={"c4": {"enabled": True}})
    assert code.quality.c4.enabled and not code.quality.fineweb.enabled
    # every key a profile names is a real knob (a typo would otherwise be silently ignored)
    for name in PROFILES:
        DataSection(profile=name)
    # `llmforge validate --explain` shows each profile's value next to the (web) field default
    from llmforge.manifest.data import C4Config, LanguageConfig

    assert "web 0.65, docs 0.5, code 0.3" in LanguageConfig.model_fields["min_score"].description
    assert "web true, docs false, code –" in C4Config.model_fields["filter_curly_bracket"].description


def test_docs_site_kept_per_profile(docs_project: Path) -> None:
    kept = {p: kept_kinds(docs_project, p) for p in ("web", "code", "docs")}  # docs last: its output stays
    pages = {p: k["page"] for p, (k, _, _) in kept.items()}
    # 24 documentation pages, 18 with code blocks and tables: web keeps only the 6 prose-only ones
    assert pages["docs"] >= 22, pages
    assert pages["code"] >= 22, pages
    assert pages["web"] <= 8, pages
    _, report, _ = kept["docs"]
    assert report["warnings"] == []  # nothing to warn about with the right profile
    # code lines survive (C4 decides but does not delete short lines); trafilatura's plain-text output
    # itself does not keep indentation
    out = read_output(Path(report["output"]["dir"]))
    text = "\n".join(r["text"] for r in out.values())
    assert 'options = {"timeout"' in text and 'raise ValueError("nothing to do")' in text
    assert re.search(r"^return \w+\(result\)$", text, re.M)  # 2 words: the web profile's C4 deletes it


def test_high_drop_warning_names_step_knob_and_examples(docs_project: Path) -> None:
    _, report, res = kept_kinds(docs_project, "web")
    (warning,) = [w for w in report["warnings"] if w["step"] == "c4"]
    assert warning["share"] > 0.3 and warning["knob"] == "data.quality.c4"
    assert "data.profile: docs" in warning["message"] and "curly_bracket" in warning["message"]
    assert warning["examples"] and all(e["reason"] == "curly_bracket" for e in warning["examples"])
    assert all("/page-" in e["url"] and len(e["text"]) > 100 for e in warning["examples"])
    # dropped documents of every step are in the report, not only the survivors
    assert report["dropped_samples"]["c4"][0]["reason"] == "curly_bracket"
    summary = dict(res.summary)
    assert "75%" in summary["⚠ c4"] or "%" in summary["⚠ c4"]
    assert res.metrics["high_drop_warnings"] >= 1
    titles = [t["title"] for t in res.tables]
    assert any(t.startswith("data: examples of what the warned steps dropped") for t in titles)
    # a higher threshold silences it
    _, quiet, _ = kept_kinds(docs_project, "web", warn_drop_share=0.9)
    assert not [w for w in quiet["warnings"] if w["step"] == "c4"]


def test_web_site_kept_per_profile(web_project: Path) -> None:
    for profile in ("web", "docs", "code"):
        kinds, report, _ = kept_kinds(web_project, profile)
        assert kinds["story"] >= 11, (profile, kinds)  # 12 real articles
        limit = 2 if profile == "code" else 0  # 9 spam / link-farm / tag pages
        assert kinds["offer"] <= limit, (profile, kinds)
        assert kinds["index"] == 0, (profile, kinds)
        assert report["profile"] == profile
