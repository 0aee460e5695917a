"""LoRA adapters for the llmforge ``Llama``, saved and loaded in PEFT's file format.

LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) freezes a pretrained ``W`` and learns a low-rank update:

    y = x Wᵀ + b + s · B(A(dropout(x))),    A ∈ R^{r×in}, B ∈ R^{out×r},  s = alpha / r

(rsLoRA, Kalajdzievski 2023, https://arxiv.org/abs/2312.03732: ``s = alpha / sqrt(r)``). ``B`` starts at zero,
so an adapted model starts exactly equal to its base; ``A`` starts Kaiming-uniform (``a = sqrt(5)``, what
``nn.Linear`` and PEFT use).

Design choices, and why:

* ``LoRALinear`` *is* an ``nn.Linear`` that keeps its own ``weight``/``bias``. The base tensors keep their
  Hugging Face names (``model.layers.0.self_attn.q_proj.weight``), so everything that reads a full model —
  strict loading, ``hf_state_dict``, tied-weight logic, FSDP wrapping by module type — sees the same names
  it always did; the adapters add ``...q_proj.lora_A.weight`` / ``...q_proj.lora_B.weight`` beside them.
  (PEFT instead moves the base to ``...q_proj.base_layer.weight``, which renames every targeted weight.)
* Only ``nn.Linear`` layers inside the decoder blocks can be targeted. ``lm_head`` is refused because the
  fused chunked cross-entropy reads ``lm_head.weight`` directly (an adapter there would be silently
  ignored by the loss), and ``embed_tokens`` is an embedding, not a Linear.
* On disk an adapter is what ``peft.PeftModel.from_pretrained`` and vLLM's ``--lora-modules`` read:
  ``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha``, ``target_modules`` …) and
  ``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` (no adapter name).
* ``merge_lora`` folds ``W += s·B@A`` and swaps each ``LoRALinear`` back to a plain ``nn.Linear`` so
  ``save_pretrained`` writes an ordinary checkpoint.
* ``quantize_base_nf4`` stores the frozen base weights of the adapted layers as torchao NF4 tensors
  (QLoRA, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): ~4.1 bits per weight instead of 32,
  dequantized block-wise inside each matmul; the adapters stay in full precision.

Adapters are created in float32 when the base is bf16/fp16 (as PEFT does by default), because low-rank
updates of small magnitude lose most of their bits in bf16; the forward casts the input to the adapter
dtype and the adapter output back to the base output's dtype.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..console import get_logger
from ..errors import MissingDependencyError, ModelError
from ..utils.atomic import atomic_dir

log = get_logger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_BIN_NAME = "adapter_model.bin"  # older PEFT adapters; read, never written
PEFT_PREFIX = "base_model.model."  # PeftModel → LoraModel → the transformers model

# What an "all-linear" target expands to (PEFT's shorthand: every Linear but the output head).
ALL_LINEAR = "all-linear"
# Targets refused with an explanation rather than "no such Linear".
_REFUSED_TARGETS = {
    "lm_head": (
        "the training loss is a fused chunked cross-entropy that reads lm_head.weight directly, so an adapter "
        "on lm_head would be ignored by the loss; adapt the decoder's projections instead, or fine-tune fully"
    ),
    "embed_tokens": (
        "embed_tokens is an embedding, not a Linear layer, and embedding adapters are not supported; adapt the "
        "decoder's projections instead, or fine-tune fully"
    ),
}
# `--max-lora-rank` values vLLM accepts (vllm/config/lora.py, `MaxLoRARanks`, vLLM 0.2x–0.3x).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


# ------------------------------------------------------------------------------------------------------
# The spec
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how: the ``sft.lora`` manifest section, or an ``adapter_config.json``."""

    r: int  # rank of A (r × in) and B (out × r)
    alpha: float  # scale numerator: s = alpha / r (or alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0  # dropout on the adapter's input only; the base path never drops
    # Module-name suffixes ("q_proj", or "self_attn.q_proj"), matched as PEFT does: a module is adapted if its
    # name equals a target or ends with "." + target. "all-linear" means every decoder Linear.
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    use_rslora: bool = False  # rank-stabilised scale alpha / sqrt(r)

    def __post_init__(self) -> None:
        targets = self.target_modules
        if isinstance(targets, str):
            targets = (targets,)
        object.__setattr__(self, "target_modules", tuple(targets))
        problems = []
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            problems.append(f"r must be a positive integer (got {self.r!r})")
        if not isinstance(self.alpha, int | float) or isinstance(self.alpha, bool) or not self.alpha > 0:
            problems.append(f"alpha must be > 0 (got {self.alpha!r})")
        if not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout!r})")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            problems.append(
                f"target_modules must be a non-empty list of module names (got {list(targets)!r})"
            )
        if problems:
            raise ModelError("LoRA: " + "; ".join(problems))

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    @classmethod
    def from_config(cls, config: Any) -> LoraSpec:
        """A spec from anything with ``r``, ``alpha``, ``dropout``, ``target_modules`` (``use_rslora``
        optional): the manifest's ``LoraConfig``, another ``LoraSpec``, a ``SimpleNamespace``."""
        if isinstance(config, LoraSpec):
            return config
        try:
            return cls(
                r=config.r,
                alpha=config.alpha,
                dropout=config.dropout,
                target_modules=tuple(config.target_modules),
                use_rslora=bool(getattr(config, "use_rslora", False)),
            )
        except AttributeError as err:
            raise ModelError(f"LoRA settings need r, alpha, dropout and target_modules ({err})") from None


