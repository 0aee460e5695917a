"""Training throughput and peak memory: llmforge's Llama vs ``transformers.LlamaForCausalLM``, side by side.

Both models get the same config, the same initial weights (copied), the same packed token stream, the same
AdamW settings and batch, and run through the same ``llmforge.train.loop.train`` — so the comparison is the
model implementation alone. Each measurement runs in its own subprocess so its peak RSS is its own; runs
alternate (ours, hf, ours, hf, ...) and the best of ``--repeats`` is kept to damp noise from other load.

    python benchmarks/bench_train.py                    # CPU, fp32, defaults below
    python benchmarks/bench_train.py --device cuda --precision bf16 --hidden 768 --layers 12

Reports tokens/s (steady state, first ``--warmup`` steps excluded), peak RSS (CPU) or peak CUDA memory, and
the ratios ours/hf (target: tokens/s >= 1.2x, memory <= 1.0x). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
    if args.impl == "hf":
        hf_cfg = transformers.LlamaConfig(**cfg.to_hf_dict())
        hf_cfg._attn_implementation = "sdpa"
        model = transformers.LlamaForCausalLM(hf_cfg)
        model.load_state_dict(ours.state_dict(), strict=False)
        del ours
    else:
        model = ours
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
    t0 = time.perf_counter()
    res = train(model, Objective("bench", causal_lm_loss, data), section, run_dir=tmp / "run", device=device)
    wall = time.perf_counter() - t0
    rows = [r for r in res.history if "tok_per_s" in r and r["step"] > args.warmup]
    tokens = args.batch * args.seq_len * len(rows)
    seconds = sum(args.batch * args.seq_len / r["tok_per_s"] for r in rows)
    out = {
        "impl": args.impl,
        "tok_per_s": tokens / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_loss": res.train_loss,
        "params": res.num_parameters,
        "wall_s": wall,
    }
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
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
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    if args.impl:
        sys.stdout.write(json.dumps(_worker(args)) + "\n")
        return

    argv = [a for a in sys.argv[1:]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for impl in ("ours", "hf"):
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
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            if impl not in best or r["tok_per_s"] > best[impl]["tok_per_s"]:
                best[impl] = r
    o, h = best["ours"], best["hf"]
    mem = "peak_cuda_mib" if "peak_cuda_mib" in o else "peak_rss_mib"
    lines = [
        f"config: hidden={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads} "
        f"vocab={args.vocab} seq={args.seq_len} batch={args.batch} steps={args.steps} device={args.device} "
        f"precision={args.precision} threads={args.threads} params={o['params']:,}",
        f"{'':14}{'llmforge':>12}{'transformers':>14}{'ratio':>8}",
        f"{'tokens/s':14}{o['tok_per_s']:12,.0f}{h['tok_per_s']:14,.0f}{o['tok_per_s'] / h['tok_per_s']:8.2f}x",
        f"{mem:14}{o[mem]:12,.0f}{h[mem]:14,.0f}{o[mem] / h[mem]:8.2f}x",
        f"{'final loss':14}{o['final_loss']:12.4f}{h['final_loss']:14.4f}",
    ]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
