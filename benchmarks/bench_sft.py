"""SFT throughput: llmforge's SFT path vs TRL's ``SFTTrainer``, side by side, reported as ratios.

Both sides get the same initial weights (one llmforge ``Llama``, written with ``save_pretrained`` and read back
by each side: ``load_pretrained`` for llmforge, ``LlamaForCausalLM.from_pretrained`` with SDPA for TRL), the
same conversations (generated in-script, seeded, every one short enough that neither side truncates), the same
tokenizer (a small BPE trained in-process, exported with llmforge's ChatML template, whose ``{% generation %}``
markers give both sides the same assistant mask), and the same batch size, sequence length, LR (constant, no
warmup), AdamW betas/eps, weight decay (0), grad clip (1.0), thread count and number of steps.

The like-for-like setting for the headline ratio: **padded, one conversation per row, assistant-only loss**,
in corpus order on both sides (llmforge ``SFTBatches(packing=False, shuffle=False)``; TRL
``assistant_only_loss=True``, ``packing=False``, ``train_sampling_strategy="sequential"``), fp32, no gradient
checkpointing (TRL's default is on; llmforge has none in this path). So both see exactly the same micro-batches,
and the report checks that the first step's loss is equal (same weights, same batch) and how far the loss curves
drift afterwards. Each side keeps its own batch *shape*: llmforge pads every row to ``seq_len``, TRL's collator to
the longest row of the batch — that difference is part of what is measured, and the report shows the fraction of
positions each side spends on padding.

Also measured: llmforge packed vs padded (tokens/s, and optimizer steps to cover one epoch — fewer rows is
packing's point), TRL with ``packing=True`` (BFD packing, its padding-free ``position_ids`` path, SDPA), and
llmforge LoRA vs full fine-tuning (packed; tokens/s and peak RSS).

Counting. A conversation of ``L`` tokens is ``L - 1`` (input, target) positions on both sides (llmforge feeds
``c[:-1]``; TRL feeds all ``L`` tokens and masks the last target); tokens/s counts those positions, never
padding. Time is wall-clock per optimizer step, from just after one step's batch is in hand to just after the
next one's (data, forward, backward, clip, AdamW, the loop's own logging: everything a user waits for), summed
over the steps after ``--warmup``; the last step (checkpoint, final eval) is not timed. The same periods are
also measured in process CPU time (all threads): on a machine shared with other jobs the wall clock mostly
measures the neighbours, CPU time much less so — the report prints the 1-minute load average and both ratios.
The workers run with ``OMP_WAIT_POLICY=PASSIVE`` (both sides alike; ``--omp-wait-policy``): with the default
active spin-wait, a 2-thread run on an oversubscribed machine was 5-15x slower (threads spin waiting for a
descheduled partner) and its CPU time meaningless.

Every measurement runs in its own subprocess so its peak RSS is its own (``resource.getrusage`` max RSS; the
growth column subtracts the RSS with the model loaded, before training). TRL's workers also import ``trl`` and
``datasets``, so their absolute RSS is not comparable with llmforge's; LoRA vs full is (same imports).

    python benchmarks/bench_sft.py --json sft.json        # CPU, 2 threads, defaults below (~2 min)
    python benchmarks/bench_sft.py --only ours_padded trl_padded --repeats 3   # the headline pair, 3 times
    python benchmarks/bench_sft.py --batch 8 --steps 20 --repeats 3

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("ours_padded", "trl_padded", "ours_packed", "trl_packed", "ours_lora")
CHAT = ("<|im_start|>", "<|im_end|>")


# ------------------------------------------------------------------------------------------------------
# shared inputs: conversations, tokenizer, shards, initial weights (built once, in the parent)
# ------------------------------------------------------------------------------------------------------


def _words(rng: random.Random, n: int) -> list[str]:
    """Pseudo-words from syllables, so the tokenizer learns real subword merges (not a closed word list)."""
    onsets = ["", *"b c d f g h k l m n p r s t v w st tr pl".split()]  # noqa: SIM905
    vowels = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
    codas = ["", "", "n", "r", "s", "t", "l", "nd", "ng"]
    out: set[str] = set()
    while len(out) < n:
        k = rng.choice((1, 2, 2, 3, 3, 4))
        out.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(k)))
    return sorted(out)


def make_conversations(n: int, seed: int, scale: float = 1.0) -> list[dict]:
    """``n`` seeded chat rows: optional system prompt, 1-3 user/assistant turns, long-tailed lengths
    (``scale`` stretches the message lengths; 1.0 gives ~115 tokens per conversation on average)."""
    rng = random.Random(seed)
    vocab = _words(rng, 3000)
    cum, total = [], 0.0
    for r in range(len(vocab)):  # Zipf-like word frequencies
        total += 1.0 / (r + 1) ** 1.05
        cum.append(total)

    def text(mean_words: float, cap: int) -> str:
        k = max(2, min(cap, int(rng.lognormvariate(math.log(mean_words), 0.6))))
        words = rng.choices(vocab, cum_weights=cum, k=k)
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randrange(10_000)))
        s, out = 0, []
        while s < len(words):  # sentences of 4-14 words
            e = s + rng.randint(4, 14)
            out.append(" ".join(words[s:e]).capitalize() + rng.choice([".", ".", "?", "!"]))
            s = e
        return " ".join(out)

    systems = [
        "You are a helpful assistant.",
        "Answer briefly.",
        "You are a careful tutor; explain each step.",
    ]
    rows = []
    for _ in range(n):
        msgs = [{"role": "system", "content": rng.choice(systems)}] if rng.random() < 0.3 else []
        for _ in range(rng.choices((1, 2, 3), (0.5, 0.3, 0.2))[0]):
            msgs.append({"role": "user", "content": text(10 * scale, int(60 * scale))})
            msgs.append({"role": "assistant", "content": text(22 * scale, int(120 * scale))})
        rows.append({"messages": msgs})
    return rows


def prepare(args: argparse.Namespace, root: Path) -> dict:
    """Write conversations.jsonl, the tokenizer, llmforge's SFT shards and the initial HF model under ``root``."""
    import torch

    from llmforge.model import Llama, preset_config, save_pretrained
    from llmforge.tokenizer.chat import default_chat_template
    from llmforge.tokenizer.export import export_sentencepiece
    from llmforge.tokenizer.info import load_tokenizer
    from llmforge.tokenizer.train import train_sentencepiece
    from llmforge.train.sft_data import tokenize_sft

    rows = make_conversations(args.rows, args.seed, scale=args.seq_len / 256)  # ~same fill at any seq_len
    tok_dir = root / "tokenizer"
    tok_dir.mkdir(parents=True)
    docs = ["\n".join(m["content"] for m in r["messages"]) for r in rows]
    model_bytes, _ = train_sentencepiece(docs, vocab_size=args.tok_vocab, chat_tokens=CHAT, num_threads=1)
    (tok_dir / "tokenizer.model").write_bytes(model_bytes)
    export_sentencepiece(
        tok_dir / "tokenizer.model",
        tok_dir,
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        unk="<unk>",
        chat_tokens=list(CHAT),
        chat_template=default_chat_template(*CHAT),
        source={"bench_sft": True},
    )
    tok = load_tokenizer(tok_dir)
    # keep only conversations that fit a row on both sides (L <= seq_len + 1), so neither truncates
    lengths = [len(tok.encode_chat(r["messages"])[0]) for r in rows]
    kept = [r for r, n in zip(rows, lengths, strict=True) if n <= args.seq_len + 1]
    kept_len = [n for n in lengths if n <= args.seq_len + 1]
    data = root / "conversations.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    stats = tokenize_sft([data], tok_dir, root / "shards", seq_len=args.seq_len, val_fraction=0.0, seed=0)
    if stats.kept != len(kept) or stats.truncated:
        raise SystemExit(
            f"tokenize_sft kept {stats.kept} of {len(kept)} conversations ({stats.truncated} truncated)"
        )

    vocab = tok.info.vocab_size
    cfg = preset_config(
        "tiny",
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(1024, args.seq_len + 1),
        tie_word_embeddings=False,
        bos_token_id=tok.info.bos_id,
        eos_token_id=tok.info.eos_id,
        pad_token_id=tok.info.pad_id,
    )
    torch.manual_seed(args.seed)
    save_pretrained(Llama(cfg), root / "model", tokenizer_dir=tok_dir)
    positions = sum(n - 1 for n in kept_len)
    return {
        "conversations": len(kept),
        "dropped_too_long": len(rows) - len(kept),
        "tokens_per_conversation_mean": statistics.mean(kept_len),
        "tokens_per_conversation_median": statistics.median(kept_len),
        "tokens_per_conversation_max": max(kept_len),
        "epoch_positions": positions,  # Σ (L - 1): what one epoch trains on, on either side
        "assistant_tokens": stats.assistant_tokens,
        "vocab_size": vocab,
    }


