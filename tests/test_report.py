"""The run report (runs/report.md + report.html + curves) and `llmforge report` / `llmforge run --serve`.

The pipeline here is the real stage names and sections with fast fake bodies that write what the real ones
write (lineage through the real runner, a ``metrics.jsonl`` step log in the format of
``llmforge.train.metrics``, the quantize table, the serve ``deploy.json``), so the report is built from a real
runs folder in a second.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib

import pytest

from llmforge import pipeline, report
from llmforge.cli import common
from llmforge.manifest import load
from llmforge.pipeline import StageSpec
from llmforge.stage import StageContext, StageResult
from tests.cli import run_cli

# ---------------------------------------------------------------------------------------------------- fakes

PRETRAIN_VAL = [(10, 300.0), (20, 150.0)]  # (step, val_ppl) of the fake pretrain's evaluations


def _fail_if_asked(name: str) -> None:
    import os

    from llmforge.errors import StageError

    if os.environ.get("LLMFORGE_TEST_FAIL") == name:
        raise StageError(f"{name} blew up on purpose")


def _log(ctx: StageContext, rows: list[dict]) -> None:
    with open(ctx.out_dir / "metrics.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write('{"step": 99, "loss": ')  # a line cut by a kill: skipped, not fatal


def _model(ctx: StageContext) -> dict:
    d = ctx.out_dir / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"stage": ctx.name}))
    return {"model": d}


def _train_rows(steps: int, start: float) -> list[dict]:
    return [
        {"step": s, "loss": start / (1 + 0.1 * s), "lr": 1e-3, "tokens": 64 * s} for s in range(1, steps + 1)
    ]


def fake_pretrain(ctx: StageContext) -> StageResult:
    _fail_if_asked("pretrain")
    rows = _train_rows(20, 6.9)
    rows += [{"step": s, "val_loss": math.log(p), "val_ppl": p} for s, p in PRETRAIN_VAL]
    _log(ctx, rows)
    ppl = PRETRAIN_VAL[-1][1]
    metrics = {"val_loss": math.log(ppl), "val_ppl": ppl, "tokens_per_s": 12079.3}
    return StageResult(outputs=_model(ctx), metrics=metrics, summary=[("steps", "20")])


def fake_sft(ctx: StageContext) -> StageResult:
    _fail_if_asked("sft")
    _log(ctx, _train_rows(10, 3.0))
    metrics = {"val_loss": 0.35, "format_rate_before": 0.0, "format_rate_after": 0.9375}
    return StageResult(outputs=_model(ctx), metrics=metrics, summary=[("follows format", "0% → 94%")])


def fake_reward(ctx: StageContext) -> StageResult:
    _log(ctx, [*_train_rows(8, 0.7), {"step": 8, "val_loss": 0.4, "val_accuracy": 0.75}])
    metrics = {"val_accuracy": 0.75, "accuracy_before": 0.5, "accuracy_after": 0.75}
    return StageResult(outputs=_model(ctx), metrics=metrics)


def fake_align(ctx: StageContext) -> StageResult:
    _fail_if_asked("align")
    _log(ctx, [{"step": s, "loss": 0.1, "reward": 0.2 + 0.01 * s} for s in range(1, 26)])
    metrics = {"method": "grpo", "held_out_reward_before": 0.25, "held_out_reward_after": 0.5}
    return StageResult(outputs=_model(ctx), metrics=metrics)


def fake_distill(ctx: StageContext) -> StageResult:
    _log(ctx, _train_rows(6, 2.0))
    metrics = {
        "val_kl": 0.0123,
        "val_ce_student": 0.61,
        "val_ce_teacher": 0.42,
        "teacher_params": 918656,
        "student_params": 690000,
        "teacher_layers": 4,
        "student_layers": 3,
    }
    return StageResult(outputs=_model(ctx), metrics=metrics)


def fake_quantize(ctx: StageContext) -> StageResult:
    _fail_if_asked("quantize")
    ppl = {"original": 2.0, "gptq": 2.05, "rtn": 2.3}
    table = {
        "title": "Quantization (held-out perplexity)",
        "columns": ["model", "perplexity"],
        "rows": [["original", 2.0], ["GPTQ (gptqmodel)", 2.05], ["round-to-nearest", 2.3]],
    }
    metrics = {
        "method": "gptq",
        "perplexity": ppl,
        "ppl_increase": 0.025,
        "gptq_beats_rtn": True,
        "table": table,
    }
    return StageResult(outputs=_model(ctx), metrics=metrics, tables=[table])


SERVED = "The answer is 42."


def fake_serve(ctx: StageContext) -> StageResult:
    deploy = {
        "turns": [{"user": "What is 40 + 2?", "answer": SERVED, "ttft_s": 0.0312, "tokens_per_s": 250.0}]
    }
    path = ctx.out_dir / "deploy.json"
    path.write_text(json.dumps(deploy))
    metrics = {"engine": "local", "ttft_s": 0.0312, "tokens_per_s": 250.0, "answers": [SERVED]}
    return StageResult(outputs={"deploy": path}, metrics=metrics)


_CHAIN = ("pretrain", "sft", "reward", "align", "distill", "quantize", "serve")
STAGES = tuple(
    StageSpec(
        name,
        ("model", "pretrain") if name == "pretrain" else (name,),
        _CHAIN[:i],
        f"tests.test_report:fake_{name}",
        spec.description,
        key_metrics=spec.key_metrics,
    )
    for i, name in enumerate(_CHAIN)
    for spec in [pipeline.Pipeline().get(name)]
)

MANIFEST = """\
project:
  name: reportdemo
