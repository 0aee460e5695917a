"""The ``quantize`` stage: the resolved final model → ``runs/quantize/model`` in the standard GPTQ layout,
measured against the original and against round-to-nearest.

Order matters: every check that can fail without doing work runs first (a causal LM, not already quantized,
bits and group size that fit every layer, the backend importable, enough calibration data, the sequence
length within the context), then quantization writes into a temporary folder, evaluation reads that folder,
and only a model whose perplexity increase is within ``quantize.max_ppl_increase`` is renamed into place. A
failure at any point leaves the previous output (or none) — never a half-written model.

Upstream outputs read: the model (``quantize.from`` or the newest enabled ``model`` of distill, align, sft,
pretrain), ``tokenizer.shards`` (train split → ``calibration: data``, val split → perplexity) and, when
present, ``tokenizer.tokenizer`` (the project's tokenizer, checked against the model's).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ..console import get_logger
from ..errors import StageError, StageInputError, UserInputError
from ..stage import StageContext, StageResult
from ..utils.atomic import atomic_dir
from .spec import QuantSpec, layer_shapes, read_config, resolve_spec

log = get_logger(__name__)

EVAL_SEQ_LEN = 512
# Files of the source model the quantized one keeps as they are: tokenizer, chat template, generation config.
_NOT_COPIED = {
    "config.json",
    "quantize_config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
}
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth")


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy every non-weight file of ``src`` (tokenizer files, chat template, generation config) into ``dst``."""
    copied = []
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and f.name not in _NOT_COPIED and f.suffix not in _WEIGHTS:
            shutil.copy2(f, Path(dst) / f.name)
            copied.append(f.name)
    return copied


def _describe(spec: QuantSpec) -> str:
    group = "per-channel" if spec.group_size == -1 else f"g{spec.group_size}"
    extra = ", act-order" if spec.desc_act else ""
    return f"{spec.bits}-bit {group} {'sym' if spec.sym else 'asym'}{extra}"


def _mb(n: int) -> float:
    return round(n / 2**20, 3)


