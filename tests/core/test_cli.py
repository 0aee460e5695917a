"""The CLI edge: command map, exit codes, clean errors, init/validate/run/status/lineage."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from llmforge.cli import common
from llmforge.cli.app import app
from tests.cli import run_cli as run_main
from tests.core import dummy_stages

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.setattr(common.state, "debug", False)  # another test's --debug sticks to this process


def test_help_lists_every_group():
    res = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for cmd in (
        "init",
        "validate",
        "run",
        "status",
        "lineage",
        "report",
        "data",
        "train",
        "align",
        "quantize",
        "serve",
        "chat",
    ):
        assert f" {cmd} " in res.output, cmd


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys; from llmforge.cli.app import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit: pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'datatrove', 'vllm', 'sentencepiece', 'numpy') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
    for group in ("data", "train", "align"):
        code2 = code.replace("['--help']", f"[{group!r}, '--help']")
        out = subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True, timeout=60)
        assert "HEAVY []" in out.stdout, (group, out.stdout + out.stderr)


def test_python_dash_m_and_version():
    out = subprocess.run(
        [sys.executable, "-m", "llmforge", "--version"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.startswith("llmforge ")


def test_typo_exits_2_and_names_key_without_traceback(dummy, capsys):
    (dummy / "llmforge.yaml").write_text(dummy_stages.MANIFEST.replace("max_steps", "max_stpes"))
    code, _, err = run_main(["validate"], dummy, capsys)
    assert code == 2
    assert "pretrain.max_stpes: unknown key" in err and "max_steps" in err
    assert "Traceback" not in err


def test_debug_shows_traceback(dummy, capsys):
    code, _, err = run_main(["--debug", "validate", "pretrain.lr=-3"], dummy, capsys)
    assert code == 2 and "Traceback" in err and "pretrain.lr" in err


def test_missing_manifest_hint(tmp_path, capsys):
    code, _, err = run_main(["status"], tmp_path, capsys)
    assert code == 2 and "manifest not found" in err and "llmforge init" in err


def test_run_status_lineage_through_cli(dummy, capsys):
    code, out, _ = run_main(["run"], dummy, capsys)
    assert code == 0
    assert "3 stage(s) ran, 0 cached" in out
    code, out, _ = run_main(["run"], dummy, capsys)
    assert code == 0 and "0 stage(s) ran, 3 cached" in out
    code, out, _ = run_main(["run", "tokenizer.vocab_size=640"], dummy, capsys)
    assert "2 stage(s) ran, 1 cached" in out and "config changed: tokenizer.vocab_size" in out

    code, out, _ = run_main(["status", "--json"], dummy, capsys)
    rows = {r["stage"]: r for r in json.loads(out)}
    assert rows["a"]["state"] == "done" and rows["b"]["state"] == "stale"  # file still says 512
    assert rows["d"]["state"] == "not built"
    code, out, _ = run_main(["status"], dummy, capsys)
    assert code == 0 and "fingerprint" in out

    code, out, _ = run_main(["lineage", "runs/c/c.txt"], dummy, capsys)
    assert code == 0 and "c " in out and "b " in out and "a " in out and "overrides" in out
    code, out, _ = run_main(["lineage", "--json", "runs/c/c.txt"], dummy, capsys)
    tree = json.loads(out)
    assert tree["stage"] == "c" and tree["inputs"][0]["stage"] == "b"

    code, out, _ = run_main(["run", "--dry-run", "--force", "a"], dummy, capsys)
    assert code == 0 and "forced" in out


def test_run_named_stage_and_unknown_stage(dummy, capsys):
    code, out, _ = run_main(["run", "b"], dummy, capsys)
    assert code == 0 and "2 stage(s) ran" in out
    code, _, err = run_main(["run", "nope"], dummy, capsys)
    assert code == 2 and "unknown stage 'nope'" in err


def test_init_list_and_scaffold(tmp_path, capsys):
    code, out, _ = run_main(["init", "--list"], tmp_path, capsys)
    assert code == 0 and "tiny" in out and "small" in out
    code, out, _ = run_main(["init", "proj"], tmp_path, capsys)
    assert code == 0
    text = (tmp_path / "proj" / "llmforge.yaml").read_text()
    assert 'name: "proj"' in text and "{{" not in text
    assert (tmp_path / "proj" / "README.md").read_text().startswith("# proj")
    code, _, err = run_main(["init", "proj"], tmp_path, capsys)
    assert code == 2 and "not empty" in err and "--force" in err
    (tmp_path / "proj" / "mine.txt").write_text("keep me")
    code, _, _ = run_main(["init", "proj", "--force"], tmp_path, capsys)
    assert code == 0 and (tmp_path / "proj" / "mine.txt").read_text() == "keep me"
    code, _, err = run_main(["init", "x", "--template", "huge"], tmp_path, capsys)
    assert code == 2 and "unknown template 'huge'" in err


def test_validate_explain(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = run_main(["validate", "--explain", "--section", "pretrain"], tmp_path, capsys)
    assert code == 0 and "pretrain.warmup_steps" in out and "Linear warmup" in out


def test_scaffolded_templates_validate(tmp_path, capsys):
    for name in ("tiny", "small"):
        code, _, _ = run_main(["init", name, "--template", name], tmp_path, capsys)
        assert code == 0
        code, out, err = run_main(["validate"], tmp_path / name, capsys)
        assert code == 0, err
        assert "is valid" in out


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--no-such-option"],
        ["status", "-m"],
        ["no-such-command"],
        ["--progress", "fancy", "validate"],
        ["train", "pretrain", "--nproc", "two"],
    ],
)
def test_usage_errors_exit_2_without_traceback(dummy, capsys, args):
    code, _, err = run_main(args, dummy, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert err.strip()


def test_force_outside_the_plan_is_a_clean_error(dummy, capsys):
    code, _, err = run_main(["run", "a", "--force", "c"], dummy, capsys)
    assert code == 2 and "--force c" in err and "Traceback" not in err


def test_ctrl_c_exits_130_with_the_resume_hint(dummy, capsys, monkeypatch):
    from llmforge import pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run", interrupted)
    code, _, err = run_main(["run"], dummy, capsys)
    assert code == 130
    assert "interrupted" in err and "Traceback" not in err
