"""The model's shape: ``LlamaConfig``, named presets, and the manifest → config resolution.

This module does not import torch, so the CLI and the pipeline can resolve and fingerprint a model's shape
(and count its parameters) without paying for a torch import.

``LlamaConfig``'s fields map one to one onto ``transformers.LlamaConfig``; ``to_hf_dict`` writes a
``config.json`` that transformers (4.x and 5.x) and vLLM load as ``LlamaForCausalLM``, and ``from_hf_dict``
reads Llama, Mistral and Qwen2 ``config.json`` files (the three differ only in defaults, Qwen2's q/k/v bias and
Mistral/Qwen2's sliding window).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..console import get_logger
from ..errors import ModelError

log = get_logger(__name__)

# RoPE variants we implement exactly as transformers does; anything else is refused rather than approximated.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class LlamaConfig:
    """Shape and numerics of a Llama-architecture decoder. Field names are transformers' ``LlamaConfig``'s."""

    vocab_size: int  # rows of the embedding / lm_head; >= the tokenizer's vocabulary (may be padded)
    hidden_size: int  # model width (residual stream)
    intermediate_size: int  # SwiGLU inner width (gate/up projections' output size)
    num_hidden_layers: int  # transformer blocks
    num_attention_heads: int  # query heads
    num_key_value_heads: int | None = None  # key/value heads; < query heads = grouped-query attention (GQA)
    head_dim: int | None = None  # per-head width; None = hidden_size // num_attention_heads (Mistral sets it)
    max_position_embeddings: int = 2048  # longest sequence (RoPE tables and KV caches are sized by it)
    rope_theta: float = 10000.0  # RoPE base frequency (Llama 3 uses 500000 for long contexts)
    # None / {"rope_type": "default"}, {"rope_type": "linear", "factor": f}, or Llama-3.1 style
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon (Llama 2/3 use 1e-5; transformers' default is 1e-6)
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix (saves vocab*hidden params)
    attention_bias: bool = False  # bias on q/k/v/o projections (Qwen2 = q/k/v bias and a zero o bias)
    mlp_bias: bool = False  # bias on gate/up/down projections (rare; kept for config.json fidelity)
    attention_dropout: float = 0.0  # dropout on attention probabilities while training; off by default
    hidden_act: str = "silu"  # MLP activation; only SiLU (SwiGLU) is implemented
    initializer_range: float = 0.02  # std of the normal init of every Linear/Embedding weight
    bos_token_id: int | None = 1  # beginning-of-sequence id (from the tokenizer)
    eos_token_id: int | list[int] | None = 2  # end-of-sequence id(s); generation stops at any of them
    pad_token_id: int | None = None  # padding id (from the tokenizer); never attended to
    torch_dtype: str = "float32"  # dtype the weights are stored in ("float32", "bfloat16", "float16")

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if (
            self.head_dim is None
            and self.num_attention_heads
            and self.hidden_size % self.num_attention_heads == 0
        ):
            self.head_dim = self.hidden_size // self.num_attention_heads
        if isinstance(self.eos_token_id, tuple):
            self.eos_token_id = list(self.eos_token_id)
        if self.rope_scaling is not None:
            self.rope_scaling = _normalize_rope_scaling(self.rope_scaling, "rope_scaling")

    # -- derived ------------------------------------------------------------------------------------------
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """EOS ids as a tuple (``eos_token_id`` may be an int, a list or None)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def num_parameters(self) -> int:
        """Parameter count computed from the shape alone (tied embeddings counted once)."""
        h, v, i, hd = self.hidden_size, self.vocab_size, self.intermediate_size, self.head_dim or 0
        nq, nkv = self.num_attention_heads, self.num_key_value_heads or self.num_attention_heads
        attn = h * nq * hd + 2 * h * nkv * hd + nq * hd * h
        if self.attention_bias:
            attn += nq * hd + 2 * nkv * hd + h
        mlp = 3 * h * i + ((2 * i + h) if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * h  # two RMSNorm weights
        embed = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embed + h  # + final norm

    # -- validation ---------------------------------------------------------------------------------------
    def validate(self, where: str = "model") -> LlamaConfig:
        """Raise ``ModelError`` naming ``<where>.<field>`` for an impossible shape; return self."""

        def bad(key: str, msg: str) -> ModelError:
            return ModelError(f"{where}.{key}: {msg}")

        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise bad(key, f"must be a positive integer (got {value!r})")
        nh, kv = self.num_attention_heads, self.num_key_value_heads
        if not isinstance(kv, int) or kv <= 0:
            raise bad("num_key_value_heads", f"must be a positive integer (got {kv!r})")
        if self.hidden_size % nh:
            # transformers' LlamaConfig refuses this even when head_dim is set explicitly.
            raise bad(
                "num_attention_heads",
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {nh}; "
                f"pick a head count that divides it (e.g. {_divisor_near(self.hidden_size, nh)})",
            )
        if nh % kv:
            raise bad(
                "num_key_value_heads",
                f"num_attention_heads {nh} is not divisible by num_key_value_heads {kv}; "
                f"grouped-query attention needs a divisor of {nh} (e.g. {_divisor_near(nh, kv)})",
            )
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise bad(
                "head_dim", f"must be a positive even integer, RoPE rotates pairs (got {self.head_dim!r})"
            )
        if self.max_position_embeddings <= 0:
            raise bad("max_position_embeddings", f"must be > 0 (got {self.max_position_embeddings})")
        if self.rope_theta <= 0:
            raise bad("rope_theta", f"must be > 0 (got {self.rope_theta})")
        if self.rms_norm_eps <= 0:
            raise bad("rms_norm_eps", f"must be > 0 (got {self.rms_norm_eps})")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise bad("dropout", f"must be in [0, 1) (got {self.attention_dropout})")
        if self.hidden_act not in ("silu", "swish"):
            raise bad("hidden_act", f"only 'silu' (SwiGLU) is implemented (got {self.hidden_act!r})")
        if self.torch_dtype not in DTYPES:
            raise bad("torch_dtype", f"must be one of {', '.join(DTYPES)} (got {self.torch_dtype!r})")
        if self.rope_scaling is not None:
            _normalize_rope_scaling(self.rope_scaling, f"{where}.rope_scaling")
        for key in ("bos_token_id", "pad_token_id"):
            value = getattr(self, key)
            if value is not None and not 0 <= value < self.vocab_size:
                raise bad(key, f"id {value} is outside the vocabulary [0, {self.vocab_size})")
        for value in self.eos_token_ids:
            if not 0 <= value < self.vocab_size:
                raise bad("eos_token_id", f"id {value} is outside the vocabulary [0, {self.vocab_size})")
        return self

    # -- transformers interop -----------------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` of an equivalent ``transformers`` ``LlamaForCausalLM``.

        RoPE settings are written both the transformers-4 way (``rope_theta`` + ``rope_scaling``, which vLLM
        and llama.cpp converters read) and the transformers-5 way (``rope_parameters``); both load the same.
        """
        rope_params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(self.rope_theta)}
        if self.rope_scaling is not None:
            rope_params = {**self.rope_scaling, "rope_theta": float(self.rope_theta)}
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": float(self.rope_theta),
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling is not None else None,
            "rope_parameters": rope_params,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "attention_dropout": self.attention_dropout,
            "hidden_act": "silu",
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "pretraining_tp": 1,
            "use_cache": True,
            "torch_dtype": self.torch_dtype,  # transformers 4.x key
            "dtype": self.torch_dtype,  # transformers 5.x key
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, where: str = "config.json") -> LlamaConfig:
        """Read a Llama, Mistral or Qwen2 ``config.json`` (transformers 4.x or 5.x layout).

        Qwen2 becomes ``attention_bias=True`` (its o_proj has no bias, which the loader fills with zeros, an
        exact equivalence). A sliding window only matters for sequences longer than the window, so when one
        is active and shorter than ``max_position_embeddings`` the context is capped at the window (with a
        warning): every sequence the model then accepts gives the same result as in transformers.
        """
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = d.get("architectures")
            raise ModelError(
                f"{where}: model_type {model_type!r} (architectures {archs}) is not supported; "
                f"llmforge loads {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints"
            )
        if d.get("quantization_config"):
            method = d["quantization_config"].get("quant_method", "?")
            raise ModelError(
                f"{where}: this is a quantized ({method}) checkpoint; train from the full-precision model "
                "instead. To run a GPTQ model: `llmforge serve` / the serve stage, or in Python "
                "llmforge.quantize.load.load_model(directory)"
            )
        try:
            return cls._from_hf_dict(d, model_type, where)
        except (KeyError, TypeError, ValueError) as err:
            raise ModelError(
                f"{where}: malformed {model_type} config ({type(err).__name__}: {err})"
            ) from None

    @classmethod
    def _from_hf_dict(cls, d: dict[str, Any], model_type: str, where: str) -> LlamaConfig:
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ModelError(f"{where}: hidden_act {act!r} is not supported (only 'silu')")
        if float(d.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ModelError(f"{where}: partial_rotary_factor != 1 is not supported")
        theta, scaling = _read_rope(d, where)
        max_pos = int(d.get("max_position_embeddings", 2048))
        max_pos = _apply_sliding_window(d, model_type, max_pos, where)
        nh = int(d["num_attention_heads"])
        dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
        if dtype not in DTYPES:
            dtype = "float32"
        eos = d.get("eos_token_id")
        cfg = cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=nh,
            num_key_value_heads=int(d.get("num_key_value_heads") or nh),
            head_dim=int(d["head_dim"]) if d.get("head_dim") else None,
            max_position_embeddings=max_pos,
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=True if model_type == "qwen2" else bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            attention_dropout=float(d.get("attention_dropout") or 0.0),
            hidden_act="silu",
            initializer_range=float(d.get("initializer_range", 0.02)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=list(eos) if isinstance(eos, list | tuple) else eos,
            pad_token_id=d.get("pad_token_id"),
            torch_dtype=dtype,
        )
        return cfg.validate(where)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> LlamaConfig:
        """Read ``<path>/config.json`` (or ``path`` itself if it is the file)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise ModelError(
                f"{p}: not found; expected a Hugging Face checkpoint directory with a config.json"
            )
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ModelError(f"{p}: cannot read JSON ({err})") from None
        if not isinstance(d, dict):
            raise ModelError(f"{p}: expected a JSON object")
        return cls.from_hf_dict(d, where=str(p))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (for lineage and fingerprints)."""
        return asdict(self)


def _divisor_near(n: int, target: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), d))


def _normalize_rope_scaling(rs: dict[str, Any], where: str) -> dict[str, Any] | None:
    """Canonical ``rope_scaling`` dict (``rope_type`` key, only the keys that matter), or None for default."""
    if not isinstance(rs, dict):
        raise ModelError(f"{where}: must be a mapping with a `rope_type` (got {rs!r})")
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ModelError(
            f"{where}: rope_type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}); "
            "results would differ from the original model"
        )
    if kind == "linear":
        if "factor" not in rs:
            raise ModelError(f"{where}: linear RoPE scaling needs `factor`")
        return {"rope_type": "linear", "factor": float(rs["factor"])}
    missing = [k for k in _LLAMA3_KEYS if rs.get(k) is None]
    if missing:
        raise ModelError(f"{where}: llama3 RoPE scaling needs {', '.join(missing)}")
    out: dict[str, Any] = {"rope_type": "llama3"}
    for k in _LLAMA3_KEYS:
        out[k] = int(rs[k]) if k == "original_max_position_embeddings" else float(rs[k])
    if out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ModelError(f"{where}: high_freq_factor must be > low_freq_factor")
    return out


def _read_rope(d: dict[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params:
        # transformers 5 layout: theta inside rope_parameters; per-layer-type dicts are not Llama-family
        if any(isinstance(v, dict) for v in params.values()):
            raise ModelError(f"{where}: per-layer rope_parameters are not supported")
        theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
        return theta, _normalize_rope_scaling(params, f"{where}: rope_parameters")
    theta = float(d.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling")
    return theta, (_normalize_rope_scaling(scaling, f"{where}: rope_scaling") if scaling else None)


def _apply_sliding_window(d: dict[str, Any], model_type: str, max_pos: int, where: str) -> int:
    window = d.get("sliding_window")
    if model_type == "llama" or window is None:
        return max_pos
    if model_type == "qwen2":
        # Qwen2 uses the window only when asked to, and only in layers >= max_window_layers.
        n_layers = int(d["num_hidden_layers"])
        layer_types = d.get("layer_types")
        if layer_types is not None:
            active = "sliding_attention" in layer_types
        else:
            active = (
                bool(d.get("use_sliding_window")) and int(d.get("max_window_layers", n_layers)) < n_layers
            )
        if not active:
            return max_pos
    window = int(window)
    if window >= max_pos:
        return max_pos  # the window never cuts anything the model can see
    log.warning(
        "%s: sliding_window=%d < max_position_embeddings=%d; llmforge implements full attention, so the "
        "context is capped at %d tokens (identical results for every sequence up to that length)",
        where,
        window,
        max_pos,
        window,
    )
    return window


# ------------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------------

# Shapes only; vocab_size and the special ids come from the tokenizer. Parameter counts (tied embeddings
# counted once): tiny ≈ 1.8M and small ≈ 28M at the default 8000-token vocabulary; 124M ≈ 110M (GPT-2 small
# shape, 12 × 768), 350M ≈ 340M and 1B ≈ 1.04B (Llama-3.2-1B shape) at a 32000-token vocabulary.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(  # CPU tests and the `llmforge init` demo: trains in minutes on a laptop
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
    "small": dict(  # a real but cheap model: one GPU, hours
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
    "124M": dict(  # GPT-2-small scale with Llama blocks
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
    "350M": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
    "1B": dict(  # Llama-3.2-1B shape
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
}

# Manifest fields that are copied onto LlamaConfig under the same name.
_SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_bias",
    "initializer_range",
)
# Fields a manifest may change on top of a `model.from` checkpoint without invalidating its weights.
_SAFE_OVER_CHECKPOINT = ("max_position_embeddings", "rope_theta", "rope_scaling", "dropout")


def config_from_manifest(
    model_section: Any,
    vocab_size: int,
    *,
    bos_id: int | None,
    eos_id: int | list[int] | None,
    pad_id: int | None,
    root: str | os.PathLike | None = None,
) -> LlamaConfig:
    """Resolve the manifest's ``model:`` section into a validated ``LlamaConfig``.

    ``vocab_size`` and the special ids are the tokenizer's. Without ``model.from``: the preset's shape, then
    every field set explicitly in the section overrides it. With ``model.from``: that checkpoint's
    ``config.json`` (relative paths resolve against ``root``); only context/RoPE/dropout may be changed on
    top of it, and its vocabulary and special ids must agree with the tokenizer. Errors name the manifest key.
    """
    explicit = _explicit_fields(model_section)
    scaling = explicit.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        scaling = scaling.model_dump() if hasattr(scaling, "model_dump") else dict(scaling)
    from_ = getattr(model_section, "from_", None)

    if from_ is not None:
        path = Path(from_)
        if root is not None and not path.is_absolute():
            path = Path(root) / path
        cfg = LlamaConfig.from_pretrained(path)
        clash = [k for k in explicit if k not in _SAFE_OVER_CHECKPOINT and k not in ("preset", "from_")]
        clash = [k for k in clash if explicit[k] != getattr(cfg, k, None)]
        if clash:
            raise ModelError(
                f"model.{clash[0]}: cannot change the shape of the `model.from` checkpoint {path} "
                f"(it has {clash[0]}={getattr(cfg, clash[0], None)!r}); remove the key or drop `model.from`"
            )
        _apply_safe_overrides(cfg, explicit, scaling)
        if vocab_size > cfg.vocab_size:
            raise ModelError(
                f"model.from: the checkpoint's vocab_size {cfg.vocab_size} is smaller than the tokenizer's "
                f"{vocab_size}; use the checkpoint's own tokenizer (`tokenizer.from: {path}`)"
            )
        _check_ids_agree(cfg, bos_id, eos_id, pad_id, path)
        return cfg.validate("model")

    preset = getattr(model_section, "preset", None)
    base: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ModelError(f"model.preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        base = dict(PRESETS[preset])
    values: dict[str, Any] = {**base, "vocab_size": vocab_size}
    for k in _SHAPE_FIELDS:
        if explicit.get(k) is not None:
            values[k] = explicit[k]
    missing = [
        k
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        if k not in values
    ]
    if missing:
        raise ModelError(f"model.{missing[0]}: required when no `model.preset` is given")
    if "num_key_value_heads" not in explicit and "num_attention_heads" in explicit and preset is not None:
        # Changing the head count of a preset without saying how many KV heads: keep the preset's
        # query/KV ratio when it still divides, else fall back to full multi-head attention.
        ratio = base["num_attention_heads"] // base["num_key_value_heads"]
        nh = values["num_attention_heads"]
        values["num_key_value_heads"] = nh // ratio if nh % ratio == 0 else nh
    if values["vocab_size"] < vocab_size:
        raise ModelError(
            f"model.vocab_size: {values['vocab_size']} is smaller than the tokenizer's vocabulary ({vocab_size}); "
            "remove the key (it defaults to the tokenizer's size) or raise it"
        )
    cfg = LlamaConfig(
        **values,
        rope_scaling=scaling,
        attention_dropout=float(getattr(model_section, "dropout", 0.0) or 0.0),
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    return cfg.validate("model")


def _explicit_fields(section: Any) -> dict[str, Any]:
    """Fields the user actually set in the manifest (pydantic's ``model_fields_set``), with their values."""
    if isinstance(section, dict):
        return {("from_" if k == "from" else k): v for k, v in section.items()}
    names = getattr(section, "model_fields_set", None)
    if names is None:
        names = {f.name for f in fields(section)} if hasattr(section, "__dataclass_fields__") else set()
    return {n: getattr(section, n) for n in names}


def _apply_safe_overrides(cfg: LlamaConfig, explicit: dict[str, Any], scaling: dict | None) -> None:
    if explicit.get("max_position_embeddings") is not None:
        cfg.max_position_embeddings = int(explicit["max_position_embeddings"])
    if explicit.get("rope_theta") is not None:
        cfg.rope_theta = float(explicit["rope_theta"])
    if "rope_scaling" in explicit:
        cfg.rope_scaling = _normalize_rope_scaling(scaling, "model.rope_scaling") if scaling else None
    if explicit.get("dropout") is not None:
        cfg.attention_dropout = float(explicit["dropout"])


def _check_ids_agree(
    cfg: LlamaConfig, bos_id: int | None, eos_id: int | list[int] | None, pad_id: int | None, path: Path
) -> None:
    """The checkpoint was trained with some special ids; a tokenizer that disagrees is an error."""
    hint = f"use the checkpoint's own tokenizer (`tokenizer.from: {path}`)"
    if bos_id is not None and cfg.bos_token_id is not None and bos_id != cfg.bos_token_id:
        raise ModelError(
            f"model.from: the checkpoint's bos_token_id {cfg.bos_token_id} != tokenizer's {bos_id}; {hint}"
        )
    tok_eos = [eos_id] if isinstance(eos_id, int) else list(eos_id or [])
    if tok_eos and cfg.eos_token_ids and not set(tok_eos) <= set(cfg.eos_token_ids):
        raise ModelError(
            f"model.from: the tokenizer's EOS {tok_eos} is not among the checkpoint's eos_token_id "
            f"{list(cfg.eos_token_ids)}; {hint}"
        )
    if cfg.bos_token_id is None:
        cfg.bos_token_id = bos_id
    if not cfg.eos_token_ids:
        cfg.eos_token_id = eos_id
    if cfg.pad_token_id is None:
        cfg.pad_token_id = pad_id


def preset_config(name: str, vocab_size: int = 32000, **overrides: Any) -> LlamaConfig:
    """A validated config for a named preset (handy in tests, benchmarks and notebooks)."""
    if name not in PRESETS:
        raise ModelError(f"model.preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return LlamaConfig(**{**PRESETS[name], "vocab_size": vocab_size, **overrides}).validate("model")
