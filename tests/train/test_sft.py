"""The `sft` stage end to end on a tiny project: full fine-tuning and LoRA, the model resolver, exact LoRA
resume, defaults and bad input."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from llmforge.errors import LLMForgeError
from llmforge.manifest import Manifest, load
from llmforge.model import Llama, load_pretrained, preset_config, save_pretrained
from llmforge.stage import StageContext
from llmforge.train.checkpoint import list_checkpoints
from llmforge.train.sft import run_sft
from tests.tokenizer.conftest import make_docs, train_and_export

FORMAT = r"^The answer is -?\d+\.$"


def _conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f"The answer is {a + b}."},
                ]
            }
        )
    return rows


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tokenizer with the ChatML template and a random tiny Llama saved with it."""
    root = tmp_path_factory.mktemp("sftbase")
    docs = make_docs(300) + [
        f"What is {a} plus {b}? The answer is {a + b}." for a in range(10) for b in range(10)
    ]
    tok = train_and_export(root / "tok", docs, vocab_size=600)
    from llmforge.tokenizer.info import load_tokenizer_info

    info = load_tokenizer_info(tok)
    torch.manual_seed(0)
    model = Llama(
        preset_config(
            "tiny",
            vocab_size=info.vocab_size,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            eos_token_id=info.eos_id,
        )
    )
    save_pretrained(model, root / "model", tokenizer_dir=tok, generation_config=info.generation_config())
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _conversations(600)))
    return {"tok": tok, "model": root / "model", "data": data}


def _project(root: Path, base, **sft) -> StageContext:
    root.mkdir(parents=True, exist_ok=True)
    section = {
        "enabled": True,
        "from": str(base["model"]),
        "data": [str(base["data"])],
        "max_steps": 30,
        "batch_size": 4,
        "seq_len": 64,
        "lr": 3e-3,
        "warmup_steps": 2,
        "eval_every": 0,
        "eval_batches": 2,
        "save_every": 0,
        "log_every": 5,
        "eval_prompts": 8,
        "max_new_tokens": 10,
        "answer_format": FORMAT,
        "val_fraction": 0.05,
    }
    section.update(sft)
    (root / "llmforge.yaml").write_text(
        yaml.safe_dump({"project": {"name": "t", "seed": 3, "device": "cpu"}, "sft": section})
    )
    loaded = load(root / "llmforge.yaml")
    out = loaded.runs_dir / "sft"
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(
        name="sft", loaded=loaded, out_dir=out, upstream={"tokenizer": {"tokenizer": base["tok"]}}
    )


@pytest.fixture(scope="module")
def full(tmp_path_factory, base):
    ctx = _project(tmp_path_factory.mktemp("full"), base, max_steps=60)
    return ctx, run_sft(ctx)


def test_full_fine_tuning_teaches_the_format(full, base):
    ctx, res = full
    m = res.metrics
    assert res.outputs == {"model": ctx.out_dir / "model"}
    assert m["format_rate_before"] == 0.0
    assert m["format_rate_after"] >= 0.75, json.loads((ctx.out_dir / "report.json").read_text())["samples"]
    assert m["val_loss"] < 2.0 and m["conversations"] == 600 and m["skipped_rows"] == 0
    assert 0 < m["packing_fill"] <= 1
    labels = dict(res.summary)
    assert "sft.from" in labels["started from"] and "held-out prompts" in labels["follows format"]
    report = json.loads((ctx.out_dir / "report.json").read_text())
    assert len(report["samples"]) == 8 and {"prompt", "reference", "before", "after"} <= set(
        report["samples"][0]
    )
    # the output is a self-describing HF checkpoint with the project tokenizer
    out = ctx.out_dir / "model"
    assert (out / "tokenizer.json").read_bytes() == (base["tok"] / "tokenizer.json").read_bytes()
    assert not (out / "trainer_state.pt").exists()


def test_the_loss_covers_assistant_tokens_only(full, base):
    """The base and the fine-tuned model differ most on the answers: prompt tokens carry no loss."""
    ctx, _ = full
    from llmforge.shards import ShardIndex

    index = ShardIndex.load(ctx.out_dir / "data")
    split = index.open("train")
    tokens, mask = split.document(0)
    assert mask is not None and 0 < int(mask.sum()) < len(tokens)


def test_lora_writes_a_peft_adapter_and_an_equal_merged_model(tmp_path, base):
    ctx = _project(tmp_path, base, lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}, max_steps=8)
    res = run_sft(ctx)
    assert set(res.outputs) == {"model", "adapter"}
    adapter = res.outputs["adapter"]
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert (
        cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["base_model_name_or_path"] == str(base["model"])
    )
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "trainer_state.pt").exists()
    assert res.metrics["trainable_params"] < res.metrics["params"] / 5

    from llmforge.model.lora import load_adapter

    adapted = load_pretrained(base["model"], dtype=torch.float32)
    load_adapter(adapted, adapter)
    merged = load_pretrained(res.outputs["model"], dtype=torch.float32)
    ids = torch.randint(5, 500, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted(ids), rtol=1e-4, atol=1e-5)
        # and the adapter changed the model
        assert not torch.allclose(merged(ids), load_pretrained(base["model"])(ids))