# ------------------------------------------------------------------------------------------------------
# workers (one per measurement, in a subprocess)
# ------------------------------------------------------------------------------------------------------


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Clock:
    """Per-step stamps (taken when the step's batch is in hand), tokens and batch shapes, peak RSS so far."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.cpu: list[float] = []  # process CPU time, all threads: less sensitive to a busy machine
        self.tokens: list[int] = []
        self.positions: list[int] = []  # B x T actually run through the model (padding included)
        self.rss: list[float] = []
        self.losses: list[float] = []

    def tick(self, tokens: int, positions: int) -> None:
        self.stamps.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.tokens.append(tokens)
        self.positions.append(positions)
        self.rss.append(_peak_rss_mib())

    def summary(self, warmup: int) -> dict:
        # step k's period: stamps[k] -> stamps[k + 1]; the last step has no closing stamp (checkpoint, eval)
        idx = range(warmup, len(self.stamps) - 1)
        secs = [self.stamps[k + 1] - self.stamps[k] for k in idx]
        cpu = [self.cpu[k + 1] - self.cpu[k] for k in idx]
        toks = [self.tokens[k] for k in idx]
        if not secs:
            raise SystemExit("no timed steps: raise --steps above --warmup + 1")
        return {
            "tok_per_s": sum(toks) / sum(secs),
            "tok_per_cpu_s": sum(toks) / sum(cpu),
            "s_per_step": sum(secs) / len(secs),
            "timed_steps": len(secs),
            "tokens_per_step": sum(toks) / len(toks),
            "padding_fraction": 1 - sum(self.tokens) / sum(self.positions),
            "train_peak_rss_mib": self.rss[-1],  # at the last step's batch: every earlier step is complete
            "first_loss": self.losses[0],
            "losses": self.losses,
        }


def _ours(args: argparse.Namespace, root: Path, kind: str) -> dict:
    import torch

    from llmforge.manifest import Manifest
    from llmforge.manifest.train import LoraConfig
    from llmforge.model import load_pretrained
    from llmforge.model.lora import apply_lora
    from llmforge.shards import ShardIndex
    from llmforge.tokenizer.info import load_tokenizer_info
    from llmforge.train.loop import Objective, train
    from llmforge.train.sft import AdapterIO, sft_loss
    from llmforge.train.sft_data import SFTBatches

    model = load_pretrained(root / "model", dtype=torch.float32)
    lora = kind == "ours_lora"
    model_io = None
    if lora:
        # the manifest's defaults (r 16, alpha 32, all 7 projections); dropout from --lora-dropout
        apply_lora(model, LoraConfig(enabled=True, dropout=args.lora_dropout))
        model_io = AdapterIO(model, root / "model")
    info = load_tokenizer_info(root / "tokenizer")
    batches = SFTBatches(
        ShardIndex.load(root / "shards").open("train"),
        seq_len=args.seq_len,
        batch_size=args.batch,
        packing=kind != "ours_padded",
        shuffle=False,  # corpus order, as TRL's sequential sampler: the padded runs see identical batches
        pad_id=info.pad_id,
    )
    epoch = batches.epoch_stats(0)
    clock = _Clock()

    class Timed:
        """The reader, stamping each batch as it is handed to the step (after it was built)."""

        def __next__(self):
            b = next(batches)
            clock.tick(int((b["document_ids"] >= 0).sum()), b["input_ids"].numel())
            return b

        def state_dict(self):
            return batches.state_dict()

        def load_state_dict(self, state):
            batches.load_state_dict(state)

    def hook(step: int, loss):
        clock.losses.append(float(loss.detach()))
        return loss

    section = Manifest.model_validate(
        {
            "sft": {
                "max_steps": args.steps,
                "warmup_steps": 0,
                "schedule": "constant",
                "batch_size": args.batch,
                "seq_len": args.seq_len,
                "lr": args.lora_lr if lora else args.lr,
                "weight_decay": 0.0,
                "beta1": 0.9,
                "beta2": 0.999,  # TRL's (transformers') default, set on both sides
                "eps": 1e-8,
                "grad_clip": 1.0,
                "precision": "fp32",
                "eval_every": 0,
                "save_every": 0,
                "log_every": args.log_every,
                "resume": "false",
            }
        }
    ).sft
    rss_before = _rss_mib()
    res = train(
        model,
        Objective("sft", sft_loss, Timed()),
        section,
        run_dir=root / f"run_{kind}_{os.getpid()}",
        device="cpu",
        model_io=model_io,
        loss_hook=hook,
    )
    out = clock.summary(args.warmup)
    out.update(
        rows_per_epoch=epoch.rows,
        steps_per_epoch=math.ceil(epoch.rows / args.batch),
        fill=epoch.fill,
        params=res.num_parameters,
        trainable_params=res.trainable_parameters,
        rss_before_mib=rss_before,
        peak_rss_mib=_peak_rss_mib(),
    )
    out["rss_growth_mib"] = out["train_peak_rss_mib"] - rss_before
    return out


def _trl(args: argparse.Namespace, root: Path, kind: str) -> dict:
    import datasets
    import torch
    import transformers
    from trl import SFTConfig, SFTTrainer

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    packed = kind == "trl_packed"
    tok = transformers.AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    model = transformers.LlamaForCausalLM.from_pretrained(
        str(root / "model"), dtype=torch.float32, attn_implementation="sdpa"
    )
    rows = [json.loads(line) for line in (root / "conversations.jsonl").read_text().splitlines()]
    dataset = datasets.Dataset.from_list(rows)
    cfg = SFTConfig(
        output_dir=str(root / f"trl_{kind}_{os.getpid()}"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        gradient_checkpointing=False,  # TRL's default is on; llmforge's SFT path has none
        bf16=False,
        fp16=False,
        use_cpu=True,
        max_length=args.seq_len + 1,  # L tokens = L - 1 positions: the same conversations fit as in llmforge
        assistant_only_loss=True,
        packing=packed,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        logging_steps=args.log_every,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    clock = _Clock()

    class Timed(SFTTrainer):
        def training_step(self, model, inputs, *a, **kw):
            ids = inputs["input_ids"]
            if "attention_mask" in inputs:  # padded: one conversation per row
                tokens = int(inputs["attention_mask"].sum()) - ids.shape[0]
            else:  # padding-free: every conversation starts at position 0
                pos = inputs["position_ids"]
                tokens = pos.numel() - int((pos == 0).sum())
            clock.tick(tokens, ids.numel())
            return super().training_step(model, inputs, *a, **kw)

        def compute_loss(self, model, inputs, *a, **kw):
            loss = super().compute_loss(model, inputs, *a, **kw)
            if self.model.training:
                clock.losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

    trainer = Timed(model=model, args=cfg, train_dataset=dataset, processing_class=tok)
    rows_per_epoch = len(trainer.train_dataset)
    rss_before = _rss_mib()
    trainer.train()
    out = clock.summary(args.warmup)
    n_params = sum(p.numel() for p in model.parameters())
    out.update(
        rows_per_epoch=rows_per_epoch,
        steps_per_epoch=math.ceil(rows_per_epoch / args.batch),
        params=n_params,
        trainable_params=n_params,
        rss_before_mib=rss_before,
        peak_rss_mib=_peak_rss_mib(),
    )
    out["rss_growth_mib"] = out["train_peak_rss_mib"] - rss_before
    return out


def _worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    root = Path(args.root)
    t0 = time.perf_counter()
    out = (_ours if args.kind.startswith("ours") else _trl)(args, root, args.kind)
    out["kind"], out["wall_s"] = args.kind, time.perf_counter() - t0
    out["loadavg_1m"] = os.getloadavg()[0]
    return out


# ------------------------------------------------------------------------------------------------------
# the parent: prepare, run the workers (alternating order), report
# ------------------------------------------------------------------------------------------------------


def _run(kind: str, argv: list[str], root: Path, args: argparse.Namespace) -> dict | str:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if args.omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    proc = subprocess.run(
        [sys.executable, __file__, *argv, "--kind", kind, "--root", str(root)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-12:]
        return f"{kind} failed (exit {proc.returncode}): " + " | ".join(tail)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _x(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}x"


def report(args: argparse.Namespace, data: dict, runs: dict[str, list[dict]], failures: list[str]) -> dict:
    def med(kind: str, key: str) -> float | None:
        rs = runs.get(kind) or []
        vals = [r[key] for r in rs if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    def paired(a: str, b: str, key: str = "tok_per_s") -> list[float]:
        return [x[key] / y[key] for x, y in zip(runs.get(a, []), runs.get(b, []), strict=False)]

    summary: dict = {
        "tok_per_s": {k: med(k, "tok_per_s") for k in KINDS},
        "tok_per_cpu_s": {k: med(k, "tok_per_cpu_s") for k in KINDS},
    }
    loads = [r["loadavg_1m"] for rs in runs.values() for r in rs]
    load = statistics.median(loads) if loads else None
    summary["loadavg_1m"] = load
    lines = [
        f"config: hidden={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads} "
        f"vocab={data['vocab_size']} params={_fmt(med('ours_padded', 'params'), ',.0f')} seq_len={args.seq_len} "
        f"batch={args.batch} steps={args.steps} (warmup {args.warmup}, last untimed) lr={args.lr:g} "
        f"(LoRA {args.lora_lr:g}) threads={args.threads} repeats={args.repeats} (medians), fp32 CPU",
        f"data: {data['conversations']:,} conversations (seeded; {data['dropped_too_long']} longer than "
        f"seq_len+1 dropped before either side saw them), {data['tokens_per_conversation_mean']:.0f} tokens mean / "
        f"{data['tokens_per_conversation_median']:.0f} median / {data['tokens_per_conversation_max']} max, "
        f"{data['epoch_positions']:,} positions per epoch",
        "tokens = (input, target) positions of conversations (L - 1 per conversation), never padding; "
        f"1-min load average during the workers: {_fmt(load, '.1f')} on {os.cpu_count()} CPUs"
        + (
            " (busy machine: wall-clock ratios are noisy, see the CPU-time column)"
            if load and load > (os.cpu_count() or 1)
            else ""
        ),
        "",
        "### 1. llmforge vs TRL SFTTrainer (assistant-only loss, same batches in corpus order)",
        "",
        "| setting | llmforge tok/s | TRL tok/s | llmforge / TRL | paired runs | by CPU time | llmforge "
        "uncounted positions % | TRL uncounted positions % |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for label, a, b in (("padded", "ours_padded", "trl_padded"), ("packed", "ours_packed", "trl_packed")):
        ta, tb = med(a, "tok_per_s"), med(b, "tok_per_s")
        pa, pb = med(a, "padding_fraction"), med(b, "padding_fraction")
        cpu = ratio(med(a, "tok_per_cpu_s"), med(b, "tok_per_cpu_s"))
        pc = paired(a, b, "tok_per_cpu_s")
        cpu_runs = f" ({', '.join(f'{r:.2f}' for r in pc)})" if len(pc) > 1 else ""
        summary[f"ratio_{label}_ours_over_trl"] = ratio(ta, tb)
        summary[f"ratio_{label}_ours_over_trl_cpu_time"] = cpu
        lines.append(
            f"| {label} | {_fmt(ta, ',.0f')} | {_fmt(tb, ',.0f')} | {_x(ratio(ta, tb))} | "
            f"{', '.join(f'{r:.2f}' for r in paired(a, b)) or '—'} | {_x(cpu)}{cpu_runs} | "
            f"{_fmt(None if pa is None else 100 * pa, '.0f')} | {_fmt(None if pb is None else 100 * pb, '.0f')} |"
        )
    if med("ours_packed", "tok_per_s") is not None and med("trl_padded", "tok_per_s") is not None:
        y = ratio(med("ours_packed", "tok_per_s"), med("trl_padded", "tok_per_s"))
        yc = ratio(med("ours_packed", "tok_per_cpu_s"), med("trl_padded", "tok_per_cpu_s"))
        summary["ratio_ours_packed_over_trl_padded"] = y
        summary["ratio_ours_packed_over_trl_padded_cpu_time"] = yc
        lines.append(
            f"| llmforge packed vs TRL padded (each side's default) | | | {_x(y)} | | {_x(yc)} | | |"
        )

    la, lb = med("ours_padded", "first_loss"), med("trl_padded", "first_loss")
    check = None
    if la is not None and lb is not None:
        diff = abs(la - lb)
        ok = diff <= args.loss_tol * max(1.0, abs(lb))
        drift = max(
            abs(x - y)
            for x, y in zip(runs["ours_padded"][0]["losses"], runs["trl_padded"][0]["losses"], strict=False)
        )
        check = {"ours": la, "trl": lb, "abs_diff": diff, "ok": ok, "max_abs_diff_any_step": drift}
        lines += [
            "",
            f"first-step loss (same weights, same batch): llmforge {la:.6f}  TRL {lb:.6f}  |diff| {diff:.2e} "
            f"{'OK' if ok else 'MISMATCH'} (tol {args.loss_tol:g} rel);  largest |diff| over all {args.steps} steps: "
            f"{drift:.2e}",
        ]
        if not ok:
            lines.append(
                "WARNING: first-step losses differ: the two sides are not training on the same thing"
            )
    summary["first_step_loss"] = check
    pa, pb = med("ours_packed", "first_loss"), med("trl_packed", "first_loss")
    if pa is not None and pb is not None:
        summary["first_step_loss_packed"] = {"ours": pa, "trl": pb, "abs_diff": abs(pa - pb)}
        lines.append(
            f"first-step loss, packed: llmforge {pa:.6f}  TRL {pb:.6f}  |diff| {abs(pa - pb):.2e} (equal only when "
            "both best-fit-decreasing packers put the same conversations in the first batch)"
        )
    lines.append(
        "uncounted positions: padding, plus TRL's last token of each conversation (fed, but it has no target)"
    )

    lines += [
        "",
        "### 2. llmforge packed vs padded (same data)",
        "",
        "| | padded | packed | packed / padded |",
        "|---|---:|---:|---:|",
    ]
    for label, key, spec in (
        ("tokens/s", "tok_per_s", ",.0f"),
        ("tokens per CPU-second", "tok_per_cpu_s", ",.0f"),
        ("rows per epoch", "rows_per_epoch", ",.0f"),
        ("steps per epoch", "steps_per_epoch", ",.0f"),
        ("fill (data / positions)", "fill", ".3f"),
        ("s per step", "s_per_step", ".3f"),
    ):
        a, b = med("ours_padded", key), med("ours_packed", key)
        lines.append(f"| {label} | {_fmt(a, spec)} | {_fmt(b, spec)} | {_x(ratio(b, a))} |")
    epoch_s = {k: (data["epoch_positions"] / v if v else None) for k, v in summary["tok_per_s"].items()}
    summary["epoch_seconds_est"] = epoch_s
    lines.append(
        f"| est. s per epoch | {_fmt(epoch_s['ours_padded'], ',.0f')} | {_fmt(epoch_s['ours_packed'], ',.0f')} | "
        f"{_x(ratio(epoch_s['ours_packed'], epoch_s['ours_padded']))} |"
    )
    lines.append(
        f"| TRL steps per epoch | {_fmt(med('trl_padded', 'steps_per_epoch'), ',.0f')} | "
        f"{_fmt(med('trl_packed', 'steps_per_epoch'), ',.0f')} | |"
    )

    lines += [
        "",
        f"### 3. llmforge LoRA vs full fine-tuning (packed; LoRA r=16 alpha=32 dropout {args.lora_dropout:g} on all 7 "
        "projections)",
        "",
        "| | full | LoRA | LoRA / full |",
        "|---|---:|---:|---:|",
    ]
    for label, key, spec in (
        ("tokens/s", "tok_per_s", ",.0f"),
        ("tokens per CPU-second", "tok_per_cpu_s", ",.0f"),
        ("trainable params", "trainable_params", ",.0f"),
        ("peak RSS MiB (training)", "train_peak_rss_mib", ",.0f"),
        ("RSS growth MiB (training)", "rss_growth_mib", ",.0f"),
    ):
        a, b = med("ours_packed", key), med("ours_lora", key)
        lines.append(f"| {label} | {_fmt(a, spec)} | {_fmt(b, spec)} | {_x(ratio(b, a))} |")
    lines.append(
        f"\n(TRL workers' peak RSS, not comparable — they also import trl + datasets: padded "
        f"{_fmt(med('trl_padded', 'train_peak_rss_mib'), ',.0f')} MiB, packed "
        f"{_fmt(med('trl_packed', 'train_peak_rss_mib'), ',.0f')} MiB)"
    )
    for f in failures:
        lines.append(f"FAILED: {f}")
    sys.stdout.write("\n".join(lines) + "\n")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)  # worker mode
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--rows", type=int, default=3000, help="conversations generated")
    p.add_argument("--tok-vocab", type=int, default=4000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="steps excluded from timing")
    p.add_argument("--lr", type=float, default=2e-5, help="full fine-tuning LR (both sides)")
    p.add_argument("--lora-lr", type=float, default=2e-4)
    p.add_argument(
        "--lora-dropout", type=float, default=0.05, help="the manifest default; 0 skips the adapter dropout"
    )
    p.add_argument("--log-every", type=int, default=10, help="llmforge log_every = TRL logging_steps")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--only", nargs="+", choices=KINDS, default=list(KINDS), help="measurements to run")
    p.add_argument(
        "--loss-tol", type=float, default=1e-4, help="relative tolerance of the first-step loss check"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--omp-wait-policy",
        choices=["passive", "active", "default"],
        default="passive",
        help="OMP_WAIT_POLICY of the workers (both sides alike). Passive: idle OpenMP threads sleep instead of "
        "spinning, which on a machine shared with other jobs avoids 5-15x slowdowns of 2-thread runs",
    )
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()

    if args.kind:
        sys.stdout.write(json.dumps(_worker(args)) + "\n")
        return

    argv = [a for a in sys.argv[1:]]
    for flag in ("--json", "--only"):  # parent-only options
        if flag in argv:
            i = argv.index(flag)
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            del argv[i:j]
    root = Path(tempfile.mkdtemp(prefix="bench_sft_"))
    try:
        t0 = time.perf_counter()
        data = prepare(args, root)
        data["prepare_s"] = time.perf_counter() - t0
        runs: dict[str, list[dict]] = {k: [] for k in args.only}
        failures: list[str] = []
        for i in range(args.repeats):
            order = list(args.only) if i % 2 == 0 else list(reversed(args.only))
            for kind in order:
                got = _run(kind, argv, root, args)
                if isinstance(got, str):
                    failures.append(got)
                else:
                    runs[kind].append(got)
        summary = report(args, data, runs, failures)
        if args.json:
            cfg = {k: v for k, v in vars(args).items() if k not in ("kind", "root", "json")}
            payload = {"config": cfg, "data": data, "summary": summary, "runs": runs, "failures": failures}
            args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
