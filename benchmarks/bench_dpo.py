"""DPO throughput: llmforge's DPO recipe vs TRL's ``DPOTrainer``, side by side, reported as a ratio.

Both sides get the same initial weights (one llmforge ``Llama`` written with ``save_pretrained``; llmforge reads
it with ``load_pretrained``, TRL as ``transformers.LlamaForCausalLM`` with SDPA), the same preference pairs
(conversational: a prompt, a chosen and a rejected assistant reply, generated in-script from
``bench_sft.make_conversations``), the same tokenizer (a small BPE with llmforge's ChatML template), the same
batch of pairs, LR (constant), AdamW settings, grad clip, thread count, and the same pairs in the same order
(sequential on both sides). Both precompute the reference log-probs before training (llmforge's default
``precompute_reference: true``; TRL ``precompute_ref_log_probs=True``), so the timed steps are the policy's
forward + backward over chosen and rejected rows, plus the optimizer step and the loop. Both sides pad each of
a batch's 2B sequences to the longest one (their defaults); ``--packed`` measures llmforge's packed pair
batches instead (``dpo.packing: true``).

Time is wall-clock per optimizer step, from one step's batch in hand to the next one's (data, forward,
backward, clip, AdamW, logging), after ``--warmup`` steps; pairs/s = pairs in those steps / their time. The
first step's loss is log 2 on both sides (policy == reference); the report also prints the loss of the last
step on each side (TRL's completion also holds the newline after ``<|im_end|>``, ours does not — the template's
generation span ends at the end-of-turn token — so later losses differ slightly).

    python benchmarks/bench_dpo.py                 # CPU, 2 threads, ~2 min
    python benchmarks/bench_dpo.py --repeats 3 --steps 12

Each measurement runs in its own subprocess; runs alternate ours/trl; the report gives medians and the median
of the paired ratios. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def prepare(args: argparse.Namespace, root: Path) -> dict:
    import torch
    from bench_sft import CHAT, make_conversations

    from llmforge.model import Llama, preset_config, save_pretrained
    from llmforge.tokenizer.chat import default_chat_template
    from llmforge.tokenizer.export import export_sentencepiece
    from llmforge.tokenizer.info import load_tokenizer
    from llmforge.tokenizer.train import train_sentencepiece

    convs = make_conversations(args.pairs * 2, args.seed, scale=args.seq_len / 256)
    tok_dir = root / "tokenizer"
    tok_dir.mkdir(parents=True)
    docs = ["\n".join(m["content"] for m in r["messages"]) for r in convs]
    model_bytes, _ = train_sentencepiece(docs, vocab_size=args.tok_vocab, chat_tokens=CHAT, num_threads=1)
    (tok_dir / "tokenizer.model").write_bytes(model_bytes)
    export_sentencepiece(
        tok_dir / "tokenizer.model", tok_dir, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
        chat_tokens=list(CHAT), chat_template=default_chat_template(*CHAT), source={"bench_dpo": True},
    )  # fmt: skip
    tok = load_tokenizer(tok_dir)
    rng = random.Random(args.seed)
    answers = [next(m["content"] for m in c["messages"] if m["role"] == "assistant") for c in convs]
    rows = []
    for c in convs:
        msgs = c["messages"]
        first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompt, chosen = msgs[:first], msgs[first]["content"]
        rejected = rng.choice(answers)
        if rejected == chosen:
            continue
        longest = max(
            len(tok.encode_chat([*prompt, {"role": "assistant", "content": r}])[0])
            for r in (chosen, rejected)
        )
        if longest + 1 <= args.seq_len:  # + the newline TRL keeps: neither side truncates
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        if len(rows) == args.pairs:
            break
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = preset_config(
        "tiny", vocab_size=tok.info.vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(1024, args.seq_len + 1), tie_word_embeddings=False,
        bos_token_id=tok.info.bos_id, eos_token_id=tok.info.eos_id, pad_token_id=tok.info.pad_id,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    save_pretrained(Llama(cfg), root / "model", tokenizer_dir=tok_dir)
    return {"pairs": len(rows)}


class _Clock:
    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.losses: list[float] = []

    def tick(self) -> None:
        self.stamps.append(time.perf_counter())

    def summary(self, warmup: int, pairs_per_step: int) -> dict:
        secs = [self.stamps[k + 1] - self.stamps[k] for k in range(warmup, len(self.stamps) - 1)]
        if not secs:
            raise SystemExit("no timed steps: raise --steps above --warmup + 1")
        return {
            "pairs_per_s": pairs_per_step * len(secs) / sum(secs),
            "s_per_step": sum(secs) / len(secs),
            "timed_steps": len(secs),
            "first_loss": self.losses[0] if self.losses else None,
            "last_loss": self.losses[-1] if self.losses else None,
        }


def _ours(args: argparse.Namespace, root: Path) -> dict:
    import torch

    from llmforge.align.dpo import make_dpo_loss, precompute_reference
    from llmforge.align.preference_data import collate, tokenize_pairs
    from llmforge.manifest.align import AlignSection, DPOConfig
    from llmforge.model import load_pretrained
    from llmforge.tokenizer.info import load_tokenizer
    from llmforge.train.loop import optimizer_step, setup

    tok = load_tokenizer(root / "tokenizer")
    pairs, _, _ = tokenize_pairs([root / "pairs.jsonl"], tok, max_len=args.seq_len, val_fraction=0.0, seed=0)
    model = load_pretrained(root / "model", dtype=torch.float32)
    pad = tok.info.pad_id
    pack = args.seq_len if args.packed else None  # llmforge's default: padded pair batches
    precompute_reference(model, pairs, batch_size=args.batch, pad_id=pad, pack_len=pack)
    section = AlignSection(
        max_steps=args.steps, warmup_steps=0, lr=args.lr, schedule="constant", batch_size=args.batch,
        beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0, precision="fp32",
    )  # fmt: skip
    loss_fn = make_dpo_loss(DPOConfig(beta=args.beta))
    clock = _Clock()
    cursor = 0

    def next_batch():  # sequential, like TRL's sampler here
        nonlocal cursor
        chunk = [pairs[(cursor + i) % len(pairs)] for i in range(args.batch)]
        cursor += args.batch
        clock.tick()
        return collate(chunk, pad, pack)

    with tempfile.TemporaryDirectory() as d:
        session = setup(model, section, run_dir=d, description="align")
        for _ in range(args.steps):
            st = optimizer_step(session, next_batch, loss_fn)
            clock.losses.append(st.loss)
    return clock.summary(args.warmup, args.batch)


def _trl(args: argparse.Namespace, root: Path) -> dict:
    import datasets
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tok = transformers.AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    model = transformers.LlamaForCausalLM.from_pretrained(
        str(root / "model"), dtype=torch.float32, attn_implementation="sdpa"
    )
    rows = [json.loads(line) for line in (root / "pairs.jsonl").read_text().splitlines()]
    cfg = DPOConfig(
        output_dir=str(root / f"trl_{os.getpid()}"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, beta=args.beta, loss_type=["sigmoid"],
        precompute_ref_log_probs=True, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        max_length=args.seq_len, train_sampling_strategy="sequential", dataloader_num_workers=0,
        logging_steps=args.steps, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
    )  # fmt: skip
    clock = _Clock()

    class Timed(DPOTrainer):
        def training_step(self, model, inputs, *a, **kw):
            clock.tick()
            return super().training_step(model, inputs, *a, **kw)

        def compute_loss(self, model, inputs, *a, **kw):
            loss = super().compute_loss(model, inputs, *a, **kw)
            if self.model.training:
                clock.losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

    trainer = Timed(
        model=model, args=cfg, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok
    )
    trainer.train()
    return clock.summary(args.warmup, args.batch)


def _run(kind: str, argv: list[str], root: Path, args: argparse.Namespace) -> dict | str:
    env = {
        **os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE",
    }  # fmt: skip
    proc = subprocess.run(
        [sys.executable, __file__, *argv, "--kind", kind, "--root", str(root)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        return f"{kind} failed (exit {proc.returncode}): " + " | ".join(proc.stderr.strip().splitlines()[-8:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--tok-vocab", type=int, default=2000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4, help="pairs per step (both sides)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--packed", action="store_true", help="llmforge with packed batches (dpo.packing: true)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    if args.kind:
        import torch

        torch.set_num_threads(args.threads)
        out = (_ours if args.kind == "ours" else _trl)(args, Path(args.root))
        sys.stdout.write(json.dumps(out) + "\n")
        return

    root = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    data = prepare(args, root)
    keys = ("threads", "pairs", "hidden", "intermediate", "layers", "heads", "kv_heads", "seq_len", "batch",
            "steps", "warmup", "lr", "beta", "seed")  # fmt: skip
    argv = [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    argv += ["--packed"] if args.packed else []
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    failures: list[str] = []
    for i in range(args.repeats):
        for kind in ("ours", "trl") if i % 2 == 0 else ("trl", "ours"):
            r = _run(kind, argv, root, args)
            (failures.append(r) if isinstance(r, str) else runs[kind].append(r))
    med = {k: statistics.median(r["pairs_per_s"] for r in v) if v else None for k, v in runs.items()}
    paired = [a["pairs_per_s"] / b["pairs_per_s"] for a, b in zip(runs["ours"], runs["trl"], strict=False)]
    summary = {
        "settings": {
            k: getattr(args, k)
            for k in ("threads", "hidden", "layers", "seq_len", "batch", "steps", "warmup", "packed")
        },
        "pairs": data["pairs"],
        "ours_pairs_per_s": med["ours"],
        "trl_pairs_per_s": med["trl"],
        "ratio_ours_over_trl": statistics.median(paired) if paired else None,
        "first_loss": {k: v[0]["first_loss"] for k, v in runs.items() if v},
        "last_loss": {k: v[0]["last_loss"] for k, v in runs.items() if v},
        "runs": runs,
        "failures": failures,
        "loadavg_1m": os.getloadavg()[0],
    }
    print("| side | pairs/s (median) | s/step |")
    print("|---|---|---|")
    for k in ("ours", "trl"):
        if runs[k]:
            print(f"| {k} | {med[k]:.2f} | {statistics.median(r['s_per_step'] for r in runs[k]):.3f} |")
    if summary["ratio_ours_over_trl"] is not None:
        print(
            f"ratio ours/trl (median of paired runs): {summary['ratio_ours_over_trl']:.2f}x (target >= 1.5x)"
        )
    print(f"first-step loss: {summary['first_loss']}  last-step loss: {summary['last_loss']}")
    for f in failures:
        print("FAILED:", f)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
