"""Stage runner: fingerprints, caching, invalidation, force, crash/kill safety, status, lineage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from llmforge import manifest, pipeline
from llmforge.errors import NotBuiltError, StageError, StageInputError, UserInputError
from llmforge.utils.hashing import HashCache
from tests.core import dummy_stages

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "llmforge.yaml").write_text(dummy_stages.MANIFEST)
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("LLMFORGE_TEST_CALLS", str(calls))
    monkeypatch.setattr(pipeline, "STAGES", dummy_stages.STAGES)
    return tmp_path


def calls(project: Path) -> list[str]:
    p = project / "calls.txt"
    out = p.read_text().split() if p.exists() else []
    p.unlink(missing_ok=True)
    return out


def load(project: Path, *overrides: str):
    return manifest.load(project / "llmforge.yaml", list(overrides))


def actions(outcomes) -> dict[str, str]:
    return {o.name: o.action for o in outcomes}


def test_second_run_is_all_cached(project):
    first = pipeline.run(load(project))
    assert actions(first) == {"a": "ran", "b": "ran", "c": "ran"}
    assert calls(project) == ["a", "b", "c"]
    second = pipeline.run(load(project))
    assert actions(second) == {"a": "cached", "b": "cached", "c": "cached"}
    assert calls(project) == []


def test_lineage_records_config_inputs_outputs(project):
    pipeline.run(load(project))
    lin = json.loads((project / "runs" / "b" / "lineage.json").read_text())
    assert lin["stage"] == "b"
    assert lin["config"]["tokenizer"]["vocab_size"] == 512
    assert lin["config"]["project.seed"] == 1234
    a_lin = json.loads((project / "runs" / "a" / "lineage.json").read_text())
    assert lin["inputs"]["upstream"]["a"]["outputs"] == {"a": a_lin["outputs"]["a"]["sha256"]}
    assert lin["outputs"]["b"]["kind"] == "dir"
    assert lin["outputs"]["b"]["path"] == "runs/b/bdir"
    assert lin["metrics"] == {"vocab": 512}
    assert lin["packages"]["llmforge"]
    assert lin["wall_time_s"] >= 0
    assert not (project / "runs" / "b" / ".running").exists()


def test_editing_a_section_reruns_that_stage_and_downstream_only(project):
    pipeline.run(load(project))
    calls(project)
    out = pipeline.run(load(project, "tokenizer.vocab_size=600"))
    assert actions(out) == {"a": "cached", "b": "ran", "c": "ran"}
    assert out[1].reason == "config changed: tokenizer.vocab_size"
    assert out[2].reason == "input changed: output of b"
    assert calls(project) == ["b", "c"]


def test_editing_the_last_stage_reruns_only_it(project):
    pipeline.run(load(project))
    calls(project)
    out = pipeline.run(load(project, "pretrain.max_steps=20"))
    assert actions(out) == {"a": "cached", "b": "cached", "c": "ran"}


def test_unchanged_output_keeps_downstream_cached(project):
    """Content addressing: `a` re-runs for a config change that does not change its output."""
    pipeline.run(load(project))
    calls(project)
    # (a semantic knob the dummy stage ignores; runtime-only knobs such as data.workers re-run nothing at all)
    out = pipeline.run(load(project, "data.max_file_size_mb=77"))
    assert actions(out) == {"a": "ran", "b": "cached", "c": "cached"}
    out = pipeline.run(load(project, "data.max_file_size_mb=77", "data.workers=1"))
    assert actions(out) == {"a": "cached", "b": "cached", "c": "cached"}


def test_force_reruns_the_stage(project):
    pipeline.run(load(project))
    calls(project)
    out = pipeline.run(load(project), force=["b"])
    assert actions(out)["b"] == "ran"
    assert out[1].reason == "forced (--force)"
    assert calls(project) == ["b"]  # identical output → c stays cached


def test_forced_stage_is_told_so(project):
    """Stages that resume from earlier work must know a forced run means start over."""
    pipeline.run(load(project))
    calls(project)
    pipeline.run(load(project), force=["c"])
    assert calls(project) == ["c!"]
    pipeline.run(load(project, "pretrain.max_steps=30"))
    assert calls(project) == ["c"]  # a normal re-run is not forced


def test_targets_run_with_their_upstream(project):
    out = pipeline.run(load(project), ["b"])
    assert [o.name for o in out] == ["a", "b"]
    out = pipeline.run(load(project), ["c"], only=True)
    assert actions(out) == {"c": "ran"}


def test_only_without_upstream_is_a_clear_error(project):
    with pytest.raises(StageError, match="needs a to have completed"):
        pipeline.run(load(project), ["b"], only=True)


def test_disabled_upstream_reported_by_ctx_input(project):
    with pytest.raises(StageInputError, match="needs the output of stage 'a'"):
        pipeline.run(load(project, "data.enabled=false"), ["b"])


def test_unknown_and_unbuilt_stages(project):
    with pytest.raises(UserInputError, match="unknown stage 'zz'"):
        pipeline.run(load(project), ["zz"])
    with pytest.raises(NotBuiltError, match=r"stage 'd'.*not built"):
        pipeline.run(load(project, "sft.enabled=true"))
    assert calls(project) == []  # refused before running anything


def test_crash_leaves_no_lineage_and_reruns(project, monkeypatch):
    pipeline.run(load(project))
    calls(project)
    monkeypatch.setenv("LLMFORGE_TEST_CRASH_A", "1")
    with pytest.raises(RuntimeError, match="boom"):
        pipeline.run(load(project, "data.tasks=3"))
    assert not (project / "runs" / "a" / "lineage.json").exists()
    st = {s.name: s for s in pipeline.status(load(project, "data.tasks=3"))}
    assert st["a"].state == "failed" and "boom" in st["a"].reason
    assert st["b"].state == "stale"
    monkeypatch.delenv("LLMFORGE_TEST_CRASH_A")
    calls(project)
    out = pipeline.run(load(project, "data.tasks=3"))
    assert actions(out) == {"a": "ran", "b": "ran", "c": "ran"}


def test_sigkill_mid_stage_leaves_it_unfinished(project):
    """A real process killed with SIGKILL: no lineage, status says interrupted, next run re-runs it."""
    pipeline.run(load(project))
    calls(project)
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from llmforge import manifest, pipeline
        from tests.core import dummy_stages
        pipeline.STAGES = dummy_stages.STAGES
        pipeline.run(manifest.load({str(project / "llmforge.yaml")!r}, ["data.tasks=5"]))
        """
    )
    env = {**os.environ, "LLMFORGE_TEST_SLEEP_A": "30"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    marker = project / "runs" / "a" / "partial.txt"
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "stage a never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert not (project / "runs" / "a" / "lineage.json").exists()
    st = {s.name: s for s in pipeline.status(load(project, "data.tasks=5"))}
    assert st["a"].state == "interrupted"
    calls(project)
    out = pipeline.run(load(project, "data.tasks=5"))
    assert actions(out)["a"] == "ran"


def test_modified_output_is_detected_and_rerun(project):
    pipeline.run(load(project))
    calls(project)
    (project / "runs" / "b" / "bdir" / "b.txt").write_text("tampered")
    st = {s.name: s for s in pipeline.status(load(project))}
    assert st["b"].state == "stale" and "modified" in st["b"].reason
    out = pipeline.run(load(project))
    assert actions(out) == {"a": "cached", "b": "ran", "c": "cached"}


def test_external_input_content_is_fingerprinted(project, monkeypatch):
    ext = project / "corpus.txt"
    ext.write_text("hello")
    spec = pipeline.StageSpec(
        "a", ("data",), (), "tests.core.dummy_stages:stage_a", "a", external_inputs=lambda lm: [ext]
    )
    monkeypatch.setattr(pipeline, "STAGES", (spec, *dummy_stages.STAGES[1:]))
    pipeline.run(load(project))
    assert actions(pipeline.run(load(project)))["a"] == "cached"
    ext.write_text("hello, changed")
    out = pipeline.run(load(project))
    assert actions(out)["a"] == "ran"
    assert "input file changed: corpus.txt" in out[0].reason


def test_status_states(project):
    st = {s.name: s.state for s in pipeline.status(load(project))}
    assert st == {"a": "never run", "b": "waiting", "c": "waiting", "d": "not built"}
    pipeline.run(load(project))
    st = {s.name: s.state for s in pipeline.status(load(project))}
    assert st == {"a": "done", "b": "done", "c": "done", "d": "not built"}
    st = {s.name: s for s in pipeline.status(load(project, "tokenizer.vocab_size=700"))}
    assert (st["a"].state, st["b"].state, st["c"].state) == ("done", "stale", "stale")
    assert st["b"].reason == "config changed: tokenizer.vocab_size"


def test_lineage_tree_follows_inputs(project):
    pipeline.run(load(project))
    node = pipeline.lineage_tree(load(project), project / "runs" / "c" / "c.txt")
    assert (node.stage, node.matched_output) == ("c", "c")
    assert [n.stage for n in node.inputs] == ["b"]
    assert [n.stage for n in node.inputs[0].inputs] == ["a"]
    node = pipeline.lineage_tree(load(project), project / "runs" / "b" / "bdir" / "b.txt")
    assert (node.stage, node.matched_output) == ("b", "b")
    with pytest.raises(UserInputError, match="not produced by any completed stage"):
        pipeline.lineage_tree(load(project), project / "llmforge.yaml")


def test_concurrent_runs_are_refused(project):
    loaded = load(project)
    with pipeline.project_lock(loaded), pytest.raises(UserInputError, match="another llmforge run"):
        pipeline.run(loaded)


# -- external inputs: globs, hidden files, moved projects --------------------------------------------------------

GLOB_MANIFEST = dummy_stages.MANIFEST.replace(
    "data:\n  enabled: true\n", "data:\n  enabled: true\n  inputs:\n    - path: in/*.txt\n"
)


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


def test_glob_fingerprint_survives_a_moved_project(project, tmp_path_factory):
    (project / "in").mkdir()
    (project / "in" / "one.txt").write_text("hello\n")
    first = _fp(project, GLOB_MANIFEST)
    moved = tmp_path_factory.mktemp("moved")
    (moved / "in").mkdir()
    (moved / "in" / "one.txt").write_text("hello\n")
    assert _fp(moved, GLOB_MANIFEST).digest == first.digest


# -- status and lineage across runs -------------------------------------------------------------------------------


def test_stale_disabled_upstream_does_not_make_downstream_wait(project):
    pipeline.run(load(project))
    # `a` is now disabled and its config changed: it will not re-run, and `b` no longer reads it.
    text = dummy_stages.MANIFEST.replace(
        "data:\n  enabled: true\n  tasks: 2", "data:\n  enabled: false\n  tasks: 3"
    )
    (project / "llmforge.yaml").write_text(text)
    rows = {r.name: r for r in pipeline.status(load(project))}
    assert rows["a"].state == "stale" and "disabled" in rows["a"].reason
    assert "upstream a will re-run" not in rows["b"].reason


def test_force_of_a_stage_outside_the_plan_is_an_error(project):
    with pytest.raises(UserInputError, match="--force"):
        pipeline.run(load(project), ["a"], force=["c"])


def test_status_during_a_run_says_running_not_interrupted(project):
    loaded = load(project)
    sdir = project / "runs" / "a"
    sdir.mkdir(parents=True)
    (sdir / ".running").write_text('{"pid": 1}')
    with pipeline.project_lock(loaded):  # another `llmforge run` holds the project
        rows = {r.name: r for r in pipeline.status(loaded)}
    assert rows["a"].state == "running"
    rows = {r.name: r for r in pipeline.status(loaded)}
    assert rows["a"].state == "interrupted"


def test_lineage_flags_an_upstream_that_re_ran_since(project):
    pipeline.run(load(project))
    # `llmforge data process data.tasks=3`: only `a` re-runs, with different output; b and c still hold old data
    pipeline.run(load(project, "data.tasks=3"), ["a"], only=True)
    tree = pipeline.lineage_tree(load(project), project / "runs" / "c" / "c.txt")
    b = tree.inputs[0]
    a = b.inputs[0]
    assert not b.superseded
    assert a.stage == "a" and a.superseded
