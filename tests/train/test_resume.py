"""Exact resume: a run SIGKILLed mid-way and resumed equals an uninterrupted run, bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from llmforge.train.checkpoint import list_checkpoints
from llmforge.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
SECTION = {"max_steps": 9, "save_every": 3, "eval_every": 0, "log_every": 1, "keep_last": 5}


def _worker(project: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.train._pretrain_worker", str(project), json.dumps(SECTION), *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def curve(run_dir: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in read_metrics(run_dir) if "loss" in r]


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    reference = _worker(ref)
    victim = _worker(killed, "5")  # stops making progress after 5 steps; checkpoint at step 3
    metrics = killed / "runs" / "pretrain" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        assert victim.poll() is None, victim.communicate()[1][-3000:]
        time.sleep(0.1)
    else:
        pytest.fail("the worker never reached step 5")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    ckpts = list_checkpoints(killed / "runs" / "pretrain" / "checkpoints")
    assert [s for s, _ in ckpts] == [3]
    assert not (killed / "runs" / "pretrain" / "model").exists()

    _finish(_worker(killed))  # resume: auto
    _finish(reference)

    run_a, run_b = ref / "runs" / "pretrain", killed / "runs" / "pretrain"
    assert [s for s, *_ in curve(run_b)] == list(range(1, 10))
    assert curve(run_b) == curve(run_a)  # bitwise: same floats
    wa, wb = (
        load_file(run_a / "model" / "model.safetensors"),
        load_file(run_b / "model" / "model.safetensors"),
    )
    assert wa.keys() == wb.keys()
    assert all((wa[k] == wb[k]).all() for k in wa)
    assert json.loads((run_b / "model" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