pretrain: {enabled: true}
sft: {enabled: true}
reward: {enabled: true}
align: {enabled: true}
distill: {enabled: %s}
quantize: {enabled: true}
serve: {enabled: true}
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "llmforge.yaml").write_text(MANIFEST % "true")
    monkeypatch.setattr(pipeline, "STAGES", STAGES)
    monkeypatch.setattr(common.state, "debug", False)
    monkeypatch.delenv("LLMFORGE_TEST_FAIL", raising=False)
    return tmp_path


def _run(project) -> None:
    pipeline.run(load(project / "llmforge.yaml"))


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG, checking its signature and the IHDR chunk's CRC (a valid PNG, not a name)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16 : 16 + length]
    (crc,) = struct.unpack(">I", data[16 + length : 20 + length])
    assert zlib.crc32(kind + body) == crc
    assert data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", body[:8])


# ---------------------------------------------------------------------------------------------------- tests


def test_full_run_report_sections_figures_and_curves(project):
    _run(project)
    w = report.write(load(project / "llmforge.yaml"))
    md = w.markdown.read_text()
    assert md.startswith("# reportdemo: run report")
    for head in ("## Results", "## Stages", *(f"### {n}" for n in _CHAIN)):
        assert f"\n{head}\n" in md, head
    rows = {tuple(c.strip() for c in line.strip("|").split("|")) for line in md.splitlines()}
    # before/after figures, each read from the stage's own record
    assert ("pretrain", "held-out perplexity", "300", "150", "first evaluation at step 10") in rows
    assert ("sft", "answer-format rate (held-out prompts)", "0%", "94%", "") in rows
    assert ("reward", "preference accuracy (held-out pairs)", "50%", "75%", "") in rows
    assert ("align", "held-out reward", "0.25", "0.5", "") in rows
    assert ("distill", "held-out CE: teacher → student", "0.42", "0.61", "KL(teacher‖student) 0.0123") in rows
    assert ("distill", "parameters: teacher → student", "918,656", "690,000", "4 → 3 layers, 75%") in rows
    assert (
        "quantize",
        "held-out perplexity: original → GPTQ",
        "2",
        "2.05",
        "round-to-nearest 2.3 (GPTQ is better)",
    ) in rows
    assert (
        "serve",
        "first served answer: prompt → answer",
        "What is 40 + 2?",
        SERVED,
        "first token in 0.0312 s, 250 tokens/s after it",
    ) in rows
    assert "| round-to-nearest | 2.3 |" in md  # the quantize table itself
    assert "tokens_per_s=12,079" in md  # key metrics in full, not 1.208e+04
    # each stage's wall time and artifacts, straight from lineage.json
    lin = json.loads((project / "runs" / "pretrain" / "lineage.json").read_text())
    assert lin["fingerprint"] in md and "`runs/pretrain/model`" in md
    # one loss curve per training stage, and the alignment reward curve; all valid PNGs, referenced by the md
    names = sorted(p.name for p in w.images)
    expected = sorted(
        [f"{n}-loss.png" for n in ("pretrain", "sft", "reward", "align", "distill")] + ["align-reward.png"]
    )
    assert names == expected
    for p in w.images:
        assert _png_size(p.read_bytes()) == (640, 360)
        assert f"]({report.ASSETS}/{p.name})" in md
    curves = {c.filename: c for s in w.report.stages for c in s.curves}
    assert curves["pretrain-loss.png"].series["held-out loss"] == [
        (10.0, math.log(300.0)),
        (20.0, math.log(150.0)),
    ]
    assert len(curves["pretrain-loss.png"].series["train loss"]) == 20  # the cut last line was skipped
    reward = curves["align-reward.png"].series
    assert reward["reward"][0] == (1.0, pytest.approx(0.21)) and len(reward) == 2  # + its moving mean
    assert reward["mean of the last 10 steps"][-1][1] == pytest.approx(
        sum(0.2 + 0.01 * s for s in range(16, 26)) / 10
    )


def test_html_is_self_contained(project):
    _run(project)
    w = report.write(load(project / "llmforge.yaml"))
    page = w.html.read_text()
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page, flags=re.I)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs), refs
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    assert not re.search(r"https?://", page)
    import base64

    embedded = [base64.b64decode(r.split(",", 1)[1]) for r in refs]
    assert sorted(embedded) == sorted(p.read_bytes() for p in w.images)
    assert "The answer is 42." in page and "&lt;" not in SERVED  # content is escaped, not markup


