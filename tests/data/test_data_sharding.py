"""Every core busy: the crawler rotates WARC files by page count, and the reader splits a file by records when
there are fewer files than tasks. Also: a crawl that ran while `crawl.enabled: false` is not read silently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("datatrove")

from llmforge.data.readers import InputFile, InputReader, work_units
from llmforge.errors import UserInputError

from .sites import crawl_site, docs_site
from .test_process import corpus_rows, read_output, run_stage


def task_docs(project: Path, step: str = "read") -> list[int]:
    """Documents each task of the clean pass handed on from ``step`` (from the per-task stats files)."""
    (work,) = (project / "runs" / "data" / "work").iterdir()
    out = []
    for path in sorted((work / "logs" / "clean" / "stats").glob("*.json")):
        stats = {s["name"]: s["stats"] for s in json.loads(path.read_text())}
        value = stats[step].get("docs_out", 0)
        out.append(int(value["total"] if isinstance(value, dict) else value))
    return out


def test_work_units_split_few_files_by_record() -> None:
    a, b = InputFile("a.warc.gz", "warc", "t"), InputFile("b.txt", "text", "t")
    assert work_units([a, b], 2) == [(a, 0, 1), (b, 0, 1)]  # enough files: whole files
    assert work_units([a], 3) == [(a, 0, 3), (a, 1, 3), (a, 2, 3)]
    assert work_units([a, b], 4) == [(a, 0, 2), (a, 1, 2), (b, 0, 1)]  # a text file is one document
    assert work_units([a], 1) == [(a, 0, 1)]


@pytest.fixture(scope="module")
def one_file_crawl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tmp_path_factory.mktemp("one-file")
    with docs_site(9) as site:
        warc = crawl_site(site, project)
    assert len(list(warc.glob("*.warc.gz"))) == 1
    return project


def test_reader_splits_one_warc_between_tasks(one_file_crawl: Path) -> None:
    (path,) = (one_file_crawl / "runs" / "crawl" / "warc").glob("*.warc.gz")
    files = [InputFile(str(path), "warc", "crawl")]
    alone = [d.id for d in InputReader(files).run(None, 0, 1)]
    parts = [[d.id for d in InputReader(files).run(None, r, 2)] for r in (0, 1)]
    assert len(alone) == 10 and all(len(p) == 5 for p in parts)
    assert sorted(parts[0] + parts[1]) == sorted(alone)  # every document once, none twice


def test_big_crawl_rotates_and_both_tasks_work(tmp_path: Path) -> None:
    with docs_site(30) as site:
        warc = crawl_site(site, tmp_path, warc_max_records=16)  # 31 pages → 2 files
    assert len(list(warc.glob("*.warc.gz"))) == 2
    res = run_stage(
        tmp_path,
        {"enabled": True, "inputs": [{"path": "runs/crawl/warc"}], "tasks": 2, "workers": 2},
    )
    assert len(read_output(res.outputs["corpus"])) >= 27
    read, extracted = task_docs(tmp_path, "read"), task_docs(tmp_path, "extract")
    assert len(read) == 2 and min(read) >= 14, read  # 16 + 15 pages
    assert min(extracted) >= 12, extracted


def test_unread_crawl_is_said_plainly(tmp_path: Path, one_file_crawl: Path) -> None:
    import shutil

    shutil.copytree(one_file_crawl / "runs" / "crawl", tmp_path / "runs" / "crawl")
    (tmp_path / "a.txt").write_text(corpus_rows()["article-000"])
    # the manifest has no `crawl:` section, so the crawl is disabled: its WARC file is not read, and we say so
    res = run_stage(tmp_path, {"enabled": True, "inputs": [{"path": "a.txt"}], "tasks": 1, "workers": 1})
    note = dict(res.summary)["⚠ note"]
    assert "not reading the crawl in runs/crawl/warc (1 WARC files)" in note
    assert "`crawl.enabled: true`" in note and "data.inputs" in note
    assert res.metrics["docs_in"] == 1
    # listing the crawl folder as an input reads it, and the note goes away
    res = run_stage(
        tmp_path,
        {
            "enabled": True,
            "inputs": [{"path": "a.txt"}, {"path": "runs/crawl/warc"}],
            "tasks": 1,
            "workers": 1,
        },
    )
    assert "⚠ note" not in dict(res.summary) and res.metrics["docs_in"] == 11
    # with nothing else to read, the error says why the crawl was not used
    with pytest.raises(UserInputError, match=r"crawl\.enabled` is false"):
        run_stage(tmp_path, {"enabled": True})


def test_disabled_crawl_stage_warns_that_data_will_not_read_it(tmp_path: Path) -> None:
    import yaml

    from llmforge.data.crawl import run_crawl
    from llmforge.manifest import load
    from llmforge.stage import StageContext

    with docs_site(2) as site:
        manifest = {
            "project": {"name": "t"},
            "crawl": {
                "enabled": False,
                "seeds": [site.url("/")],
                "per_host_delay_s": 0,
                "respect_robots": False,
            },
        }
        (tmp_path / "llmforge.yaml").write_text(yaml.safe_dump(manifest))
        loaded = load(tmp_path / "llmforge.yaml")
        out = loaded.runs_dir / "crawl"
        out.mkdir(parents=True)
        res = run_crawl(StageContext("crawl", loaded, out))
    assert "data stage will not read it" in dict(res.summary)["⚠ not wired"]
