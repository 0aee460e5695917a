"""End-to-end tests of the `data` stage: real datatrove passes on the tiny template's demo corpus and on
small generated inputs. Pipeline runs are few (each forks workers and runs up to six passes)."""

from __future__ import annotations

import gzip
import itertools
import json
import shutil
from pathlib import Path

import pytest
import yaml

pytest.importorskip("datatrove")

from llmforge.data.stage import run_data
from llmforge.errors import DataError, UserInputError
from llmforge.manifest import load
from llmforge.stage import StageContext, StageResult

CORPUS = Path(__file__).resolve().parents[2] / "llmforge" / "templates" / "tiny" / "corpus"


def run_stage(project: Path, data: dict, overrides: list[str] | None = None) -> StageResult:
    (project / "llmforge.yaml").write_text(
        yaml.safe_dump({"project": {"name": "t"}, "data": data}), encoding="utf-8"
    )
    loaded = load(project / "llmforge.yaml", overrides or [])
    out = loaded.runs_dir / "data"
    out.mkdir(parents=True, exist_ok=True)
    return run_data(StageContext("data", loaded, out))


def read_output(folder: Path) -> dict[str, dict]:
    rows = {}
    for shard in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                rows[row["id"]] = row
    return rows


def corpus_rows() -> dict[str, str]:
    with gzip.open(CORPUS / "articles.jsonl.gz", "rt", encoding="utf-8") as f:
        return {r["id"]: r["text"] for r in map(json.loads, f)}


