"""Every folder in examples/ runs as its README says, on a copy in a temporary directory.

* ``finetune-hf-llama``: a `transformers` Llama checkpoint made by the example's script → SFT → DPO → GPTQ → the
  serve deploy check, through `llmforge run`; then the Python-API example against the same (cached) project;
* ``crawl-to-corpus``: the example site served on loopback, crawled and cleaned into a corpus;
* ``small-template-on-cpu``: the GPU-scale `small` template validates, and its first steps run on CPU through
  the example's overrides.
"""

from __future__ import annotations

import gzip
import http.server
import json
import re
import runpy
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.cli import run_cli as cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TESTED = {"finetune-hf-llama", "crawl-to-corpus", "small-template-on-cpu"}
ANSWER = re.compile(r"^The answer is -?\d+\.$")


def _copy(name: str, dst: Path) -> Path:
    """The example as a user gets it from the repository (nothing a previous run generated)."""
    ignore = shutil.ignore_patterns("runs", "checkpoint", "data", "__pycache__", ".gitignore")
    return Path(shutil.copytree(EXAMPLES / name, dst, ignore=ignore))


def _metrics(project: Path, stage: str) -> dict:
    return json.loads((project / "runs" / stage / "lineage.json").read_text())["metrics"]


def test_every_example_is_documented_and_tested():
    folders = {p.name for p in EXAMPLES.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    assert folders == TESTED, "a new example needs a test here"
    for name in folders:
        readme = (EXAMPLES / name / "README.md").read_text()
        assert readme.startswith("# ") and "llmforge" in readme, name
    index = (EXAMPLES / "README.md").read_text()
    assert all(name in index for name in [*folders, "python_api.py"])


@pytest.mark.parametrize("name", ["finetune-hf-llama", "crawl-to-corpus"])
def test_example_manifests_validate(name, tmp_path, capsys):
    project = _copy(name, tmp_path / name)
    code, out, err = cli(["validate"], project, capsys)
    assert code == 0 and "is valid" in out, out + err


def test_python_api_reports_a_bad_override_without_a_traceback(tmp_path):
    project = _copy("crawl-to-corpus", tmp_path / "p")
    script = EXAMPLES / "python_api.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(project), "crawl.max_page=3"], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "crawl.max_page: unknown key; did you mean `max_pages`?" in proc.stderr
    assert not (project / "runs").exists()


# ----------------------------------------------------------------------------------------------------
# (a) fine-tune an existing Hugging Face Llama checkpoint: SFT + DPO + GPTQ + serve
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """The example project after `python prepare.py` (its checkpoint and data written, nothing run yet)."""
    project = _copy("finetune-hf-llama", tmp_path_factory.mktemp("ex") / "finetune-hf-llama")
    runpy.run_path(str(project / "prepare.py"))["main"](["--out", str(project)])
    return project


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_finetune_hf_llama_sft_dpo_gptq_serve(finetuned, capsys, monkeypatch):
    from safetensors import safe_open
    from transformers import AutoTokenizer, LlamaForCausalLM

    project = finetuned
    ckpt = project / "checkpoint"
    # prepare.py made a plain transformers checkpoint with a chat template that marks the assistant's tokens
    assert LlamaForCausalLM.from_pretrained(ckpt).config.num_hidden_layers == 2
    tok = AutoTokenizer.from_pretrained(ckpt)
    conv = [{"role": "user", "content": "What is 1 plus 2?"}, {"role": "assistant", "content": "3"}]
    mask = tok.apply_chat_template(conv, return_dict=True, return_assistant_tokens_mask=True)
    assert 0 < sum(mask["assistant_masks"]) < len(mask["input_ids"])

    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = cli(["run"], project, capsys)
    assert code == 0, out + err
    assert "6 stage(s) ran, 0 cached" in out, out

    # the project's tokenizer is the checkpoint's, ids unchanged; no model was pretrained
    assert (project / "runs/tokenizer/tokenizer/tokenizer.json").read_bytes() == (
        ckpt / "tokenizer.json"
    ).read_bytes()
    assert not (project / "runs" / "pretrain").exists()

    sft_lineage = json.loads((project / "runs/sft/lineage.json").read_text())
    assert ["started from", "checkpoint (sft.from)"] in sft_lineage["summary"]
    assert "checkpoint" in sft_lineage["inputs"]["external"]
    sft = sft_lineage["metrics"]
    assert sft["format_rate_before"] == 0.0 and sft["format_rate_after"] >= 0.75, sft

    align = _metrics(project, "align")
    assert align["method"] == "dpo" and align["policy_source"] == "stage sft", align
    assert align["accuracy_after"] > align["accuracy_before"], align
    assert align["margin_after"] > align["margin_before"], align

    quant = _metrics(project, "quantize")
    assert quant["from_source"] == "stage align" and quant["method"] == "gptq", quant
    assert set(quant["perplexity"]) == {"original", "gptq", "rtn"}
    assert quant["ppl_increase"] <= 0.5 and quant["size_bytes"]["gptq"] < quant["size_bytes"]["original"]
    # the standard GPTQ layout: packed int32 weights, fp16 scales, zeros and g_idx per quantized projection
    qdir = project / "runs/quantize/model"
    qc = json.loads((qdir / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"]) == ("gptq", 4, 64, True), qc
    with safe_open(str(qdir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        qweight = f.get_tensor("model.layers.0.mlp.down_proj.qweight")
    projs = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    projs += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    for layer in range(2):
        for p in projs:
            base = f"model.layers.{layer}.{p}"
            assert {f"{base}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx")} <= names, base
            assert f"{base}.weight" not in names, base
    assert str(qweight.dtype) == "torch.int32" and tuple(qweight.shape) == (128 * 4 // 32, 64)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (qdir / name).is_file(), name

    # the deploy check served the quantized model, and it answers in the format SFT taught
    deploy = json.loads((project / "runs/serve/deploy.json").read_text())
    assert deploy["model_source"] == "stage quantize" and deploy["engine"] == "local", deploy
    (turn,) = deploy["turns"]
    assert turn["user"] == "What is 2 plus 3?" and turn["completion_tokens"] > 0, turn
    assert ANSWER.match(turn["answer"]), turn

    code, out, err = cli(["run"], project, capsys)
    assert code == 0 and "0 stage(s) ran, 6 cached" in out, out + err


@pytest.mark.slow
def test_python_api_on_the_finetuned_project(finetuned, capsys):
    """examples/python_api.py: every stage cached, status and lineage read, the engine answers as served."""
    ran_before = (finetuned / "runs/serve/lineage.json").exists()  # by the test above, unless run alone
    ns = runpy.run_path(str(EXAMPLES / "python_api.py"))
    answer = ns["main"](str(finetuned))
    out = capsys.readouterr().out
    assert out.count(" cached ") == (6 if ran_before else 0), out
    assert (
        "final model runs/quantize/model was produced by:" in out
        and "sft" in out
        and "reads checkpoint" in out
    )
    # the offline engine and the gateway of the deploy check give the same greedy answer
    deploy = json.loads((finetuned / "runs/serve/deploy.json").read_text())
    assert answer == deploy["turns"][0]["answer"]


# ----------------------------------------------------------------------------------------------------
# (b) a data-only project: crawl a site on loopback, curate it into a corpus
# ----------------------------------------------------------------------------------------------------


class _Site(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        self.paths: list[str] = []
        site = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def do_GET(self):
                site.paths.append(self.path)
                super().do_GET()

            def log_message(self, *args):  # keep test output clean
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_crawl_to_corpus(tmp_path, capsys, monkeypatch):
    project = _copy("crawl-to-corpus", tmp_path / "crawl-to-corpus")
    site = _Site(project / "site")
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    seed = f"crawl.seeds=[http://127.0.0.1:{site.server_address[1]}/]"
    monkeypatch.setenv("COLUMNS", "200")
    try:
        code, out, err = cli(["run", seed], project, capsys)
    finally:
        site.shutdown()
        site.server_close()
    assert code == 0, out + err
    assert "2 stage(s) ran, 0 cached" in out

    # polite: robots.txt first, the disallowed folder never requested, every linked page once
    assert site.paths[0] == "/robots.txt" and not any(p.startswith("/private") for p in site.paths)
    crawl = _metrics(project, "crawl")
    assert crawl["pages_stored"] == 7 and crawl["robots_disallowed"] == 1 and crawl["errors"] == 0, crawl
    assert list((project / "runs/crawl/warc").glob("*.warc.gz"))

    data = _metrics(project, "data")
    assert data["docs_in"] == 7 and data["exact_duplicates_removed"] == 1 and data["pii_matches"] == 1, data
    assert data["docs_out"] == 5, data  # the mirror page is a duplicate, the link-only tags page is no text
    report = json.loads((project / "runs/data/report.json").read_text())
    dropped = {(step, Path(d["url"]).name) for step, rows in report["dropped_samples"].items() for d in rows}
    assert {("exact_dedup", "mirror.html"), ("language", "tags.html")} <= dropped, dropped

    docs = []
    for shard in sorted((project / "runs/data/output").glob("*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            docs += [json.loads(line) for line in f]
    assert len(docs) == 5
    text = "\n".join(d["text"] for d in docs)
    assert "harmonic constants" in text and "tides.help@example.org" not in text and "<EMAIL>" in text
    assert "<nav>" not in text and "private planning notes" not in text
    assert text.count("Run tidewatch today") == 1  # usage and its mirror: one copy kept

    # the Python-API example on a data-only project: runs (cached), reports, and has no model to sample
    ns = runpy.run_path(str(EXAMPLES / "python_api.py"))
    assert ns["main"](str(project), seed) == ""
    out = capsys.readouterr().out
    assert "crawl      cached" in out and "no model" in out


# ----------------------------------------------------------------------------------------------------
# (c) the GPU-scale `small` template: validates, and its first steps run on CPU at a reduced size
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_small_template_first_steps_on_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert cli(["init", "big", "--template", "small"], tmp_path, capsys)[0] == 0
    big = tmp_path / "big"
    code, out, err = cli(["validate"], big, capsys)
    assert code == 0 and "data, tokenizer, pretrain" in out, out + err
    shipped = (big / "llmforge.yaml").read_text()
    assert "preset: 124M" in shipped and "launcher: torchrun" in shipped and "nproc: 8" in shipped

    # as the README says: borrow the tiny template's notes and forum posts as data
    assert cli(["init", "scratch", "--template", "tiny"], tmp_path, capsys)[0] == 0
    shutil.copytree(tmp_path / "scratch/corpus/notes", big / "data/raw/notes")
    shutil.copy(tmp_path / "scratch/corpus/forum.jsonl", big / "data/raw/forum.jsonl")
    lines = (EXAMPLES / "small-template-on-cpu/cpu_overrides.txt").read_text().split()
    overrides = [x for x in lines if not x.startswith("#")]
    assert cli(["validate", *overrides], big, capsys)[0] == 0

    code, out, err = cli(["run", "pretrain", *overrides], big, capsys)
    assert code == 0, out + err
    assert "3 stage(s) ran, 0 cached" in out
    lineage = json.loads((big / "runs/pretrain/lineage.json").read_text())
    m = lineage["metrics"]
    assert m["steps"] == 2 and m["world_size"] == 1 and m["params"] < 2_000_000, m
    assert m["val_loss"] > 0
    cfg = json.loads((big / "runs/pretrain/model/config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (128, 2, 1024), cfg
    assert lineage["resolved_config"]["pretrain"]["launcher"] == "none"
    # the same project still prints its cluster launch script for the full-size run
    code, out, err = cli(["train", "pretrain", "--print-slurm"], big, capsys)
    assert code == 0 and "#SBATCH --gpus-per-node=8" in out and "--nproc-per-node 8" in out, out + err
