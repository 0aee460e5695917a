"""GRPO completions/s: llmforge's recipe (rollouts from its continuous-batching engine) vs TRL's GRPOTrainer,
on the same tiny random Llama, ChatML tokenizer, prompts and settings, on CPU, side by side in one run.

    python benchmarks/bench_grpo.py [--steps 6] [--group 8] [--prompts 4] [--max-new 32]

Both sample G completions for P prompts per step (temperature 1, no KL, μ = 1, one optimizer step per
batch), score them with the same reward function and take a step; completions/s is completions over the wall
time of the training call (model load excluded; generation and the update included for both).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def format_reward(prompts, completions, **_):
    import re

    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [1.0 if re.search(r"The answer is -?\d+", t) else 0.0 for t in texts]


def ours(root: Path, base, prompts: Path, a) -> float:
    from llmforge.align import grpo
    from tests.align.rl_fixtures import align_project

    ctx, policy = align_project(
        root / "ours", base["tok"], base["model"],
        align={
            "method": "grpo", "max_steps": a.steps, "eval_prompts": 0, "batch_size": a.group * a.prompts,
            "grpo": {"prompts": [str(prompts)], "group_size": a.group, "prompts_per_step": a.prompts,
                     "max_new_tokens": a.max_new, "temperature": 1.0},
            "rewards": {"functions": [{"name": "bench_grpo:format_reward"}]},
        },
    )  # fmt: skip
    t = time.perf_counter()
    grpo.run(ctx, policy)
    return a.steps * a.group * a.prompts / (time.perf_counter() - t)


def trl(root: Path, base, rows: list[dict], a) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(base["tok"])
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(base["model"])
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows])
    args = GRPOConfig(
        output_dir=str(root / "trl"), max_steps=a.steps, per_device_train_batch_size=a.group * a.prompts,
        num_generations=a.group, max_completion_length=a.max_new, temperature=1.0, learning_rate=5e-4,
        beta=0.0, use_cpu=True, bf16=False, report_to=[], logging_steps=1000, save_strategy="no",
        gradient_accumulation_steps=1, seed=3,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model, reward_funcs=format_reward, args=args, train_dataset=data, processing_class=tok
    )
    t = time.perf_counter()
    trainer.train()
    return a.steps * a.group * a.prompts / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new", type=int, default=32)
    a = p.parse_args()
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    sys.path.insert(0, str(Path(__file__).parent))
    from tests.align.rl_fixtures import make_base, prompt_rows, write_jsonl

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        base = make_base(root / "base")
        rows = prompt_rows()
        prompts = write_jsonl(root / "prompts.jsonl", rows)
        r_ours = ours(root, base, prompts, a)
        r_trl = trl(root, base, rows, a)
    table = {
        "settings": vars(a),
        "llmforge_completions_per_s": round(r_ours, 1),
        "trl_completions_per_s": round(r_trl, 1),
        "ratio": round(r_ours / r_trl, 2),
    }
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