# --------------------------------------------------------------------------------------------------------
# the demo corpus, every step, one run


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[StageResult, dict, dict[str, dict], Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    project = tmp_path_factory.mktemp("demo")
    shutil.copytree(CORPUS, project / "corpus")
    articles = corpus_rows()
    # a Parquet input: one exact duplicate of an article (across formats) and one binary text value
    pq.write_table(
        pa.table({"text": [articles["article-010"], "\x00\x01\x02\x03" * 40], "id": ["pq-dup", "pq-bin"]}),
        project / "extra.parquet",
    )
    # the `web` profile: the demo corpus plants one document for each web rule (curly bracket, lorem ipsum…)
    data = {"enabled": True, "profile": "web", "inputs": [{"path": "corpus"}, {"path": "extra.parquet"}]}
    res = run_stage(project, data)
    report = json.loads((project / "runs" / "data" / "report.json").read_text())
    return res, report, read_output(res.outputs["corpus"]), project


def test_demo_outputs_and_report(demo) -> None:
    res, report, out, project = demo
    assert res.outputs["corpus"] == project / "runs" / "data" / "output"
    assert res.outputs["report"].exists()
    assert report["status"] == "ok" and report["documents"]["out"] == len(out) > 150
    assert report["bytes"]["out"] > 300_000  # enough clean English for the tiny tokenizer and model
    assert all(set(row) >= {"text", "id"} for row in out.values())
    assert all(not k.startswith("_") for row in out.values() for k in row.get("metadata", {}))
    steps = {r["step"]: r for r in report["steps"]}
    assert list(steps) == [
        "read",
        "extract",
        "fix_unicode",
        "language",
        "gopher_repetition",
        "gopher_quality",
        "c4",
        "fineweb",
        "pii",
        "exact_dedup",
        "near_dedup",
    ]
    # every step hands on what the next one receives
    names = list(steps)
    for a, b in itertools.pairwise(names):
        assert steps[a]["docs_out"] == steps[b]["docs_in"], (a, b)
    assert steps["read"]["docs_out"] == steps["extract"]["docs_in"]
    assert steps["near_dedup"]["docs_out"] == report["documents"]["out"]
    # extraction turns HTML into much less text; every filter removes something and says why
    assert steps["extract"]["bytes_out"] < steps["extract"]["bytes_in"] - 40_000
    assert steps["language"]["drop_reasons"].get("language_fr") == 2
    assert steps["gopher_repetition"]["drop_reasons"].get("dup_line_frac", 0) >= 1
    assert steps["gopher_quality"]["dropped"] >= 1
    assert steps["c4"]["drop_reasons"] == {"curly_bracket": 1, "lorem_ipsum": 1} | {
        k: v for k, v in steps["c4"]["drop_reasons"].items() if k not in ("curly_bracket", "lorem_ipsum")
    }
    assert steps["fineweb"]["drop_reasons"].get("line_punct_ratio") == 1
    assert steps["pii"]["drop_reasons"] == {"contains_secret": 1}
    # bad input: counted, not fatal
    inputs = report["inputs"]
    assert inputs["damaged_files"] == {"truncated_or_corrupt_gzip": 1}
    assert inputs["skipped_records"]["binary_text"] == 2  # forum.jsonl and the Parquet file
    for reason in ("invalid_utf8", "non_string_text", "invalid_json", "empty_text"):
        assert inputs["skipped_records"].get(reason, 0) >= 1, reason
    assert inputs["by_format"] == {"jsonl": 3, "text": 12, "warc": 1, "parquet": 1}
    assert report["languages"]["en"] > 200 and report["languages"]["fr"] == 2
    # dedup figures and PII counts per kind
    assert report["dedup"]["exact"]["removed"] == 6 and report["dedup"]["exact"]["clusters"] == 6
    assert report["dedup"]["near"]["removed"] == 6 and report["dedup"]["near"]["clusters"] == 6
    pii = report["pii"]["matches"]
    for kind in ("email", "phone", "ipv4", "credit_card", "iban", "ssn", "secret"):
        assert pii.get(kind, 0) >= 1, kind
    assert report["samples"] and any(s["pii_redacted"] for s in report["samples"])
    assert report["timing"]["docs_per_s"] > 0
    # the result the CLI renders
    assert res.metrics["docs_out"] == len(out) and res.metrics["duplicates_removed"] == 12
    assert res.metrics["pii_email"] >= 2
    assert res.tables[0]["columns"][0] == "step" and len(res.tables[0]["rows"]) == len(steps)
    assert dict(res.summary)["documents"].startswith(f"{report['documents']['in']:,} → ")


def test_demo_which_documents_survive(demo) -> None:
    _, _, out, _ = demo
    ids = set(out)
    # exact duplicates: one copy of each group survives
    for group in (
        {"article-005", "article-005-repost"},
        {"article-010", "pq-dup"},
        {"article-077", "forum-repost"},
    ):
        assert len(ids & group) == 1, group
    # near duplicates (syndicated copies with words changed): one of each pair. article-042 also has an exact
    # copy: exact dedup keeps one of the two, MinHash then keeps one of that survivor and the syndicated copy.
    for k in range(6):
        src = f"article-{20 + 11 * k:03d}"
        group = {src, f"{src}-syndicated"} | ({"reposted-article.txt"} if src == "article-042" else set())
        assert len(ids & group) == 1, src
    # the same page under two URLs
    urls = [row["metadata"].get("url") for row in out.values()]
    assert (
        sum(u in ("https://riverside.example/posts/3", "https://riverside.example/amp/posts/3") for u in urls)
        == 1
    )
    # non-English, junk and the leaked key are gone; unrelated articles are all there
    assert not any(i.startswith(("fr-", "de-", "es-", "junk-")) for i in ids)
    assert "article-080" not in ids
    assert {"article-000", "article-001", "article-169", "note-00.md", "forum-0"} <= ids
    # documents read before the truncation point of the cut gzip file survive
    assert any(i.startswith("late-") for i in ids)
    # PII is redacted in the output
    text = "\n".join(row["text"] for row in out.values())
    assert "@example.org" not in text and "<EMAIL>" in text and "<PHONE>" in text and "<IBAN>" in text
    assert all(row["metadata"]["language"] == "en" for row in out.values())


# --------------------------------------------------------------------------------------------------------
# resume after a failure with the same config; a changed config does not reuse stale markers


def test_resume_and_config_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datatrove.pipeline.dedup import MinhashDedupFilter

    rows = list(corpus_rows().items())[:60]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(
        "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows), encoding="utf-8"
    )
    data = {
        "enabled": True,
        "inputs": [{"path": "in"}],
        "extract": {"enabled": False},
        "dedup": {"minhash": {"num_buckets": 2, "hashes_per_bucket": 4}},
    }

    def boom(self, data, rank=0, world_size=1):
        raise RuntimeError("simulated crash in the last pass")
        yield  # pragma: no cover

    monkeypatch.setattr(MinhashDedupFilter, "run", boom)
    with pytest.raises(DataError, match=r"pass 'minhash_filter' failed.*resumes"):
        run_stage(tmp_path, data)
    work = tmp_path / "runs" / "data" / "work"
    (first,) = list(work.iterdir())
    clean_stats = sorted((first / "logs" / "clean" / "stats").glob("*.json"))
    assert clean_stats and (first / "logs" / "minhash_cluster" / "completions" / "00000").exists()
    assert not (tmp_path / "runs" / "data" / "output").exists()  # nothing that looks finished
    mtimes = [p.stat().st_mtime_ns for p in clean_stats]

    monkeypatch.undo()
    res = run_stage(tmp_path, data)
    report = json.loads(res.outputs["report"].read_text())
    assert report["resumed"] is True
    assert [p.stat().st_mtime_ns for p in clean_stats] == mtimes  # finished passes were not redone
    n_same = report["documents"]["out"]
    assert n_same == len(read_output(res.outputs["corpus"])) > 40
    assert (first / "DONE").exists()

    # a stricter Gopher setting: new work folder, stale one removed, fewer documents
    res = run_stage(tmp_path, data, ["data.quality.gopher_quality.min_doc_words=420"])
    (second,) = list(work.iterdir())
    assert second.name != first.name
    report = json.loads(res.outputs["report"].read_text())
    assert report["resumed"] is False and report["documents"]["out"] < n_same
    assert report["steps"][[r["step"] for r in report["steps"]].index("gopher_quality")]["dropped"] > 0


# --------------------------------------------------------------------------------------------------------
# nothing survives / nothing to read


def test_everything_dropped_names_the_step(tmp_path: Path) -> None:
    rows = list(corpus_rows().items())[:4]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows))
    data = {
        "enabled": True,
        "inputs": [{"path": "a.jsonl"}],
        "tasks": 1,
        "workers": 1,
        "language": {"languages": ["fr"]},
    }
    with pytest.raises(
        DataError, match=r"step 'language' dropped all 4 documents .*language_en: 4.*data\.language"
    ):
        run_stage(tmp_path, data)
    report = json.loads((tmp_path / "runs" / "data" / "report.json").read_text())
    assert report["status"] == "error" and "language" in report["error"]
    assert not (tmp_path / "runs" / "data" / "exact").exists()


def test_empty_inputs(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.txt").write_text("")
    (tmp_path / "in" / "empty.jsonl").write_text("")
    (tmp_path / "in" / "blank.md").write_text("  \n")
    data = {"enabled": True, "inputs": [{"path": "in"}], "tasks": 1, "workers": 1}
    with pytest.raises(DataError, match=r"no documents could be read from 3 input file.*data\.inputs"):
        run_stage(tmp_path, data)


def test_input_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"data\.inputs` is empty"):
        run_stage(tmp_path, {"enabled": True})
    with pytest.raises(UserInputError, match=r"data\.inputs\[0\]\.path: .*missing.* does not exist"):
        run_stage(tmp_path, {"enabled": True, "inputs": [{"path": "missing"}]})
    (tmp_path / "only.csv").write_text("a,b\n")
    with pytest.raises(UserInputError, match="no readable files"):
        run_stage(tmp_path, {"enabled": True, "inputs": [{"path": "only.csv"}]})
