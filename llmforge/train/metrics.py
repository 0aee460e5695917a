"""Metrics sinks: ``metrics.jsonl`` always (rank 0), TensorBoard and W&B when installed and asked for.

``metrics.jsonl`` has one JSON object per line with a ``step`` key (training lines carry ``loss``, ``lr``,
``grad_norm``, ``tokens``, ``tok_per_s`` and, when the device's peak FLOPs are known, ``mfu``; validation
lines carry ``val_loss`` and ``val_ppl``). On resume, lines for steps after the checkpoint are dropped so
the file reads like one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .. import console
from ..utils.atomic import write_text

log = console.get_logger(__name__)

# Dense bf16/fp16 tensor-core peak FLOP/s per GPU (vendor datasheets, without sparsity).
PEAK_FLOPS_BF16: dict[str, float] = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "GH200": 989e12,
    "A100": 312e12,
    "A10G": 70e12,
    "L4": 121e12,
    "L40S": 362e12,
}


def peak_flops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    """Peak FLOP/s of ``device`` for ``dtype`` math, or None when unknown (CPU, fp32, unlisted GPUs)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_FLOPS_BF16, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_FLOPS_BF16[key]
    return None


def _finite(v: Any) -> Any:
    # JSON has no NaN/Infinity; keep the line parseable and the fact visible
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsWriter:
    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        tensorboard: bool = False,
        wandb: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
    ):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._fh = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            except ImportError:
                log.warning(
                    "tensorboard: true but the tensorboard package is not installed; pip install tensorboard"
                )
        if wandb and wandb.get("enabled"):
            try:
                import wandb as wb

                self._wandb = wb.init(project=wandb.get("project"), config=config or {}, dir=str(run_dir))
            except ImportError:
                log.warning("wandb.enabled: true but wandb is not installed; pip install wandb")

    @staticmethod
    def truncate(run_dir: Path, after_step: int | None) -> None:
        """Drop lines with ``step > after_step`` (all lines when None): the part a resume will redo."""
        path = run_dir / "metrics.jsonl"
        if not path.exists():
            return
        if after_step is None:
            path.unlink()
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= after_step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        write_text(path, "".join(k + "\n" for k in kept))

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled or self._fh is None:
            return
        self._fh.write(json.dumps({k: _finite(v) for k, v in row.items()}) + "\n")
        self._fh.flush()
        step = row.get("step", 0)
        numeric = {k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