# ------------------------------------------------------------------------------------------------------
# The layer
# ------------------------------------------------------------------------------------------------------


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank adapter: ``F.linear(x, W, b) + s · lora_B(lora_A(dropout(x)))``.

    ``weight`` and ``bias`` are the frozen base (same names as a plain Linear); ``lora_A`` and ``lora_B`` are
    bias-free ``nn.Linear`` modules (keys ``lora_A.weight`` [r, in], ``lora_B.weight`` [out, r]).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        adapter_dtype: torch.dtype | None = None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.r = r
        self.lora_alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        adt = adapter_dtype or _adapter_dtype(self.weight.dtype)
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=adt)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=adt)
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: LoraSpec) -> LoRALinear:
        """Wrap ``linear``, reusing its weight and bias Parameters (no copy); adapters on its device."""
        with torch.device("meta"):
            new = cls(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                r=spec.r,
                alpha=spec.alpha,
                dropout=spec.dropout,
                use_rslora=spec.use_rslora,
                adapter_dtype=_adapter_dtype(linear.weight.dtype),
            )
        new.weight = linear.weight
        new.bias = linear.bias
        device = linear.weight.device
        new.lora_A.to_empty(device=device)
        new.lora_B.to_empty(device=device)
        new.reset_lora_parameters()
        new.train(linear.training)
        return new

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform (as PEFT), B zero: the adapted layer starts equal to the base layer.

        Call after anything that re-initialises every ``nn.Linear`` (``Llama.init_weights`` visits
        ``lora_A``/``lora_B`` too) or materialises a meta model with ``to_empty``.
        """
        if self.lora_A.weight.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # an NF4 weight dispatches to torchao's linear
        a = self.lora_A.weight
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype))))
        return out + (delta * self.scaling).to(out.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``s · B @ A`` in float32, shaped like ``weight``."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        rs = ", rslora" if self.use_rslora else ""
        return f"{super().extra_repr()}, r={self.r}, alpha={self.lora_alpha:g}, scale={self.scaling:g}{rs}"


def _adapter_dtype(base: torch.dtype) -> torch.dtype:
    # PEFT's autocast_adapter_dtype default: fp16/bf16 bases get float32 adapters.
    return torch.float32 if base in (torch.float16, torch.bfloat16) else base


# ------------------------------------------------------------------------------------------------------
# Apply, inspect, merge
# ------------------------------------------------------------------------------------------------------


def _root(model: nn.Module) -> nn.Module:
    """The module whose ``named_modules()`` names are the HF names (under ``torch.compile`` / DDP)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None or not isinstance(inner, nn.Module):
            return model
        model = inner


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _adaptable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` that may carry an adapter: all but the output head and adapters themselves."""
    out: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lm_head"):
            continue
        out[name] = module
    return out


def _resolve_targets(model: nn.Module, spec: LoraSpec) -> tuple[list[str], tuple[str, ...]]:
    """(module names to adapt, the target list as written to adapter_config.json)."""
    linears = _adaptable_linears(model)
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linears})
    targets = list(dict.fromkeys(spec.target_modules))
    if ALL_LINEAR in targets:
        targets = [t for t in targets if t != ALL_LINEAR] + [t for t in leaf_names if t not in targets]
    for t in targets:
        leaf = t.rsplit(".", 1)[-1]
        if leaf in _REFUSED_TARGETS:
            raise ModelError(f"LoRA target_modules: '{t}' cannot be adapted: {_REFUSED_TARGETS[leaf]}")
    chosen: list[str] = []
    for t in targets:
        hits = [n for n in linears if _matches(n, t)]
        if not hits:
            raise ModelError(
                f"LoRA target_modules: '{t}' matches no Linear layer of the model; valid names are "
                f"{', '.join(leaf_names)} (or '{ALL_LINEAR}')"
            )
        chosen.extend(hits)
    chosen_set = set(chosen)
    names = [n for n in linears if n in chosen_set]  # model order: deterministic initialisation
    return names, tuple(sorted(targets))


def apply_lora(model: nn.Module, spec: Any) -> list[str]:
    """Wrap the targeted Linears in ``LoRALinear`` in place, freeze everything else; return the wrapped names.

    ``spec``: a ``LoraSpec`` or anything with r / alpha / dropout / target_modules (the manifest's
    ``LoraConfig``). Adapters are initialised in module order, so the result is deterministic under
    ``torch.manual_seed``. Raises ``ModelError`` for a target that matches nothing (listing the valid names),
    for ``lm_head`` / ``embed_tokens`` targets, and for a model that already has adapters.
    """
    spec = LoraSpec.from_config(spec)
    root = _root(model)
    if has_lora(root):
        raise ModelError(
            "LoRA: the model already has adapters; merge them first (merge_lora) or start from the base model"
        )
    names, _ = _resolve_targets(root, spec)
    for p in root.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, LoRALinear.from_linear(getattr(parent, child), spec))
    n_train = sum(p.numel() for p in lora_parameters(root))
    n_all = sum(p.numel() for p in root.parameters())
    log.debug(
        "LoRA r=%d alpha=%g on %d layers: %d trainable of %d parameters (%.3f%%)",
        spec.r,
        spec.alpha,
        len(names),
        n_train,
        n_all,
        100.0 * n_train / max(n_all, 1),
    )
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every ``LoRALinear`` by module name, in model order."""
    return {n: m for n, m in _root(model).named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in _root(model).modules())


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (A then B of each layer, in model order): what the optimizer should get."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def reset_lora_parameters(model: nn.Module) -> None:
    """Re-initialise every adapter (A Kaiming-uniform, B zero), e.g. after ``Llama.init_weights``."""
    for m in lora_modules(model).values():
        m.reset_lora_parameters()


def lora_spec(model: nn.Module) -> LoraSpec:
    """The spec the model's adapters were built with (target names are the adapted modules' leaf names)."""
    mods = lora_modules(model)
    if not mods:
        raise ModelError("LoRA: the model has no adapters (apply_lora or load_adapter first)")
    kinds = {(m.r, m.lora_alpha, m.use_rslora, _dropout_p(m)) for m in mods.values()}
    if len(kinds) != 1:
        raise ModelError(
            f"LoRA: adapters have differing r/alpha/rslora/dropout {sorted(kinds)}; not one spec"
        )
    r, alpha, rslora, p = kinds.pop()
    # Leaf names ("q_proj") when they select exactly the adapted layers, else the full module names, so the
    # config written from this spec makes PEFT adapt the same layers and no others.
    leaves = tuple(sorted({n.rsplit(".", 1)[-1] for n in mods}))
    root = _root(model)
    by_leaf = {n for n in _adaptable_linears(root) if n.rsplit(".", 1)[-1] in leaves}
    targets = leaves if by_leaf == set(mods) else tuple(sorted(mods))
    return LoraSpec(r=r, alpha=alpha, dropout=p, target_modules=targets, use_rslora=rslora)


def _dropout_p(m: LoRALinear) -> float:
    return float(m.lora_dropout.p) if isinstance(m.lora_dropout, nn.Dropout) else 0.0


def _dense_weight(weight: torch.Tensor) -> torch.Tensor:
    """A plain tensor for ``weight`` (dequantized if it is a torchao NF4 tensor)."""
    get = getattr(weight, "get_original_weight", None)
    return get() if callable(get) else weight.detach()


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight (``W += s·B@A``, in float32) and restore plain ``nn.Linear``s.

    Afterwards the model holds only Hugging Face tensors, so ``save_pretrained`` writes an ordinary checkpoint
    that transformers and vLLM load. NF4 bases are dequantized first. ``requires_grad`` of the merged weights
    stays False (the model was frozen by ``apply_lora``); call ``model.requires_grad_(True)`` to train fully.
    Returns the merged module names.
    """
    root = _root(model)
    merged = []
    for name, m in lora_modules(root).items():
        w = _dense_weight(m.weight)
        new_w = (w.float() + m.delta_weight().to(w.device)).to(w.dtype)
        with torch.device("meta"):
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        plain.weight = nn.Parameter(new_w, requires_grad=False)
        plain.bias = m.bias
        plain.train(m.training)
        parent_name, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, child, plain)
        merged.append(name)
    return merged


# ------------------------------------------------------------------------------------------------------
# State dicts (PEFT's on-disk names)
# ------------------------------------------------------------------------------------------------------


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's on-disk names (``base_model.model.<module>.lora_A.weight``), detached."""
    sd: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        sd[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()
        sd[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return sd


@torch.no_grad()
def load_lora_state_dict(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], *, source: str = "state dict"
) -> None:
    """Copy PEFT-named adapter tensors into the model's adapters, strictly.

    Raises ``ModelError`` naming ``source`` and the first missing, unexpected or mis-shaped tensor. Values are
    cast to each adapter's dtype; nothing is written unless every tensor checks out.
    """
    expected = lora_state_dict(model)
    if not expected:
        raise ModelError(f"{source}: the model has no LoRA adapters to load into (apply_lora first)")
    _check_adapter_tensors({k: tuple(v.shape) for k, v in expected.items()}, tensors, source)
    for k, ref in expected.items():
        ref.copy_(tensors[k].to(device=ref.device, dtype=ref.dtype))


def _check_adapter_tensors(
    expected: Mapping[str, tuple[int, ...]], tensors: Mapping[str, torch.Tensor], source: str
) -> None:
    """Raise ``ModelError`` for the first missing, unexpected, mis-shaped or non-float adapter tensor."""
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelError(
            f"{source}: missing adapter tensor '{missing[0]}'{more}; the adapter was trained with other "
            "target_modules than the model has"
        )
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        hint = ""
        if any(
            ".base_layer." in k or k.endswith((".bias", "lora_embedding_A", "lora_embedding_B"))
            for k in unexpected
        ):
            hint = " (bias, embedding adapters and modules_to_save are not supported)"
        raise ModelError(f"{source}: unexpected tensor '{unexpected[0]}'{more}{hint}")
    for k, shape in expected.items():
        t = tensors[k]
        if tuple(t.shape) != tuple(shape):
            raise ModelError(
                f"{source}: tensor '{k}' has shape {list(t.shape)}, the model's adapter has {list(shape)} "
                "(different rank r or base model?)"
            )
        if not t.is_floating_point():
            raise ModelError(
                f"{source}: tensor '{k}' has dtype {t.dtype}; adapter weights must be floating point"
            )


def _planned_shapes(model: nn.Module, spec: LoraSpec) -> dict[str, tuple[int, ...]]:
    """The adapter tensors (PEFT names → shapes) ``apply_lora(model, spec)`` would create."""
    names, _ = _resolve_targets(_root(model), spec)
    linears = _adaptable_linears(_root(model))
    shapes: dict[str, tuple[int, ...]] = {}
    for n in names:
        lin = linears[n]
        shapes[f"{PEFT_PREFIX}{n}.lora_A.weight"] = (spec.r, lin.in_features)
        shapes[f"{PEFT_PREFIX}{n}.lora_B.weight"] = (lin.out_features, spec.r)
    return shapes


# ------------------------------------------------------------------------------------------------------
# Adapter folders
# ------------------------------------------------------------------------------------------------------


def adapter_config(spec: LoraSpec, *, base_model_name_or_path: str | None) -> dict[str, Any]:
    """``adapter_config.json`` for a plain LoRA, in PEFT 0.21's ``LoraConfig.save_pretrained`` form.

    The keys are the ``peft.LoraConfig`` fields that describe a plain LoRA (PEFT fills the rest — LoftQ,
    EVA, Megatron, aLoRA … settings — with their defaults when it loads), each with PEFT's default wherever
    llmforge has no say. Writing only long-standing fields keeps older PEFT versions from warning about
    unknown keys; PEFT reads back exactly the config it would have built (tested), and vLLM's
    ``PEFTHelper`` finds nothing it rejects (no DoRA, no bias, no modules_to_save, no rank/alpha patterns,
    a plain init).
    """
    alpha: int | float = int(spec.alpha) if float(spec.alpha).is_integer() else float(spec.alpha)
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": float(spec.dropout),
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": spec.r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(spec.target_modules),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": spec.use_rslora,
    }


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    base_model_name_or_path: str,
    spec: Any | None = None,
) -> Path:
    """Write the model's adapters as a PEFT LoRA folder, atomically; return its path.

    ``adapter_config.json`` + ``adapter_model.safetensors``: what ``peft.PeftModel.from_pretrained(base, dir)``
    and vLLM's ``--lora-modules name=dir`` load. ``base_model_name_or_path`` is recorded for PEFT (a path or
    hub id of the base checkpoint). ``spec`` (optional) is checked against the adapters actually in the model;
    a mismatch is an error rather than a config that lies about its tensors.
    """
    from safetensors.torch import save_file

    actual = lora_spec(model)
    if spec is not None:
        want = LoraSpec.from_config(spec)
        want_names, want_targets = _resolve_targets(_root(model), want)
        if (want.r, float(want.alpha), want.use_rslora, float(want.dropout)) != (
            actual.r,
            float(actual.alpha),
            actual.use_rslora,
            float(actual.dropout),
        ) or set(want_names) != set(lora_modules(model)):
            raise ModelError(
                f"save_adapter: spec {want} does not match the model's adapters {actual}; pass the spec the "
                "adapters were applied with (or none)"
            )
        actual = LoraSpec(
            r=actual.r,
            alpha=want.alpha,
            dropout=actual.dropout,
            target_modules=want_targets,
            use_rslora=actual.use_rslora,
        )
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    out = Path(directory)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        cfg = adapter_config(actual, base_model_name_or_path=base_model_name_or_path)
        (tmp / ADAPTER_CONFIG_NAME).write_text(
            json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
    log.debug("saved LoRA adapter %s (%d tensors, r=%d)", out, len(tensors), actual.r)
    return out


def read_adapter_config(directory: str | os.PathLike) -> tuple[LoraSpec, dict[str, Any]]:
    """(spec, raw config) of a PEFT LoRA folder; ``ModelError`` naming the file for anything unusable."""
    d = Path(directory)
    path = d / ADAPTER_CONFIG_NAME
    if not d.is_dir():
        raise ModelError(f"{d}: adapter folder not found")
    if not path.is_file():
        raise ModelError(
            f"{path}: missing; a LoRA adapter folder holds {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME}"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ModelError(f"{path}: not UTF-8 text ({err})") from None
    except json.JSONDecodeError as err:
        raise ModelError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise ModelError(f"{path}: peft_type is {peft_type!r}; only LORA adapters are supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in raw:
            raise ModelError(f"{path}: required field '{key}' is missing")
    unsupported = []
    if raw.get("use_dora"):
        unsupported.append("use_dora: true (DoRA)")
    if raw.get("bias", "none") != "none" or raw.get("lora_bias"):
        unsupported.append(f"bias: {raw.get('bias')!r} / lora_bias (trained biases)")
    if raw.get("modules_to_save"):
        unsupported.append(f"modules_to_save: {raw['modules_to_save']!r}")
    if raw.get("fan_in_fan_out"):
        unsupported.append("fan_in_fan_out: true (Conv1D-layout models)")
    if raw.get("rank_pattern") or raw.get("alpha_pattern"):
        unsupported.append("rank_pattern / alpha_pattern (per-layer ranks)")
    if raw.get("layers_to_transform") is not None or raw.get("layer_replication"):
        unsupported.append("layers_to_transform / layer_replication")
    if raw.get("exclude_modules"):
        unsupported.append(f"exclude_modules: {raw['exclude_modules']!r}")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian", "eva", "orthogonal"):
        unsupported.append(f"init_lora_weights: {init!r} (it changes the base weights)")
    targets = raw["target_modules"]
    if isinstance(targets, str) and targets != ALL_LINEAR:
        unsupported.append(f"target_modules as a regular expression ({targets!r}); list module names instead")
    if unsupported:
        raise ModelError(f"{path}: unsupported LoRA features: {'; '.join(unsupported)}")
    try:
        spec = LoraSpec(
            r=raw["r"],
            alpha=raw["lora_alpha"],
            dropout=raw.get("lora_dropout", 0.0) or 0.0,
            target_modules=(targets,) if isinstance(targets, str) else tuple(targets),
            use_rslora=bool(raw.get("use_rslora", False)),
        )
    except (ModelError, TypeError) as err:
        raise ModelError(f"{path}: {err}") from None
    return spec, raw


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> LoraSpec:
    """Load a PEFT LoRA folder into ``model`` (applying adapters from its config if the model has none).

    If the model already has adapters, they must match the folder's rank, alpha and targets. Loading is
    strict (see ``load_lora_state_dict``); on any error the model is left unchanged. Returns the folder's spec.
    """
    d = Path(directory)
    spec, _raw = read_adapter_config(d)
    if not has_lora(model):
        # Check the tensors against the adapters the config implies before touching the model, so a bad
        # folder leaves the model exactly as it was.
        tensors, source = _read_adapter_tensors(d)
        _check_adapter_tensors(_planned_shapes(model, spec), tensors, source)
        apply_lora(model, spec)
        load_lora_state_dict(model, tensors, source=source)
        return spec
    have = lora_spec(model)
    want_names, _ = _resolve_targets(_root(model), spec)
    if (have.r, float(have.alpha), have.use_rslora) != (spec.r, float(spec.alpha), spec.use_rslora) or set(
        want_names
    ) != set(lora_modules(model)):
        raise ModelError(
            f"{d / ADAPTER_CONFIG_NAME}: adapter (r={spec.r}, alpha={spec.alpha:g}, targets "
            f"{list(spec.target_modules)}) does not match the model's adapters (r={have.r}, alpha="
            f"{have.alpha:g}, targets {list(have.target_modules)}); load it into the base model instead"
        )
    tensors, source = _read_adapter_tensors(d)
    load_lora_state_dict(model, tensors, source=source)
    return spec


def _read_adapter_tensors(d: Path) -> tuple[dict[str, torch.Tensor], str]:
    st_path, bin_path = d / ADAPTER_WEIGHTS_NAME, d / ADAPTER_BIN_NAME
    if st_path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st_path)), str(st_path)
        except (SafetensorError, OSError) as err:
            raise ModelError(f"{st_path}: corrupt or unreadable safetensors file ({err})") from None
    if bin_path.is_file():
        try:
            return torch.load(str(bin_path), map_location="cpu", weights_only=True), str(bin_path)
        except Exception as err:  # torch.load raises many types for a bad pickle/zip
            raise ModelError(f"{bin_path}: corrupt or unreadable PyTorch weights ({err})") from None
    raise ModelError(f"{d}: no adapter weights ({ADAPTER_WEIGHTS_NAME} or {ADAPTER_BIN_NAME})")


def vllm_max_lora_rank(r: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that serves a rank-``r`` adapter."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if r <= allowed:
            return allowed
    raise ModelError(
        f"LoRA rank {r} is above {VLLM_MAX_LORA_RANKS[-1]}, the largest --max-lora-rank vLLM supports; "
        "use a smaller r or merge the adapter (merge_lora) and serve the full model"
    )


# ------------------------------------------------------------------------------------------------------
# QLoRA-style NF4 base
# ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def quantize_base_nf4(model: nn.Module, *, block_size: int = 64, scaler_block_size: int = 256) -> list[str]:
    """Store the frozen base weight of every ``LoRALinear`` as a torchao NF4 tensor; return the layer names.

    NF4 (QLoRA's 4-bit NormalFloat) with double-quantized block scales: ``block_size`` weights share one
    scale; ``scaler_block_size`` scales share one int8 quantization of them (reduced to a divisor of the layer's
    block count when it does not divide it). Matmuls dequantize on the fly (torchao's ``linear_nf4``), the
    backward pass reaches the input and the adapters, never the base. Only the adapted layers are quantized;
    embeddings, norms and ``lm_head`` stay as they are. ``merge_lora`` dequantizes again.
    """
    try:
        from torchao.quantization import to_nf4
    except ImportError as err:
        raise MissingDependencyError(
            "torchao", "train", "4-bit NF4 base weights (QLoRA)", hint="pip install 'torchao>=0.18'"
        ) from err
    mods = lora_modules(model)
    if not mods:
        raise ModelError(
            "quantize_base_nf4: the model has no LoRA adapters; apply_lora first (QLoRA quantizes "
            "only the frozen base weights of adapted layers)"
        )
    done = []
    for name, m in mods.items():
        w = m.weight
        if _is_nf4(w):
            continue
        if not w.is_floating_point() or w.device.type == "meta":
            raise ModelError(
                f"quantize_base_nf4: {name}.weight is {w.dtype} on {w.device}; load real weights first"
            )
        numel = w.numel()
        if numel % block_size:
            raise ModelError(
                f"quantize_base_nf4: {name}.weight has {numel} elements, not a multiple of block_size={block_size}"
            )
        sbs = math.gcd(numel // block_size, scaler_block_size)
        m.weight = nn.Parameter(to_nf4(w.detach().contiguous(), block_size, sbs), requires_grad=False)
        done.append(name)
    return done


def _is_nf4(t: torch.Tensor) -> bool:
    return type(t).__name__ == "NF4Tensor"


def base_weight_nbytes(model: nn.Module) -> int:
    """Bytes held by the base weights of the adapted layers (NF4 counts its packed data and scales)."""
    total = 0
    for m in lora_modules(model).values():
        w = m.weight
        if _is_nf4(w):
            inner, _ = w.__tensor_flatten__()
            total += sum(getattr(w, a).numel() * getattr(w, a).element_size() for a in inner)
        else:
            total += w.numel() * w.element_size()
    return total