def test_lora_resume_continues_exactly(tmp_path, base):
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1}
    a = _project(tmp_path / "a", base, lora=lora, max_steps=6, save_every=3, eval_prompts=0)
    run_sft(a)
    b = _project(tmp_path / "b", base, lora=lora, max_steps=6, save_every=3, eval_prompts=0)
    step3 = dict(list_checkpoints(a.out_dir / "checkpoints"))[3]
    shutil.copytree(a.out_dir / "data", b.out_dir / "data")
    # an interrupted run of the same configuration: only its step-3 checkpoint exists
    (b.out_dir / "checkpoints").mkdir()
    shutil.copytree(step3, b.out_dir / "checkpoints" / step3.name)
    res = run_sft(b)
    assert res.metrics["steps"] == 6
    from safetensors.torch import load_file

    wa = load_file(a.out_dir / "adapter" / "adapter_model.safetensors")
    wb = load_file(b.out_dir / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_the_upstream_model_is_used_when_from_is_unset(tmp_path, base):
    ctx = _project(tmp_path, base, max_steps=3, eval_prompts=0)
    ctx.loaded.manifest.sft.from_ = None
    ctx.upstream["pretrain"] = {"model": base["model"]}
    res = run_sft(ctx)
    assert dict(res.summary)["started from"].endswith("(stage pretrain)")


def test_no_model_to_start_from_says_what_to_do(tmp_path, base):
    ctx = _project(tmp_path, base, max_steps=3)
    ctx.loaded.manifest.sft.from_ = None
    with pytest.raises(LLMForgeError, match=r"needs a model to start from.*sft\.from"):
        run_sft(ctx)


@pytest.mark.parametrize(
    ("over", "pattern"),
    [
        ({"lora": {"enabled": True, "target_modules": ["qq_proj"]}}, "sft.lora.target_modules: .*qq_proj"),
        ({"data": []}, "sft.data: no data files"),
        ({"from": "/nonexistent/model"}, "sft.from: .* not a Hugging Face model directory"),
        ({"seq_len": 4096}, "max_position_embeddings"),
        ({"answer_format": "(unclosed"}, "sft.answer_format"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_no_model(tmp_path, base, over, pattern):
    ctx = _project(tmp_path, base, max_steps=3, **over)
    with pytest.raises(LLMForgeError, match=pattern):
        run_sft(ctx)
    assert not (ctx.out_dir / "model").exists()


def test_sft_defaults_are_fine_tuning_defaults():
    m = Manifest.model_validate({"sft": {"enabled": True}})
    assert m.sft.resolved_lr() == 2e-5 and m.sft.weight_decay == 0.0
    assert not hasattr(m.sft, "spike_factor")  # spike detection is pretraining's opt-in
    lora = Manifest.model_validate({"sft": {"lora": {"enabled": True}}})
    assert lora.sft.resolved_lr() == 2e-4
    assert Manifest.model_validate({"sft": {"lr": 1e-3}}).sft.resolved_lr() == 1e-3


def test_qlora_nf4_base_trains_and_merges(tmp_path, base):
    ctx = _project(
        tmp_path,
        base,
        lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "quantize_base": "nf4"},
        max_steps=4,
        eval_prompts=0,
    )
    res = run_sft(ctx)
    assert set(res.outputs) == {"model", "adapter"}
    assert res.metrics["train_loss"] is not None and res.metrics["train_loss"] == res.metrics["train_loss"]
    merged = load_pretrained(res.outputs["model"], dtype=torch.float32)
    assert all(torch.isfinite(p).all() for p in merged.parameters())


@pytest.mark.slow
def test_two_processes_equal_one_with_double_batch(tmp_path, base):
    from llmforge.train.metrics import read_metrics

    common = {"max_steps": 4, "eval_prompts": 0, "log_every": 1, "eval_every": 2}
    one = _project(tmp_path / "one", base, batch_size=4, **common)
    two = _project(tmp_path / "two", base, batch_size=2, launcher="torchrun", nproc=2, **common)
    r1, r2 = run_sft(one), run_sft(two)
    assert r2.metrics["world_size"] == 2 and r1.metrics["tokens"] == r2.metrics["tokens"]

    def curve(ctx):
        rows = read_metrics(ctx.out_dir)
        return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]

    (l1, v1), (l2, v2) = curve(one), curve(two)
    assert len(l1) == 4 and l2 == pytest.approx(l1, rel=1e-5) and v2 == pytest.approx(v1, rel=1e-5)
