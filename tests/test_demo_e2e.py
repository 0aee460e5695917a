"""The Quickstart, end to end: `llmforge init demo && cd demo && llmforge run` on the tiny template.

This is the check a new user does first, so it runs the real stages (datatrove, sentencepiece, the training
loop) on the bundled corpus, with a shortened pretraining run to keep the suite fast.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from tests.cli import run_cli as cli

ROOT = Path(__file__).resolve().parents[1]
# Same overrides on every call: overrides are part of the fingerprint.
FAST = [
    "pretrain.max_steps=12",
    "pretrain.warmup_steps=2",
    "pretrain.eval_every=6",
    "pretrain.save_every=6",
    "distill.max_steps=8",
    "distill.warmup_steps=1",
]
STAGES = ("crawl", "data", "tokenizer", "pretrain", "sft", "reward", "align", "distill", "quantize", "serve")


@pytest.mark.slow
@pytest.mark.timeout(
    1800
)  # every stage, three times over; minutes on a quiet 2-core machine, more when loaded
def test_tiny_demo_pipeline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, _, err = cli(["init", "demo"], tmp_path, capsys)
    assert code == 0, err
    demo = tmp_path / "demo"
    assert cli(["validate"], demo, capsys)[0] == 0

    code, out, err = cli(["run", *FAST], demo, capsys)
    assert code == 0, out + err
    assert f"{len(STAGES)} stage(s) ran, 0 cached" in out
    # the crawl fetched the template's own site over loopback: robots.txt obeyed, a 404 counted
    crawl = json.loads((demo / "runs" / "crawl" / "lineage.json").read_text())["metrics"]
    assert crawl["pages_stored"] == 49 and crawl["robots_disallowed"] == 1, crawl
    assert crawl["errors_by_reason"] == {"http_404": 1}, crawl
    # the fine-tuned model follows the answer format of the SFT data on held-out prompts
    sft = json.loads((demo / "runs" / "sft" / "lineage.json").read_text())["metrics"]
    assert sft["format_rate_before"] == 0.0 and sft["format_rate_after"] >= 0.5, sft
    distill = json.loads((demo / "runs" / "distill" / "lineage.json").read_text())["metrics"]
    assert distill["val_kl"] >= 0 and distill["student_params"] < distill["teacher_params"], distill
    # the reward model ranks held-out pairs better than chance; GRPO measured its held-out reward before and after
    reward = json.loads((demo / "runs" / "reward" / "lineage.json").read_text())["metrics"]
    assert reward["val_accuracy"] > 0.5, reward
    align = json.loads((demo / "runs" / "align" / "lineage.json").read_text())["metrics"]
    assert 0 <= align["reward_before"] <= 1.2 and 0 <= align["reward_after"] <= 1.2, align
    assert "held_out_reward_exact_match_after" in align, align
    deploy = json.loads((demo / "runs" / "serve" / "lineage.json").read_text())["metrics"]
    assert deploy["engine"] == "local", deploy
    assert deploy["safety_probe_blocked"] is True, deploy
    # GPTQ: 4-bit, scored on held-out conversations, served by the deploy check
    quant = json.loads((demo / "runs" / "quantize" / "lineage.json").read_text())["metrics"]
    assert quant["spec"]["bits"] == 4 and quant["eval"]["source"] == "sft", quant
    assert quant["ppl_increase"] < 0.25 and quant["size_bytes"]["gptq"] < quant["size_bytes"]["original"] / 3
    assert deploy["model"].startswith("runs/quantize/model"), deploy

    # the run report: results, a loss curve per training stage, self-contained HTML, rebuilt identically
    md = (demo / "runs" / "report.md").read_text()
    assert "## Results" in md and "answer-format rate (held-out prompts) | 0% |" in md
    assert "| serve | first served answer: prompt → answer |" in md
    for stage in ("pretrain", "sft", "distill"):
        png = demo / "runs" / "report_assets" / f"{stage}-loss.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "data:image/png;base64," in (demo / "runs" / "report.html").read_text()
    first = (demo / "runs" / "report.md").read_bytes()
    assert cli(["report", *FAST], demo, capsys)[0] == 0
    assert (demo / "runs" / "report.md").read_bytes() == first

    # Second run: everything cached.
    code, out, err = cli(["run", *FAST], demo, capsys)
    assert code == 0 and f"0 stage(s) ran, {len(STAGES)} cached" in out, out + err

    # Editing one section re-runs that stage and the ones after it only.
    manifest = demo / "llmforge.yaml"
    manifest.write_text(manifest.read_text().replace("vocab_size: 1024", "vocab_size: 900"))
    code, out, err = cli(["run", *FAST], demo, capsys)
    assert code == 0, out + err
    assert f"{len(STAGES) - 2} stage(s) ran, 2 cached" in out
    assert "data cached" in out and "config changed: tokenizer.vocab_size" in out
    # pretrain re-ran from scratch on the new tokenizer: the old run's checkpoints were set aside, not resumed.
    assert (demo / "runs" / "pretrain" / "checkpoints.previous").is_dir()
    assert "belong to a different run" in err

    code, out, _ = cli(["status", "--json", *FAST], demo, capsys)
    states = {r["stage"]: r["state"] for r in json.loads(out)}
    assert {states[s] for s in STAGES} == {"done"}

    code, out, _ = cli(["lineage", "--json", "runs/pretrain/model"], demo, capsys)
    tree = json.loads(out)
    assert tree["stage"] == "pretrain" and tree["inputs"][0]["stage"] == "tokenizer"
    assert tree["inputs"][0]["inputs"][0]["stage"] == "data"
    assert "corpus" in tree["inputs"][0]["inputs"][0]["external_inputs"]

    # The model directory is a Hugging Face checkpoint with the project's tokenizer and chat template.
    transformers = pytest.importorskip("transformers")
    final = demo / "runs" / "pretrain" / "model"
    model = transformers.AutoModelForCausalLM.from_pretrained(final)
    tok = transformers.AutoTokenizer.from_pretrained(final)
    assert model.config.vocab_size >= len(tok)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>assistant\n")

    # The checkpoint carries the tokenizer's stop ids, so transformers/vLLM stop at <|im_end|> like llmforge.
    gen = json.loads((final / "generation_config.json").read_text())
    tok_meta = json.loads((final / "llmforge_tokenizer.json").read_text())
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert set(gen["eos_token_id"]) == {tok.eos_token_id, im_end}
    assert tok_meta

    # The Python-API example runs against the same project (all cached) and samples text.
    ns = runpy.run_path(str(ROOT / "examples" / "python_api.py"))
    text = ns["main"](str(demo), *FAST)
    assert text.startswith("The river") and len(text) > len("The river")
    assert "cached" in capsys.readouterr().out

    # --force recomputes: pretraining starts over instead of finding its finished checkpoint.
    code, out, err = cli(["train", "pretrain", "--force", *FAST], demo, capsys)
    assert code == 0, err
    assert "forced with --force" in err
    lineage = json.loads((demo / "runs" / "pretrain" / "lineage.json").read_text())
    assert lineage["metrics"]["steps"] == 12 and lineage["reason"] == "forced (--force)"

    # Shards made with other special ids than the tokenizer's are refused before training (a seam check).
    index_path = demo / "runs" / "tokenizer" / "shards" / "index.json"
    index = json.loads(index_path.read_text())
    index["eos_id"] = 0
    index_path.write_text(json.dumps(index))
    code, out, err = cli(["train", "pretrain", "--force", *FAST], demo, capsys)
    assert code == 1 and "does not match the tokenizer" in err and "eos_id" in err
