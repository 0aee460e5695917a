"""Review: cache decisions for external inputs (globs, hidden files), hash-cache staleness, status."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmforge import manifest, pipeline
from llmforge.utils.hashing import HashCache
from tests.core import dummy_stages

GLOB_MANIFEST = dummy_stages.MANIFEST.replace(
    "data:\n  enabled: true\n", "data:\n  enabled: true\n  inputs:\n    - path: in/*.txt\n"
)


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFORGE_TEST_CALLS", str(tmp_path / "calls.txt"))
    monkeypatch.setattr(pipeline, "STAGES", dummy_stages.STAGES)
    return tmp_path


def _pipe() -> pipeline.Pipeline:
    a, *rest = dummy_stages.STAGES
    a = pipeline.StageSpec(
        a.name, a.sections, a.needs, a.target, a.description, external_inputs=pipeline._data_inputs
    )
    return pipeline.Pipeline((a, *rest))


def _fp(project: Path, text: str) -> pipeline.Fingerprint:
    (project / "llmforge.yaml").write_text(text)
    loaded = manifest.load(project / "llmforge.yaml")
    p = _pipe()
    return pipeline.fingerprint(p, loaded, p.get("a"), HashCache())


def test_glob_input_content_enters_the_fingerprint(project):
    (project / "in").mkdir()
    (project / "in" / "one.txt").write_text("hello\n")
    first = _fp(project, GLOB_MANIFEST)
    assert first.external["in/*.txt"] != "missing"
    (project / "in" / "one.txt").write_text("changed, longer\n")
    second = _fp(project, GLOB_MANIFEST)
    assert second.digest != first.digest
    (project / "in" / "two.txt").write_text("new file\n")
    third = _fp(project, GLOB_MANIFEST)
    assert third.digest != second.digest
    (project / "in" / "skip.md").write_text("not matched\n")
    assert _fp(project, GLOB_MANIFEST).digest == third.digest


def test_glob_that_matches_nothing_is_missing(project):
    assert _fp(project, GLOB_MANIFEST).external["in/*.txt"] == "missing"


def test_hidden_files_in_an_input_folder_do_not_rerun_data(project):
    # The data stage never reads hidden files (discover_inputs skips them), e.g. a corpus that is a git checkout.
    text = dummy_stages.MANIFEST.replace(
        "data:\n  enabled: true\n", "data:\n  enabled: true\n  inputs:\n    - path: in\n"
    )
    (project / "in" / ".git").mkdir(parents=True)
    (project / "in" / "doc.txt").write_text("doc\n")
    (project / "in" / ".git" / "index").write_text("v1")
    first = _fp(project, text)
    (project / "in" / ".git" / "index").write_text("v2 longer")
    (project / "in" / ".DS_Store").write_text("x")
    assert _fp(project, text).digest == first.digest
    (project / "in" / "doc.txt").write_text("doc changed\n")
    assert _fp(project, text).digest != first.digest


def test_hash_cache_sees_same_size_rewrite_with_same_mtime(tmp_path):
    # An in-place rewrite within the file system's timestamp granularity (or by a tool that keeps mtime) keeps
    # size, mtime and inode; the cache must not return the old hash.
    f = tmp_path / "f.txt"
    f.write_text("aaaa")
    cache_file = tmp_path / "hashes.json"
    hc = HashCache(cache_file)
    h1 = hc.file(f)
    hc.save()
    st = f.stat()
    with open(f, "r+") as fh:  # same inode, same size
        fh.write("bbbb")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_ino == st.st_ino and f.stat().st_mtime_ns == st.st_mtime_ns
    assert HashCache(cache_file).file(f) != h1
    assert hc.file(f) != h1


def test_stale_disabled_upstream_does_not_make_downstream_wait(project):
    (project / "llmforge.yaml").write_text(dummy_stages.MANIFEST)
    pipeline.run(manifest.load(project / "llmforge.yaml"))
    # `a` is now disabled and its config changed: it will not re-run, and `b` no longer reads it.
    text = dummy_stages.MANIFEST.replace(
        "data:\n  enabled: true\n  tasks: 2", "data:\n  enabled: false\n  tasks: 3"
    )
    (project / "llmforge.yaml").write_text(text)
    rows = {r.name: r for r in pipeline.status(manifest.load(project / "llmforge.yaml"))}
    assert rows["a"].state == "stale" and "disabled" in rows["a"].reason
    assert "upstream a will re-run" not in rows["b"].reason


def test_force_of_a_stage_outside_the_plan_is_an_error(project):
    from llmforge.errors import UserInputError

    (project / "llmforge.yaml").write_text(dummy_stages.MANIFEST)
    with pytest.raises(UserInputError, match="--force"):
        pipeline.run(manifest.load(project / "llmforge.yaml"), ["a"], force=["c"])


def test_glob_fingerprint_survives_a_moved_project(project, tmp_path_factory):
    (project / "in").mkdir()
    (project / "in" / "one.txt").write_text("hello\n")
    first = _fp(project, GLOB_MANIFEST)
    moved = tmp_path_factory.mktemp("moved")
    (moved / "in").mkdir()
    (moved / "in" / "one.txt").write_text("hello\n")
    assert _fp(moved, GLOB_MANIFEST).digest == first.digest


def test_status_during_a_run_says_running_not_interrupted(project):
    (project / "llmforge.yaml").write_text(dummy_stages.MANIFEST)
    loaded = manifest.load(project / "llmforge.yaml")
    sdir = project / "runs" / "a"
    sdir.mkdir(parents=True)
    (sdir / ".running").write_text('{"pid": 1}')
    with pipeline.project_lock(loaded):  # another `llmforge run` holds the project
        rows = {r.name: r for r in pipeline.status(loaded)}
    assert rows["a"].state == "running"
    rows = {r.name: r for r in pipeline.status(loaded)}
    assert rows["a"].state == "interrupted"


def test_lineage_flags_an_upstream_that_re_ran_since(project):
    (project / "llmforge.yaml").write_text(dummy_stages.MANIFEST)
    pipeline.run(manifest.load(project / "llmforge.yaml"))
    # `llmforge data process data.tasks=3`: only `a` re-runs, with different output; b and c still hold old data
    pipeline.run(manifest.load(project / "llmforge.yaml", ["data.tasks=3"]), ["a"], only=True)
    tree = pipeline.lineage_tree(manifest.load(project / "llmforge.yaml"), project / "runs" / "c" / "c.txt")
    b = tree.inputs[0]
    a = b.inputs[0]
    assert not b.superseded
    assert a.stage == "a" and a.superseded
