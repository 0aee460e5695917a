"""Tiny, hermetic fixtures for the RL recipes: a ChatML tokenizer, a random tiny Llama, an SFT'd start point
that follows the arithmetic answer format but often gets the sum wrong, prompt files, and an `align` project."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import yaml

from llmforge.model import Llama, preset_config, save_pretrained
from llmforge.stage import StageContext
from llmforge.train.recipe import ResolvedModel

ANSWER = r"The answer is (-?\d+)"
DIGITS = 3  # operands 0..2: small enough for a tiny model to learn within seconds


FORMAT = r"The answer is -?\d+\.?"
FORMATTED_SHARE = 0.25  # of the SFT answers in the rewarded format; the rest are bare numbers


def conversations(n: int, seed: int = 0) -> list[dict]:
    """Arithmetic chats answered "The answer is N." only a quarter of the time (else "N"): the SFT model
    then mostly answers bare numbers greedily but samples the rewarded format often enough for RL to find."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(DIGITS), rng.randrange(DIGITS)
        reply = f"The answer is {a + b}." if rng.random() < FORMATTED_SHARE else f"{a + b}"
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": reply},
                ]
            }
        )
    return rows


def prompt_rows(repeat: int = 4) -> list[dict]:
    """Every "What is a plus b?" prompt with its `answer` field, each ``repeat`` times in different wording
    (so the held-out split holds pairs the policy never trained on in that wording)."""
    rows = []
    for a in range(DIGITS):
        for b in range(DIGITS):
            for k in range(repeat):
                q = [
                    f"What is {a} plus {b}?",
                    f"What is {a} plus {b} ?",
                    f"what is {a} plus {b}?",
                    f"What is {a} plus {b}?!",
                ][k % 4]
                rows.append({"prompt": q, "answer": a + b})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_base(root: Path) -> dict[str, Path]:
    """A ChatML tokenizer and a random tiny Llama saved with it."""
    from llmforge.tokenizer.info import load_tokenizer_info
    from tests.tokenizer.conftest import make_docs, train_and_export

    docs = make_docs(200) + [
        f"What is {a} plus {b}? The answer is {a + b}." for a in range(10) for b in range(10)
    ]
    tok = train_and_export(root / "tok", docs, vocab_size=500)
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
            max_position_embeddings=96,
            eos_token_id=info.eos_id,
        )
    )
    save_pretrained(model, root / "model", tokenizer_dir=tok, generation_config=info.generation_config())
    return {"tok": tok, "model": root / "model"}


def sft_start(root: Path, base: dict[str, Path], steps: int = 80) -> Path:
    """The SFT'd start point: ``run_sft`` on arithmetic conversations for ``steps`` steps."""
    from llmforge.manifest import load
    from llmforge.train.sft import run_sft

    root.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(root / "chat.jsonl", conversations(400))
    section = {
        "enabled": True,
        "from": str(base["model"]),
        "data": [str(data)],
        "max_steps": steps,
        "batch_size": 8,
        "seq_len": 64,
        "lr": 3e-3,
        "warmup_steps": 2,
        "eval_every": 0,
        "save_every": 0,
        "log_every": 10,
        "eval_prompts": 0,
        "val_fraction": 0.0,
    }
    (root / "llmforge.yaml").write_text(
        yaml.safe_dump({"project": {"name": "t", "seed": 3, "device": "cpu"}, "sft": section})
    )
    loaded = load(root / "llmforge.yaml")
    out = loaded.runs_dir / "sft"
    out.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(
        name="sft", loaded=loaded, out_dir=out, upstream={"tokenizer": {"tokenizer": base["tok"]}}
    )
    return run_sft(ctx).outputs["model"]


def align_project(
    root: Path,
    tok: Path,
    model: Path,
    *,
    align: dict[str, Any],
    upstream: dict[str, dict[str, Path]] | None = None,
    seed: int = 3,
) -> tuple[StageContext, ResolvedModel]:
    """A project whose `align:` section is ``align`` (merged over small defaults); (ctx, the policy)."""
    from llmforge.manifest import load

    root.mkdir(parents=True, exist_ok=True)
    section: dict[str, Any] = {
        "enabled": True,
        "from": str(model),
        "max_steps": 20,
        "warmup_steps": 0,
        "batch_size": 32,
        "lr": 5e-4,
        "schedule": "constant",
        "weight_decay": 0.0,
        "eval_every": 0,
        "save_every": 0,
        "log_every": 1,
        "eval_prompts": 12,
        "rewards": {
            "functions": [
                {"name": "regex", "args": {"pattern": FORMAT}},
                {"name": "exact_match", "weight": 0.5, "args": {"pattern": ANSWER}},
            ]
        },
    }
    for k, v in align.items():
        if isinstance(v, dict) and isinstance(section.get(k), dict):
            section[k] = {**section[k], **v}
        else:
            section[k] = v
    (root / "llmforge.yaml").write_text(
        yaml.safe_dump({"project": {"name": "t", "seed": seed, "device": "cpu"}, "align": section})
    )
    loaded = load(root / "llmforge.yaml")
    out = loaded.runs_dir / "align"
    out.mkdir(parents=True, exist_ok=True)
    ups = {"tokenizer": {"tokenizer": tok}, **(upstream or {})}
    ctx = StageContext(name="align", loaded=loaded, out_dir=out, upstream=ups)
    return ctx, ResolvedModel(Path(model), "align.from")


# reward functions for the bad-input tests, named in manifests as `tests.align.rl_fixtures:<name>`
def raising_reward(prompts, completions, **_):
    raise RuntimeError("reward service down")


def nan_reward(prompts, completions, **_):
    return [float("nan")] + [1.0] * (len(completions) - 1)


def short_reward(prompts, completions, **_):
    return [1.0] * (len(completions) - 1)


def answer_length(prompts, completions, *, answer, **_):
    return [float(len(str(a))) for a in answer]


def cached_sft(tmp_path_factory) -> tuple[dict[str, Path], Path]:
    """The base and the SFT'd model, built once per test session (shared by the RL test modules)."""
    root = tmp_path_factory.getbasetemp() / "rl_sft_cache"
    done = root / "paths.json"
    if not done.exists():
        base = make_base(root / "base")
        model = sft_start(root / "sft", base)
        done.write_text(json.dumps({"tok": str(base["tok"]), "model": str(base["model"]), "sft": str(model)}))
    p = json.loads(done.read_text())
    return {"tok": Path(p["tok"]), "model": Path(p["model"])}, Path(p["sft"])
