"""Training throughput and peak memory: llmforge's Llama vs ``transformers.LlamaForCausalLM``, side by side.

Both models get the same config, the same initial weights (copied), the same packed token stream, the same
AdamW settings, batch and thread count, and run through the same ``llmforge.train.loop.train`` with the same
``causal_lm_loss`` (llmforge's model computes it in its forward with the fused chunked output projection +
cross-entropy; transformers' returns logits and gets ``F.cross_entropy`` on them) — so the comparison is
the model implementation alone; the final losses must agree, which the report checks.

Each measurement runs in its own subprocess so its peak RSS is its own (both workers build both models and
drop the other one, so construction costs the same). Runs alternate (ours, hf / hf, ours / ...); a run's
throughput is the median of its per-step tokens/s after ``--warmup`` steps, and the report gives the median
over ``--repeats`` runs plus the median of the paired ratios (each ours run against the hf run next to it),
which cancels slow drifts in machine load.

    python benchmarks/bench_train.py                    # CPU, fp32, defaults below
    python benchmarks/bench_train.py --device cuda --precision bf16 --hidden 768 --layers 12

Reports tokens/s, peak RSS (CPU; also its growth during training) or peak CUDA memory, and the ratios
ours/hf (target: tokens/s >= 1.2x, memory <= 1.0x). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _worker(args: argparse.Namespace) -> dict:
    import resource

    import torch

    torch.set_num_threads(args.threads)
    import transformers  # imported by both workers so the RSS baselines match

    from llmforge.manifest import Manifest
    from llmforge.model import Llama, preset_config
    from llmforge.train.data import PackedBatches, ShardIndex, write_shards
    from llmforge.train.loop import Objective, train
    from llmforge.train.pretrain import causal_lm_loss

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    g = torch.Generator().manual_seed(0)
    n_tokens = (args.steps + 2) * args.batch * args.seq_len + 1
    docs = torch.randint(3, args.vocab, (n_tokens // 200 + 1, 200), generator=g).tolist()
    write_shards(tmp / "shards", {"train": docs}, vocab_size=args.vocab, eos_id=2, dtype="uint16")
    index = ShardIndex.load(tmp / "shards")

    cfg = preset_config(
        "tiny",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(1024, args.seq_len),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    ours = Llama(cfg)
    # both workers build both models (same construction footprint), then keep one
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(ours.state_dict(), strict=False)
    model = hf if args.impl == "hf" else ours
    del ours, hf
    gc.collect()
    section = Manifest.model_validate(
        {
            "pretrain": {
                "max_steps": args.steps,
                "warmup_steps": 1,
                "batch_size": args.batch,
                "seq_len": args.seq_len,
                "lr": 3e-4,
                "eval_every": 0,
                "save_every": 0,
                "log_every": 1,
                "precision": args.precision,
                "compile": args.compile,
                "resume": "false",
            }
        }
    ).pretrain
    # no checkpoint writing in the timed loop: save only at the end, which is excluded from tok/s anyway
    data = PackedBatches(index.open("train"), seq_len=args.seq_len, batch_size=args.batch, seed=0)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mib()
    t0 = time.perf_counter()
    res = train(model, Objective("bench", causal_lm_loss, data), section, run_dir=tmp / "run", device=device)
    wall = time.perf_counter() - t0
    rows = [r for r in res.history if "tok_per_s" in r and r["step"] > args.warmup]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {
        "impl": args.impl,
        "tok_per_s": statistics.median(r["tok_per_s"] for r in rows),  # log_every=1: one row per step
        "peak_rss_mib": peak,
        "rss_growth_mib": peak - rss_before,  # what training added on top of the process with its model
        "final_loss": res.train_loss,
        "params": res.num_parameters,
        "wall_s": wall,
    }
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["ours", "hf"], help=argparse.SUPPRESS)  # worker mode
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps excluded from tok/s")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    if args.impl:
        sys.stdout.write(json.dumps(_worker(args)) + "\n")
        return

    argv = [a for a in sys.argv[1:]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    runs: dict[str, list[dict]] = {"ours": [], "hf": []}
    for i in range(args.repeats):
        for impl in ("ours", "hf") if i % 2 == 0 else ("hf", "ours"):
            proc = subprocess.run(
                [sys.executable, __file__, *argv, "--impl", impl],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"{impl} worker failed")
            runs[impl].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    o, h = runs["ours"], runs["hf"]

    def med(rs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rs)

    speed = [a["tok_per_s"] / b["tok_per_s"] for a, b in zip(o, h, strict=True)]
    mem = "peak_cuda_mib" if "peak_cuda_mib" in o[0] else "peak_rss_mib"
    rows = [("tokens/s", "tok_per_s", ",.0f"), (mem, mem, ",.0f")]
    if mem == "peak_rss_mib":
        rows.append(("rss growth MiB", "rss_growth_mib", ",.0f"))
    lines = [
        f"config: hidden={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads} "
        f"vocab={args.vocab} seq={args.seq_len} batch={args.batch} steps={args.steps} (warmup {args.warmup}) "
        f"device={args.device} precision={args.precision} threads={args.threads} params={o[0]['params']:,} "
        f"repeats={args.repeats} (medians)",
        f"{'':16}{'llmforge':>12}{'transformers':>14}{'ratio':>8}",
    ]
    for label, key, fmt in rows:
        a, b = med(o, key), med(h, key)
        lines.append(f"{label:16}{a:12{fmt}}{b:14{fmt}}{a / b:8.2f}x")
    lines.append(
        f"{'paired tok/s':16}{'':26}{statistics.median(speed):8.2f}x  "
        f"(runs: {', '.join(f'{r:.2f}' for r in speed)})"
    )
    lo, hl = o[0]["final_loss"], h[0]["final_loss"]
    lines.append(f"{'final loss':16}{lo:12.4f}{hl:14.4f}")
    if abs(lo - hl) > 1e-3 * max(1.0, abs(hl)):
        lines.append("WARNING: final losses differ; the two sides are not doing the same math")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
