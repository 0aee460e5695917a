"""Hugging Face checkpoint directories: save (atomically) and load, with precise errors.

A directory written by ``save_pretrained`` is what ``transformers.LlamaForCausalLM.from_pretrained`` and vLLM
load unchanged::

    config.json                      architectures ["LlamaForCausalLM"], model_type "llama"
    generation_config.json           bos / eos / pad ids
    model.safetensors                or model-00001-of-0000N.safetensors + model.safetensors.index.json
    tokenizer.json, tokenizer_config.json, …   copied from the tokenizer stage

``load_pretrained`` reads any local Llama / Mistral / Qwen2 checkpoint (single or sharded safetensors, or
``pytorch_model.bin``). Tensors are read one at a time straight into a model built on the ``meta`` device,
so loading needs about one copy of the weights in memory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..console import get_logger
from ..errors import CheckpointError, ModelError
from ..utils.atomic import atomic_dir
from .config import DTYPES, LlamaConfig
from .llama import Llama, torch_dtype

log = get_logger(__name__)

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
# What a Llama-family tokenizer directory may hold; whatever of these exists is copied.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "llmforge_tokenizer.json",  # llmforge's record of the special/chat token ids (TokenizerInfo)
    "added_tokens.json",
    "chat_template.jinja",  # transformers 5 stores the chat template beside tokenizer_config.json
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' "5GB"

# Tensors some checkpoints carry that are derived, not learned (old transformers saved RoPE's inv_freq).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def unwrap(model: nn.Module) -> Llama:
    """The ``Llama`` inside a ``torch.compile`` / DDP wrapper."""
    while not isinstance(model, Llama):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise ModelError(f"expected an llmforge Llama model, got {type(model).__name__}")
        model = inner
    return model


# ------------------------------------------------------------------------------------------------------
# State dicts
# ------------------------------------------------------------------------------------------------------


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a Hugging Face checkpoint stores: ``state_dict()`` without the tied ``lm_head.weight``.

    transformers stores a tied head once (under the embedding's name) and re-ties it on load.
    """
    m = unwrap(model)
    from .lora import has_lora

    if has_lora(m):
        raise ModelError(
            "the model still has LoRA adapters: merge them first (llmforge.model.lora.merge_lora) to write a full "
            "checkpoint, or write the adapter alone with save_adapter"
        )
    sd = m.state_dict()
    if m.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach() for k, v in sd.items()}


def load_hf_state_dict(
    model: Llama,
    tensors: Mapping[str, torch.Tensor],
    *,
    source: str = "state dict",
    model_type: str = "llama",
) -> None:
    """Load Hugging Face-named tensors into ``model`` after checking names and shapes.

    Raises ``CheckpointError`` naming ``source`` and the first missing, unexpected or mis-shaped tensor.
    Qwen2's o_proj has no bias (our q/k/v/o ``attention_bias`` has one): it is filled with zeros, exactly
    equivalent. Works for a model built on ``meta`` (tensors are assigned, then the head re-tied).
    """
    expected = hf_state_dict(model)
    have = {k: v for k, v in tensors.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if model.config.tie_word_embeddings:
        have.pop("lm_head.weight", None)  # some exporters store the tied copy anyway
    if model_type == "qwen2":
        for k, v in expected.items():
            if k.endswith("self_attn.o_proj.bias") and k not in have:
                ref = next(iter(have.values()))
                have[k] = torch.zeros(v.shape, dtype=ref.dtype, device=ref.device)
    _check_names_and_shapes(expected, have, source)
    sd = dict(have)
    if model.config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()


def _check_names_and_shapes(
    expected: Mapping[str, torch.Tensor], have: Mapping[str, Any], source: str
) -> None:
    missing = [k for k in expected if k not in have]
    unexpected = [k for k in have if k not in expected]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        hint = ""
        if missing[0] == "lm_head.weight":
            hint = "; if the head is tied to the embedding, set tie_word_embeddings: true in config.json"
        raise CheckpointError(f"{source}: missing tensor '{missing[0]}'{more}{hint}")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"{source}: unexpected tensor '{unexpected[0]}'{more}; the checkpoint does not match its config.json"
        )
    for k, ref in expected.items():
        shape = tuple(have[k].shape)
        if shape != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: tensor '{k}' has shape {list(shape)}, config.json implies {list(ref.shape)}"
            )


