"""Rejection sampling (best-of-N; Touvron et al., 2023, Llama 2 §3.2.3): N samples per prompt from the policy,
scored by the reward functions and/or the reward model; the best becomes an SFT example, and best vs worst a
preference pair.

Writes, under ``runs/align/rejection/``:

* ``sft.jsonl`` — ``{"messages": [...prompt, {"role": "assistant", "content": best}], "reward": r}`` rows,
  readable by the SFT stage (``sft.data``);
* ``pairs.jsonl`` — ``{"prompt" | "messages", "chosen", "rejected", "chosen_reward", "rejected_reward"}``
  rows, readable by DPO and the reward stage. A prompt whose samples all scored the same gives no pair (it
  carries no preference), nor does one whose best and worst texts are equal;
* ``rejection.lineage.json`` — the policy, reward sources, settings, counts and a hash of each file, written
  last: without it the set is unfinished.

Empty completions are never chosen (an SFT row teaching an empty answer is worse than none): they are
counted, and a prompt whose samples are all empty is skipped.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import console
from ..errors import UserInputError
from ..stage import StageContext

log = console.get_logger(__name__)

SFT_FILE, PAIRS_FILE, LINEAGE_FILE = "sft.jsonl", "pairs.jsonl", "rejection.lineage.json"


@dataclass
class RejectionResult:
    sft_file: Path
    pairs_file: Path
    metrics: dict[str, Any]


def best_and_worst(rewards: list[float], texts: list[str]) -> tuple[int, int] | None:
    """Indices of the best and the worst non-empty sample (the first of equals), or None if all are empty."""
    ok = [i for i, t in enumerate(texts) if t.strip()]
    if not ok:
        return None
    best = max(ok, key=lambda i: (rewards[i], -i))
    worst = min(ok, key=lambda i: (rewards[i], i))
    return best, worst


def run(ctx: StageContext, policy) -> RejectionResult:
    """Best-of-N over ``align.rejection_sampling.prompts`` with ``policy`` (see the module docstring)."""
    from .. import __version__
    from ..train.recipe import load_start_model, training_env
    from ..utils.atomic import write_json, write_text
    from .grpo import prepare
    from .rollout import Sampler, rel

    rs = ctx.manifest.align.rejection_sampling
    project = ctx.manifest.project
    if not rs.prompts:
        raise UserInputError(
            "align.rejection_sampling.prompts: no prompt files; list JSONL/Parquet files of `prompt` or "
            "`messages` rows (plus the fields the reward functions read)"
        )
    inp = prepare(ctx, rs.prompts, "align.rejection_sampling.prompts")
    records = inp.train + inp.held_out  # best-of-N is not trained here: every prompt is used
    _, device = training_env(project)
    model = load_start_model(policy.path, inp.tokenizer_dir).to(device).eval()
    sampler = Sampler(
        model, inp.tokenizer, max_new_tokens=rs.max_new_tokens, max_batch=min(256, rs.num_samples * 8)
    )
    out_dir = ctx.out_dir / "rejection"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / LINEAGE_FILE).unlink(missing_ok=True)

    from .grpo import score

    t0 = time.perf_counter()
    sft_rows, pair_rows = [], []
    counts = {"prompts": 0, "no_pair_equal_reward": 0, "all_empty": 0, "empty_samples": 0}
    best_r, mean_r = [], []
    chunk = 16
    with torch.no_grad():
        for start in range(0, len(records), chunk):
            recs = records[start : start + chunk]
            samples = sampler.sample(
                recs, rs.num_samples, temperature=rs.temperature, seed=project.seed + start
            )
            rewards, _ = score(inp.rewards, recs, samples)
            by_prompt: dict[int, list[int]] = {}
            for k, s in enumerate(samples):
                by_prompt.setdefault(s.prompt_index, []).append(k)
            for i, ks in by_prompt.items():
                rec = recs[i]
                texts = [samples[k].text for k in ks]
                rs_ = [float(rewards[k]) for k in ks]
                counts["prompts"] += 1
                counts["empty_samples"] += sum(1 for t in texts if not t.strip())
                pick = best_and_worst(rs_, texts)
                if pick is None:
                    counts["all_empty"] += 1
                    continue
                b, w = pick
                best_r.append(rs_[b])
                mean_r.append(sum(rs_) / len(rs_))
                sft_rows.append(
                    {
                        "messages": [*rec.messages, {"role": "assistant", "content": texts[b]}],
                        "reward": rs_[b],
                    }
                )
                if rs_[b] > rs_[w] and texts[b] != texts[w]:
                    head = (
                        {"prompt": rec.prompt} if isinstance(rec.prompt, str) else {"messages": rec.messages}
                    )
                    pair_rows.append(
                        {
                            **head,
                            "chosen": texts[b],
                            "rejected": texts[w],
                            "chosen_reward": rs_[b],
                            "rejected_reward": rs_[w],
                        }
                    )
                else:
                    counts["no_pair_equal_reward"] += 1
    if not sft_rows:
        raise UserInputError(
            "align.rejection_sampling: every sample of every prompt was empty; check the policy (and "
            "align.rejection_sampling.max_new_tokens)"
        )
    sft_file, pairs_file = out_dir / SFT_FILE, out_dir / PAIRS_FILE
    for path, rows in ((sft_file, sft_rows), (pairs_file, pair_rows)):
        write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    seconds = time.perf_counter() - t0
    metrics = {
        **counts,
        "samples_per_prompt": rs.num_samples,
        "sft_rows": len(sft_rows),
        "pairs": len(pair_rows),
        "mean_reward": sum(mean_r) / len(mean_r),
        "best_of_n_reward": sum(best_r) / len(best_r),
        "prompts_too_long": sampler.stats.too_long,
        "samples_per_s": counts["prompts"] * rs.num_samples / seconds if seconds > 0 else None,
        **inp.rewards.stats.as_metrics(),
    }
    lineage = {
        "policy": rel(policy.path, ctx.project_dir),
        "policy_source": policy.source,
        "reward_sources": inp.rewards.names,
        "reward_model": str(inp.reward_model) if inp.reward_model else None,
        "settings": rs.model_dump(mode="json"),
        "seed": project.seed,
        "files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (sft_file, pairs_file)},
        "metrics": metrics,
        "bad_rewards": inp.rewards.stats.examples,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "llmforge_version": __version__,
    }
    write_json(out_dir / LINEAGE_FILE, lineage)
    log.info(
        "rejection sampling: %d prompts x %d samples → %d SFT rows, %d pairs (mean reward %.3f, best-of-%d %.3f)",
        counts["prompts"], rs.num_samples, len(sft_rows), len(pair_rows), metrics["mean_reward"],
        rs.num_samples, metrics["best_of_n_reward"],
    )  # fmt: skip
    return RejectionResult(sft_file, pairs_file, metrics)
