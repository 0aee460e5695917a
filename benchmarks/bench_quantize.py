"""Quantization on CPU: GPTQ (gptqmodel) against round-to-nearest, wall time, peak memory and perplexity.

    python benchmarks/bench_quantize.py [--presets tiny,small] [--bits 4,8] [--steps 300] [--json out.json]

For each preset (Llama-shaped, vocabulary 64 over the patterned corpus of ``tests/train/helpers.py``): fit the
model for ``--steps`` AdamW steps (a trained model, so GPTQ has structure to exploit), then for each bit width
quantize it with GPTQ and with RTN at the default group size, each in a fresh process so its peak RSS is its
own (VmHWM, imports of torch and gptqmodel included), and measure held-out perplexity of the original, GPTQ and RTN models through the stage's own evaluation
(dequantize-on-load, float32). Results go to stdout as a markdown table and to ``--json`` if given.

The GPTQ paper's anchor for scale: Llama-2-7B wikitext2 5.12 (fp16) → 5.27 at 4-bit g128 (RTN: 6.11).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _fit(preset: str, out: Path, steps: int) -> Path:
    import numpy as np
    import torch

    from llmforge.model import Llama, save_pretrained
    from llmforge.model.config import preset_config
    from tests.train.helpers import EOS, VOCAB, make_tokenizer_dir, pattern_docs

    torch.manual_seed(0)
    cfg = preset_config(preset, vocab_size=VOCAB, max_position_embeddings=256)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, EOS, 0
    model = Llama(cfg)
    stream = np.concatenate([np.asarray([*d, EOS]) for d in pattern_docs(2000, seed=3)])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        starts = rng.integers(0, len(stream) - 65, size=16)
        batch = torch.as_tensor(np.stack([stream[s : s + 65] for s in starts]))
        loss = torch.nn.functional.cross_entropy(
            model(batch[:, :-1]).reshape(-1, VOCAB), batch[:, 1:].reshape(-1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return save_pretrained(model, out, tokenizer_dir=make_tokenizer_dir(out.parent / "tok"))


def _quantize_child(method: str, src: str, out: str, spec: dict, calibration: list, q) -> None:
    from llmforge.quantize.backend import get_backend
    from llmforge.quantize.spec import QuantSpec

    t0 = time.perf_counter()
    get_backend(method).quantize(Path(src), Path(out), QuantSpec(**spec), calibration)
    seconds = time.perf_counter() - t0
    q.put(
        {
            "seconds": round(seconds, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
    )


def _run(method: str, src: Path, out: Path, spec, calibration) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_quantize_child, args=(method, str(src), str(out), spec.to_dict(), calibration, q))
    p.start()
    res = q.get()
    p.join()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from llmforge.manifest.quantize import QuantizeSection
    from llmforge.model import load_pretrained
    from llmforge.quantize.calibration import eval_windows, from_shards
    from llmforge.quantize.evaluate import perplexity, weights_bytes
    from llmforge.quantize.load import load_gptq
    from llmforge.quantize.spec import read_config, resolve_spec
    from tests.train.helpers import make_shards

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = make_shards(root / "shards", n_train=3000, n_val=400)
        windows = eval_windows(shards, 16384, 128)
        for preset in args.presets.split(","):
            t0 = time.perf_counter()
            src = _fit(preset, root / preset / "fp", args.steps)
            fit_s = time.perf_counter() - t0
            raw = read_config(src, "bench")
            calib = from_shards(shards, args.samples, args.seq_len, seed=0).sequences
            base = perplexity(load_pretrained(src, dtype="float32"), windows)
            for bits in [int(b) for b in args.bits.split(",")]:
                spec = resolve_spec(QuantizeSection(bits=bits), raw)
                row = {
                    "preset": preset,
                    "bits": bits,
                    "group_size": spec.group_size,
                    "fit_s": round(fit_s, 1),
                }
                row["ppl_fp"] = round(base, 4)
                row["fp_mb"] = round(weights_bytes(src) / 2**20, 2)
                for method in ("gptq", "rtn"):
                    out = root / preset / f"{method}{bits}"
                    out.mkdir(parents=True)
                    r = _run(method, src, out, spec, calib if method == "gptq" else [])
                    row[f"{method}_s"] = r["seconds"]
                    row[f"{method}_peak_rss_mb"] = r["peak_rss_mb"]
                    row[f"ppl_{method}"] = round(perplexity(load_gptq(out), windows), 4)
                    row[f"{method}_mb"] = round(weights_bytes(out) / 2**20, 2)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
