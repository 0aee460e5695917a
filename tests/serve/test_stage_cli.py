"""The deploy-check stage, `llmforge serve` and `llmforge chat` (through a pseudo-terminal)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pexpect
import pytest
import yaml

from .conftest import client, local_engine, start_gateway

ROOT = Path(__file__).resolve().parents[2]
# the root app with this package's commands registered (what llmforge.cli.stages.register will do)
CLI = [sys.executable, "-c", "import sys; from llmforge.cli import app as A; from llmforge.serve.cli import register; "
       "register(A.app); A.main(sys.argv[1:])"]  # fmt: skip


def project(root: Path, **serve) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data = {"project": {"name": "demo", "device": "cpu"}, "serve": {"enabled": True, **serve}}
    (root / "llmforge.yaml").write_text(yaml.safe_dump(data))
    return root / "llmforge.yaml"


def _ctx(manifest: Path, upstream=None):
    from llmforge.manifest import load
    from llmforge.stage import StageContext

    loaded = load(manifest)
    out = loaded.runs_dir / "serve"
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(name="serve", loaded=loaded, out_dir=out, upstream=upstream or {})


def test_run_serve_deploy_check(tmp_path, model_dir, tokenizer):
    from llmforge.serve.stage import run_serve

    ctx = _ctx(
        project(
            tmp_path / "p", model=str(model_dir), smoke=["Hello!", "Name three colours."], smoke_max_tokens=8
        )
    )
    result = run_serve(ctx)
    report = json.loads(result.outputs["deploy"].read_text())
    assert report["engine"] == "local" and report["served_model_name"] == "demo"
    assert [t["user"] for t in report["turns"]] == ["Hello!", "Name three colours."]
    assert all(t["ttft_s"] > 0 and t["completion_tokens"] >= 1 for t in report["turns"])
    assert result.metrics["answers"] == [t["answer"] for t in report["turns"]]
    assert result.metrics["ttft_s"] > 0 and result.metrics["engine"] == "local"
    # the first answer is the greedy answer of the same request sent directly
    srv = start_gateway(local_engine(model_dir), served_model_name="demo")
    try:
        direct = client(srv).chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0
        )
    finally:
        srv.stop()
    assert report["turns"][0]["answer"] == direct.choices[0].message.content


def test_run_serve_takes_the_newest_upstream_model(tmp_path, model_dir, monkeypatch):
    from llmforge import pipeline
    from llmforge.serve.stage import run_serve

    # the registration the lead adds: serve needs every model-producing stage
    stages = tuple(
        dataclasses.replace(s, needs=("tokenizer", "pretrain", "sft", "align", "distill", "quantize"))
        if s.name == "serve" else s
        for s in pipeline.STAGES
    )  # fmt: skip
    monkeypatch.setattr(pipeline, "STAGES", stages)
    ctx = _ctx(project(tmp_path / "p", smoke=["Hi"], smoke_max_tokens=2),
               upstream={"pretrain": {"model": tmp_path / "missing"}, "sft": {"model": model_dir}})  # fmt: skip
    result = run_serve(ctx)
    assert result.metrics["model"].endswith("(stage sft)")


def test_run_serve_errors_name_the_knob(tmp_path):
    from llmforge.errors import StageInputError
    from llmforge.serve.stage import run_serve

    with pytest.raises(StageInputError, match=r"serve\.model"):
        run_serve(_ctx(project(tmp_path / "p", model=str(tmp_path))))


def _spawn(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "LLMFORGE_PROGRESS": "plain"}
    env.pop("LLMFORGE_API_KEY", None)
    env.update(kw.pop("env", {}))
    return pexpect.spawn(
        CLI[0], CLI[1:] + args, env=env, encoding="utf-8", timeout=120, cwd=kw.pop("cwd", ROOT)
    )


def test_llmforge_serve_prints_where_and_key_state_and_stops_on_sigterm(tmp_path, model_dir):
    from llmforge.serve.server import free_port

    port = free_port()
    manifest = project(tmp_path / "p", api_key_env="DEMO_KEY")
    child = _spawn(["serve", "-m", str(manifest), "--port", str(port), "--model", str(model_dir)],
                   env={"DEMO_KEY": "k"})  # fmt: skip
    try:
        child.expect(f"http://127.0.0.1:{port}/v1")
        child.expect(r"API key required \(from \$DEMO_KEY\)")
        child.expect("ready")
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"authorization": "Bearer k"}).json()
        assert models["data"][0]["id"] == "demo"
        child.kill(signal.SIGTERM)
        child.expect("stopped")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        child.terminate(force=True)


def test_llmforge_serve_user_errors_exit_2(tmp_path):
    manifest = project(tmp_path / "p", api_key_env="UNSET_VARIABLE_X")
    r = subprocess.run([*CLI, "serve", "-m", str(manifest), "--model", str(tmp_path)], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "--model" in r.stderr and "Traceback" not in r.stderr


def test_llmforge_chat_in_a_pty_against_a_url(real_server):
    c = client(real_server)

    def greedy(messages):
        return (
            c.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
            .choices[0]
            .message.content
        )

    child = _spawn(["chat", "--url", real_server.url + "/v1", "--max-tokens", "6", "--temperature", "0"])
    try:
        child.expect("chatting with 'tiny'")
        child.expect("you> ")
        child.sendline("hello there")
        first = greedy([{"role": "user", "content": "hello there"}])
        child.expect_exact("model> " + first)
        child.expect("you> ")
        child.sendline("and again")  # the history is sent: the answer is the two-turn conversation's
        second = greedy([{"role": "user", "content": "hello there"}, {"role": "assistant", "content": first},
                         {"role": "user", "content": "and again"}])  # fmt: skip
        child.expect_exact(second)
        child.expect("you> ")
        child.sendline("/history")
        child.expect_exact("[user] hello there")
        child.expect_exact("[assistant] " + first)
        child.expect("you> ")
        child.sendline("/system You are terse.")
        child.expect_exact("(system prompt set)")
        child.expect("you> ")
        child.sendline("/reset")
        child.expect_exact("(conversation reset)")
        child.expect("you> ")
        child.sendline("hello there")
        child.expect_exact(
            greedy(
                [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello there"}]
            )
        )
        child.expect("you> ")
        child.sendeof()
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        child.terminate(force=True)


def test_llmforge_chat_serves_the_project_model_itself(tmp_path, model_dir):
    manifest = project(tmp_path / "p")
    child = _spawn(["chat", "-m", str(manifest), "--model", str(model_dir), "--max-tokens", "4"])
    try:
        child.expect("chatting with 'demo'")
        child.expect("you> ")
        t0 = time.monotonic()
        child.sendline("hi")
        child.expect("model> ")
        child.expect("you> ")
        assert time.monotonic() - t0 < 60
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        child.terminate(force=True)