def test_report_command_regenerates_identically(project, capsys):
    code, out, err = run_cli(["run"], project, capsys)
    assert code == 0, err
    assert "Report: " in out and "report.md" in out
    runs = project / "runs"
    files = [
        runs / report.REPORT_MD,
        runs / report.REPORT_HTML,
        *sorted((runs / report.ASSETS).glob("*.png")),
    ]
    first = {p: p.read_bytes() for p in files}
    (runs / report.REPORT_MD).unlink()
    (runs / report.ASSETS / "sft-loss.png").unlink()
    code, out, err = run_cli(["report"], project, capsys)
    assert code == 0, err
    assert "report of 7 stage(s)" in out and "held-out perplexity" in out
    assert {p: p.read_bytes() for p in files} == first
    # a cached re-run rewrites the same report too
    code, out, _ = run_cli(["run"], project, capsys)
    assert code == 0 and "0 stage(s) ran, 7 cached" in out
    assert {p: p.read_bytes() for p in files} == first


def test_failed_run_still_reports_what_ran_and_the_failure(project, capsys, monkeypatch):
    monkeypatch.setenv("LLMFORGE_TEST_FAIL", "quantize")
    code, out, err = run_cli(["run"], project, capsys)
    assert code != 0 and "quantize blew up on purpose" in err
    assert "Summary" in out and "5 stage(s) ran" in out  # what did run, then the error
    assert re.search(r"│ quantize +│ failed", out)
    md = (project / "runs" / "report.md").read_text()
    assert "**Not finished: quantize.**" in md
    assert "### quantize\n\n**failed**" in md and "StageError: quantize blew up on purpose" in md
    assert "### serve" not in md  # never ran: left out
    assert "### distill\n\n**done**" in md
    assert (project / "runs" / "report_assets" / "distill-loss.png").exists()
    html = (project / "runs" / "report.html").read_text()
    assert 'class="failed">failed</span>' in html


def test_partial_and_odd_runs_folders_do_not_crash(project, capsys):
    # nothing has run: still a report, saying so
    code, _, err = run_cli(["report"], project, capsys)
    assert code == 0, err
    assert "No stage has run yet" in (project / "runs" / "report.md").read_text()
    _run(project)
    runs = project / "runs"
    # an interrupted stage (a .running marker, no lineage), an unreadable metrics log, a lineage with odd fields
    (runs / "quantize" / "lineage.json").unlink()
    (runs / "quantize" / ".running").write_text("{}")
    (runs / "sft" / "metrics.jsonl").write_bytes(b"\xff\xfe not json\n")
    lin = json.loads((runs / "align" / "lineage.json").read_text())
    lin["metrics"] = {"held_out_reward_after": "nan", "method": None}
    lin["summary"] = [["only one cell"], "not a row"]
    (runs / "align" / "lineage.json").write_text(json.dumps(lin))
    lin = json.loads((runs / "reward" / "lineage.json").read_text())
    lin["summary"] = 5  # not rows at all
    (runs / "reward" / "lineage.json").write_text(json.dumps(lin))
    # the previous report's curve for sft must not linger once sft has no curve
    report.write(load(project / "llmforge.yaml"))
    w = report.write(load(project / "llmforge.yaml"))
    md = w.markdown.read_text()
    assert "### quantize\n\n**interrupted**" in md
    assert not (runs / report.ASSETS / "sft-loss.png").exists()
    assert "### serve" in md  # its record is still on disk; it shows as stale
    assert "| align | held-out reward |" not in md  # a non-number is not a result
    assert "### reward\n\n**failed**" in md and "unreadable lineage.json: TypeError" in md


def test_disabled_stage_is_left_out(project):
    _run(project)
    (project / "llmforge.yaml").write_text(MANIFEST % "false")
    w = report.write(load(project / "llmforge.yaml"))
    md = w.markdown.read_text()
    assert "### distill" not in md and "| distill |" not in md
    assert not (project / "runs" / report.ASSETS / "distill-loss.png").exists()
    assert "### quantize" in md


def test_run_serve_serves_the_final_model_after_a_successful_run(project, capsys, monkeypatch):
    from llmforge.serve import cli as serve_cli

    calls = []

    def fake_serve_cmd(**kwargs):
        assert (project / "runs" / "serve" / "lineage.json").exists()  # after the pipeline, not before
        calls.append(kwargs)

    monkeypatch.setattr(serve_cli, "serve", fake_serve_cmd)
    code, _, err = run_cli(["run", "--serve", "serve.port=9123"], project, capsys)
    assert code == 0, err
    assert len(calls) == 1
    assert calls[0]["overrides"] == ["serve.port=9123"] and str(calls[0]["manifest"]) == "llmforge.yaml"
    assert calls[0]["model"] is None  # the same model `llmforge serve` picks
    monkeypatch.setenv("LLMFORGE_TEST_FAIL", "align")
    code, _, err = run_cli(["run", "--serve", "--force", "align"], project, capsys)
    assert code != 0 and "align blew up" in err
    assert len(calls) == 1  # a failed pipeline serves nothing