# ------------------------------------------------------------------------------------------------------
# Save
# ------------------------------------------------------------------------------------------------------


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split in state-dict order into groups of at most ``max_bytes`` (a larger tensor gets its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    generation_config: Mapping[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write ``model`` as a Hugging Face ``LlamaForCausalLM`` directory, atomically; return its path.

    The directory appears complete or not at all (an existing one is replaced only once the new one is
    written). Weights keep the model's dtype. ``generation_config`` entries are added to (and override) the
    bos/eos/pad ids taken from the model config. Tokenizer files found in ``tokenizer_dir`` are copied.
    """
    from safetensors.torch import save_file

    m = unwrap(model)
    if max_shard_bytes <= 0:
        raise ModelError(f"max_shard_bytes must be > 0 (got {max_shard_bytes})")
    tensors = {k: v.contiguous().cpu() for k, v in hf_state_dict(m).items()}
    dtypes = {t.dtype for t in tensors.values()}
    dtype_name = next((n for n, d in _DTYPE_NAMES.items() if dtypes == {d}), "float32")
    cfg_dict = m.config.to_hf_dict()
    cfg_dict["torch_dtype"] = cfg_dict["dtype"] = dtype_name

    tok_files: list[Path] = []
    if tokenizer_dir is not None:
        tdir = Path(tokenizer_dir)
        tok_files = [tdir / n for n in TOKENIZER_FILES if (tdir / n).is_file()]
        if not any(p.name in ("tokenizer.json", "tokenizer.model") for p in tok_files):
            raise CheckpointError(
                f"{tdir}: no tokenizer.json or tokenizer.model found; run the tokenizer stage first "
                "(checkpoints must carry their tokenizer)"
            )

    gen = {
        "_from_model_config": False,
        "bos_token_id": m.config.bos_token_id,
        "eos_token_id": m.config.eos_token_id,
        "pad_token_id": m.config.pad_token_id,
    }
    gen.update(generation_config or {})

    out = Path(directory)
    with atomic_dir(out) as tmp:
        shards = _shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            weight_map: dict[str, str] = {}
            n = len(shards)
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{n:05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {
                "metadata": {"total_size": total, "total_parameters": m.num_parameters()},
                "weight_map": dict(sorted(weight_map.items())),
            }
            _write_json(tmp / SAFE_INDEX_NAME, index)
        _write_json(tmp / CONFIG_NAME, cfg_dict)
        _write_json(tmp / GENERATION_CONFIG_NAME, gen)
        for p in tok_files:
            shutil.copyfile(p, tmp / p.name)
    log.debug("saved %s (%d tensors, %d shard(s), %s)", out, len(tensors), len(shards), dtype_name)
    return out


_DTYPE_NAMES = {n: torch_dtype(n) for n in DTYPES}  # the one dtype table: model.config.DTYPES


def _write_json(path: Path, obj: Any) -> None:
    # Inside atomic_dir the whole folder is renamed into place, so a plain write is enough here.
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------------
# Load
# ------------------------------------------------------------------------------------------------------


def _weight_files(d: Path) -> tuple[list[Path], Path | None]:
    """(weight files, index file or None) of a checkpoint directory, preferring safetensors."""
    for index_name in (SAFE_INDEX_NAME, BIN_INDEX_NAME):
        index = d / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: unreadable index ({type(err).__name__}: {err})") from None
            files = [d / f for f in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
            return files, index
    for name in (SAFE_WEIGHTS_NAME, BIN_WEIGHTS_NAME):
        if (d / name).is_file():
            return [d / name], None
    present = sorted(p.name for p in d.iterdir())
    raise CheckpointError(
        f"{d}: no weights found (expected {SAFE_WEIGHTS_NAME}, {SAFE_INDEX_NAME} or {BIN_WEIGHTS_NAME}; "
        f"the folder has: {', '.join(present) or 'nothing'})"
    )


def _iter_tensors(files: list[Path], device: str) -> Iterator[tuple[str, Path, torch.Tensor]]:
    """(name, file, tensor) for every tensor of the checkpoint, one at a time."""
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(f), framework="pt", device=device) as st:
                    for name in st.keys():  # noqa: SIM118 - safe_open is not a Mapping
                        yield name, f, st.get_tensor(name)
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{f}: corrupt or unreadable safetensors file ({err})") from None
        else:
            try:
                sd = torch.load(str(f), map_location=device, weights_only=True, mmap=True)
            except Exception as err:  # torch.load raises many types for a bad pickle/zip
                raise CheckpointError(f"{f}: corrupt or unreadable PyTorch weights ({err})") from None
            for name, t in sd.items():
                yield name, f, t


def load_pretrained(
    directory: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> Llama:
    """Load a local Hugging Face Llama / Mistral / Qwen2 checkpoint into an llmforge ``Llama`` (eval mode).

    dtype: default the dtype the weights are stored in. Raises ``CheckpointError`` naming the file and the
    tensor when the directory is incomplete, corrupt or does not match its ``config.json``.
    """
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: checkpoint directory not found")
    config_path = d / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: missing; a Hugging Face checkpoint needs a config.json")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
        config = LlamaConfig.from_hf_dict(raw, where=str(config_path))
    except ValueError as err:  # JSONDecodeError
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from None
    except CheckpointError:
        raise
    except ModelError as err:
        raise CheckpointError(str(err)) from None
    files, index = _weight_files(d)
    device = str(device)
    target = torch_dtype(dtype) if dtype is not None else None

    with torch.device("meta"):
        model = Llama(config)
    expected = hf_state_dict(model)

    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for name, f, t in _iter_tensors(files, device):
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name in expected and tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{f}: tensor '{name}' has shape {list(t.shape)}, {CONFIG_NAME} implies {list(expected[name].shape)}"
            )
        if target is None and t.is_floating_point():
            target = t.dtype if t.dtype in _DTYPE_NAMES.values() else torch.float32
        tensors[name] = t.to(dtype=target) if t.is_floating_point() and target is not None else t
        origin[name] = f
    source = str(index) if index is not None else str(files[0])
    if not tensors:
        raise CheckpointError(f"{source}: holds no tensors")
    try:
        load_hf_state_dict(model, tensors, source=source, model_type=raw.get("model_type", "llama"))
    except CheckpointError as err:
        # Name the shard that holds an unexpected tensor rather than the index.
        for name, f in origin.items():
            if f"'{name}'" in str(err):
                raise CheckpointError(str(err).replace(source, str(f), 1)) from None
        raise
    target = target or torch.float32
    model.to(dtype=target)  # any tensors not read from the file (Qwen2's zero o_proj bias) follow
    model.reset_rope(device)
    model.config.torch_dtype = next(n for n, dt in _DTYPE_NAMES.items() if dt == target)
    model.eval()
    return model
