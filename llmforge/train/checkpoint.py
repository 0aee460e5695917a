"""Training checkpoints: self-describing, atomic, keep-last-K, exactly resumable.

A checkpoint is a directory ``<run>/checkpoints/step_NNNNNN/`` (``NNNNNN`` = optimizer steps completed) that
holds

* the model files written by a ``ModelIO`` — for llmforge models a Hugging Face directory (``config.json``,
  ``model.safetensors``, tokenizer files, ``generation_config.json``) that ``transformers`` loads unchanged;
* ``trainer_state.pt`` — everything else needed to continue *exactly*: optimizer and scheduler (and fp16
  grad-scaler) state, the data reader position, python/numpy/torch(/cuda) RNG states of every rank, step,
  tokens seen, skipped steps, the run configuration and its hash.

The directory is built under a temporary name and renamed into place (``utils.atomic.atomic_dir``), so a
run killed mid-save leaves either the previous complete checkpoint or the new complete one, never a
half-written directory that ``resume: auto`` could pick up. Leftover temporary folders are removed at the
next start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .. import console
from ..errors import CheckpointError
from ..utils.atomic import atomic_dir

log = console.get_logger(__name__)

STATE_FILE = "trainer_state.pt"
STATE_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


class ModelIO(Protocol):
    """How model weights go into and come out of a checkpoint directory."""

    def save(self, state_dict: dict[str, torch.Tensor], directory: Path) -> None: ...

    def load(self, directory: Path) -> dict[str, torch.Tensor]: ...


class SafetensorsIO:
    """Default ``ModelIO``: a single ``model.safetensors`` (tied tensors stored once)."""

    def save(self, state_dict: dict[str, torch.Tensor], directory: Path) -> None:
        from safetensors.torch import save_file

        seen: dict[tuple[int, int], str] = {}
        out: dict[str, torch.Tensor] = {}
        for k, v in state_dict.items():
            key = (v.untyped_storage().data_ptr(), v.storage_offset())
            if key in seen:  # tied weights: safetensors refuses shared storage
                continue
            seen[key] = k
            out[k] = v.detach().contiguous().cpu()
        save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt"})

    def load(self, directory: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(directory / "model.safetensors"))


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def clean_stale(root: Path) -> None:
    """Remove temporary folders left by a run killed while saving."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(".") and "step_" in p.name and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints."""
    ckpts = list_checkpoints(root)
    for _step, p in ckpts[: max(0, len(ckpts) - keep_last)]:
        shutil.rmtree(p, ignore_errors=True)
        log.debug("deleted old checkpoint %s", p)


def config_hash(config: dict[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    diffs = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        key = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(config_diff(a, b, key + "."))
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs


# -- RNG ------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's RNG states as plain bytes/ints/tuples.

    Plain types because the states of all ranks travel through ``all_gather_object`` (whose pickling of
    tensors is fragile across backends) and must load with ``torch.load(weights_only=True)``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, keys.astype("<u4").tobytes(), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state().numpy().tobytes(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().numpy().tobytes()
    return state


def _byte_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.frombuffer(keys, dtype="<u4").astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_byte_tensor(state["cuda"]))


# -- save / load ----------------------------------------------------------------------------------------


@dataclass
class TrainerState:
    step: int
    tokens_seen: int
    skipped_steps: int
    train_time: float
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    data: dict[str, Any]
    rng: list[dict[str, Any]]
    config: dict[str, Any]
    config_hash: str
    world_size: int
    scaler: dict[str, Any] | None = None
    objective: str = ""
    # running mean of the loss for spike detection; saved so a resumed run makes the same skip decisions
    loss_ema: float | None = None
    loss_ema_steps: int = 0
    # state_dict() of every stateful object the run registered (the data reader under "data", a recipe's own)
    stateful: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **self.__dict__}


def write_checkpoint(
    root: Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    trainer_state: TrainerState,
    model_io: ModelIO,
    keep_last: int,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``root/step_NNNNNN`` atomically (rank 0 only), then prune to ``keep_last``."""
    path = root / step_dir_name(step)
    with atomic_dir(path) as tmp:
        model_io.save(model_state, tmp)
        torch.save(trainer_state.to_dict(), tmp / STATE_FILE)
        if extra is not None:
            extra(tmp)
        share_dir(tmp)
    prune(root, keep_last)
    return path


def load_trainer_state(path: Path) -> dict[str, Any]:
    f = path / STATE_FILE
    if not f.is_file():
        raise CheckpointError(
            f"{path}: not a training checkpoint (no {STATE_FILE}); point pretrain.resume at a "
            "checkpoints/step_NNNNNN folder, or set it to `auto` or `false`"
        )
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a truncated/corrupt pickle
        raise CheckpointError(
            f"{f}: unreadable ({type(err).__name__}: {err}); delete this checkpoint folder to resume from "
            "an older one, or set resume: false"
        ) from None
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{f}: trainer state version {state.get('version')} is not {STATE_VERSION}")
    return state


def share_dir(path: Path) -> None:
    """Give a finished folder the umask's usual permissions (temporary folders are created 0700), so a
    server running as another user (vLLM in a container) can read the checkpoint."""
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o777 & ~umask)


def link_or_copy_tree(src: Path, dst: Path, skip: tuple[str, ...] = (STATE_FILE,)) -> None:
    """Fill ``dst`` with ``src``'s files (hard links where possible: checkpoint files are never modified)."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name in skip:
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
            continue
        try:
            os.link(p, dst / p.name)
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                (dst / p.name).unlink()
            shutil.copy2(p, dst / p.name)
