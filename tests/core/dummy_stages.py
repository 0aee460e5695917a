"""Dummy stages for runner tests: each writes a file derived from its config and its upstream output.

Calls are appended to the file named by $LLMFORGE_TEST_CALLS so tests can see what actually ran.
"""

from __future__ import annotations

import json
import os
import time

from llmforge.pipeline import StageSpec
from llmforge.stage import StageContext, StageResult


def _record(name: str) -> None:
    calls = os.environ.get("LLMFORGE_TEST_CALLS")
    if calls:
        with open(calls, "a") as f:
            f.write(name + "\n")


def stage_a(ctx: StageContext) -> StageResult:
    _record("a")
    if os.environ.get("LLMFORGE_TEST_SLEEP_A"):
        (ctx.out_dir / "partial.txt").write_text("half-written")
        time.sleep(float(os.environ["LLMFORGE_TEST_SLEEP_A"]))
    if os.environ.get("LLMFORGE_TEST_CRASH_A"):
        raise RuntimeError("boom in a")
    out = ctx.out_dir / "a.txt"
    # Output depends only on data.tasks: changing data.workers re-runs `a` but leaves its output identical.
    out.write_text(f"tasks={ctx.manifest.data.tasks}\n")
    return StageResult(
        outputs={"a": out}, metrics={"docs": 3, "tasks": ctx.manifest.data.tasks}, summary=[("docs", "3")]
    )


def stage_b(ctx: StageContext) -> StageResult:
    _record("b")
    src = ctx.input("a", "a").read_text()
    d = ctx.out_dir / "bdir"
    d.mkdir(exist_ok=True)
    (d / "b.txt").write_text(src + f"vocab={ctx.manifest.tokenizer.vocab_size}\n")
    (d / "meta.json").write_text(json.dumps({"ok": True}))
    return StageResult(outputs={"b": d}, metrics={"vocab": ctx.manifest.tokenizer.vocab_size})


def stage_c(ctx: StageContext) -> StageResult:
    _record("c" + ("!" if ctx.options.get("force") else ""))
    src = (ctx.input("b", "b") / "b.txt").read_text()
    out = ctx.out_dir / "c.txt"
    out.write_text(src + f"steps={ctx.manifest.pretrain.max_steps}\n")
    return StageResult(outputs={"c": out}, metrics={"loss": 1.25})


STAGES = (
    StageSpec("a", ("data",), (), "tests.core.dummy_stages:stage_a", "dummy a"),
    StageSpec("b", ("tokenizer",), ("a",), "tests.core.dummy_stages:stage_b", "dummy b"),
    StageSpec("c", ("model", "pretrain"), ("b",), "tests.core.dummy_stages:stage_c", "dummy c"),
    StageSpec("d", ("sft",), ("c",), None, "dummy unbuilt d"),
)

MANIFEST = """\
project:
  name: test
data:
  enabled: true
  tasks: 2
  workers: 2
tokenizer:
  enabled: true
  vocab_size: 512
pretrain:
  enabled: true
  max_steps: 10
  warmup_steps: 1
"""