def run_quantize(ctx: StageContext) -> StageResult:
    import torch

    from ..model import load_pretrained
    from ..train.recipe import check_same_tokenizer, resolve_model
    from . import calibration as calib_mod
    from .backend import get_backend
    from .evaluate import perplexity, weights_bytes
    from .load import is_gptq_checkpoint, load_gptq
    from .rtn import RTNBackend

    cfg = ctx.manifest.quantize
    # ---- checks before any work -------------------------------------------------------------------------
    resolved = resolve_model(ctx, cfg.from_, "quantize.from")
    src = resolved.path
    raw = read_config(src, "quantize.from")
    spec = resolve_spec(cfg, raw)
    max_pos = int(raw.get("max_position_embeddings") or 0)
    if max_pos and cfg.calibration_seq_len > max_pos:
        raise UserInputError(
            f"quantize.calibration_seq_len: {cfg.calibration_seq_len} exceeds the model's "
            f"max_position_embeddings {max_pos}; set it to at most {max_pos}"
        )
    backend = get_backend(cfg.method, cfg.backend)
    backend.check()
    if ctx.has_input("tokenizer", "tokenizer"):
        check_same_tokenizer(src, ctx.input("tokenizer", "tokenizer"), "quantize.from")
    shards = ctx.input("tokenizer", "shards")
    eval_seq = min(max_pos or EVAL_SEQ_LEN, EVAL_SEQ_LEN)
    eval_on = cfg.calibration if cfg.eval_on == "auto" else cfg.eval_on
    if eval_on == "sft":
        windows, eval_masks, eval_source = calib_mod.sft_eval_windows(
            [ctx.resolve(p) for p in ctx.manifest.sft.data],
            src,
            cfg.eval_tokens,
            eval_seq,
            cfg.seed,
            reserved=cfg.calibration_samples if cfg.calibration == "sft" and cfg.method == "gptq" else 0,
        )
    else:
        windows, eval_masks = calib_mod.eval_windows(shards, cfg.eval_tokens, eval_seq), None
        eval_source = {"source": "data", "split": "val", "tokens": int(sum(len(w) - 1 for w in windows))}
    if cfg.method == "gptq":
        if cfg.calibration == "data":
            calib = calib_mod.from_shards(shards, cfg.calibration_samples, cfg.calibration_seq_len, cfg.seed)
        else:
            paths = [ctx.resolve(p) for p in ctx.manifest.sft.data]
            calib = calib_mod.from_sft(paths, src, cfg.calibration_samples, cfg.calibration_seq_len, cfg.seed)
        widest = max(i for i, _ in layer_shapes(raw).values())
        tokens = sum(len(s) for s in calib.sequences)
        if tokens < widest:
            raise StageInputError(
                f"quantize.calibration_samples: {tokens} calibration tokens is fewer than the widest layer's "
                f"{widest} input columns, so GPTQ's Hessian would be singular (only damping would hold it); "
                "raise quantize.calibration_samples or calibration_seq_len"
            )
    else:
        calib = calib_mod.Calibration([], {"source": "none (rtn)"})

    # ---- quantize, evaluate, then publish -----------------------------------------------------------------
    model_dir = Path(ctx.out_dir) / "model"
    seconds: dict[str, float] = {}
    with (
        atomic_dir(model_dir) as tmp,
        tempfile.TemporaryDirectory(dir=ctx.out_dir, prefix=".rtn.") as rtn_tmp,
    ):
        t0 = time.perf_counter()
        log.info(f"quantize: {_describe(spec)} of {src} with {backend.name}")
        backend.quantize(src, tmp, spec, calib.sequences)
        seconds[cfg.method] = round(time.perf_counter() - t0, 2)
        if not is_gptq_checkpoint(tmp):
            raise StageError(f"quantize: backend {backend.name} wrote no GPTQ config.json into {tmp}")
        copied = copy_side_files(src, tmp)

        def score(load) -> float:
            model = load()
            try:
                return perplexity(model, windows, masks=eval_masks)
            finally:
                del model

        ppl = {"original": score(lambda: load_pretrained(src, device="cpu", dtype=torch.float32))}
        ppl[cfg.method] = score(lambda: load_gptq(tmp))
        sizes = {"original": weights_bytes(src), cfg.method: weights_bytes(tmp)}
        if cfg.method == "gptq":
            t0 = time.perf_counter()
            RTNBackend().quantize(src, Path(rtn_tmp), spec, [])
            seconds["rtn"] = round(time.perf_counter() - t0, 2)
            ppl["rtn"] = score(lambda: load_gptq(rtn_tmp))
            sizes["rtn"] = weights_bytes(Path(rtn_tmp))

        increase = ppl[cfg.method] / ppl["original"] - 1.0
        label = {"original": "original", "gptq": f"GPTQ ({backend.name})", "rtn": "round-to-nearest"}
        rows = [
            [
                label[k],
                "-" if k == "original" else _describe(spec),
                round(v, 4),
                "-" if k == "original" else f"{100 * (v / ppl['original'] - 1):+.2f}%",
                _mb(sizes[k]),
            ]
            for k, v in ppl.items()
        ]
        table = {
            "title": "Quantization (held-out perplexity)",
            "columns": ["model", "quantization", "perplexity", "vs original", "weights MB"],
            "rows": rows,
        }
        metrics: dict[str, Any] = {
            "from": str(src),
            "from_source": resolved.source,
            "method": cfg.method,
            "backend": backend.name,
            "spec": spec.to_dict(),
            "calibration": calib.info,
            "eval": {
                **eval_source,
                "windows": len(windows),
            },
            "perplexity": {k: round(v, 6) for k, v in ppl.items()},
            "ppl_increase": round(increase, 6),
            "size_bytes": sizes,
            "seconds": seconds,
            "copied_files": copied,
            "table": table,
        }
        if "rtn" in ppl and cfg.method == "gptq":
            metrics["gptq_beats_rtn"] = ppl["gptq"] <= ppl["rtn"]
            if not metrics["gptq_beats_rtn"]:
                log.warning(
                    f"quantize: GPTQ perplexity {ppl['gptq']:.4f} is above round-to-nearest's {ppl['rtn']:.4f} "
                    "at the same settings; more or more representative calibration data "
                    "(quantize.calibration_samples, calibration_seq_len) usually fixes it"
                )
        if cfg.max_ppl_increase is not None and increase > cfg.max_ppl_increase:
            rtn_note = f", round-to-nearest {ppl['rtn']:.4f}" if "rtn" in ppl else ""
            raise StageError(
                f"quantize.max_ppl_increase: {_describe(spec)} raised held-out perplexity from "
                f"{ppl['original']:.4f} to {ppl[cfg.method]:.4f} ({100 * increase:+.2f}% > "
                f"{100 * cfg.max_ppl_increase:.2f}% allowed{rtn_note}); no model was written. Use more bits, "
                "a smaller group_size, act-order (desc_act), more calibration data, or raise the threshold"
            )

    summary = [
        ("model", resolved.describe(ctx)),
        ("quantized", f"{_describe(spec)} ({cfg.method}, {backend.name}) in {seconds[cfg.method]} s"),
        (
            "perplexity",
            " → ".join(f"{k} {v:.3f}" for k, v in ppl.items()) + f" ({100 * increase:+.2f}%)",
        ),
        ("weights", f"{_mb(sizes['original'])} MB → {_mb(sizes[cfg.method])} MB"),
        (
            "calibration",
            f"{calib.info.get('source')}: {calib.info.get('samples', 0)} × {calib.info.get('seq_len', 0)}",
        ),
        ("output", str(model_dir)),
    ]
    return StageResult(outputs={"model": model_dir}, metrics=metrics, summary=summary, tables=[table])
