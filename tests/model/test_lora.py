"""LoRA adapters: PEFT parity in both directions, merging, training semantics, errors, vLLM's reader, NF4."""

from __future__ import annotations

import copy
import json
import math
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmforge.errors import ModelError
from llmforge.model import Llama, load_pretrained, save_pretrained
from llmforge.model.lora import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    LoRALinear,
    LoraSpec,
    apply_lora,
    base_weight_nbytes,
    has_lora,
    load_adapter,
    load_lora_state_dict,
    lora_modules,
    lora_parameters,
    lora_spec,
    lora_state_dict,
    merge_lora,
    quantize_base_nf4,
    reset_lora_parameters,
    save_adapter,
    vllm_max_lora_rank,
)

from .conftest import randomize, tiny_config

ATOL = 1e-5
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A random tiny base checkpoint written by llmforge (both sides of every parity test load it)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("lora") / "base"
    save_pretrained(randomize(Llama(tiny_config())), d)
    return d


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def _lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    logits = getattr(out, "logits", out)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _train(model: nn.Module, ids: torch.Tensor, steps: int = 3, lr: float = 0.5) -> None:
    """A few SGD steps on the adapters, so B != 0 and A has moved (B starts at zero: A moves from step 2)."""
    model.train()
    opt = torch.optim.SGD(lora_parameters(model), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        _lm_loss(model, ids).backward()
        opt.step()
    model.eval()


def _hf(base_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------------------
# PEFT parity
# ------------------------------------------------------------------------------------------------------

OURS_TO_PEFT = {
    "all-linear-dropout": (LoraSpec(r=4, alpha=8, dropout=0.1, target_modules=("all-linear",)), True),
    "qv-rslora": (LoraSpec(r=8, alpha=4, target_modules=("q_proj", "v_proj"), use_rslora=True), True),
    # one layer's q_proj only, no spec passed to save_adapter: the config must name exactly that layer
    "one-layer-derived": (
        LoraSpec(r=2, alpha=3.5, target_modules=("model.layers.1.self_attn.q_proj", "down_proj")),
        False,
    ),
}


@pytest.mark.parametrize("case", list(OURS_TO_PEFT))
def test_peft_loads_our_adapter_with_equal_logits(case, base_dir, tmp_path, tokens):
    peft = pytest.importorskip("peft")
    spec, pass_spec = OURS_TO_PEFT[case]
    ours = load_pretrained(base_dir)
    torch.manual_seed(0)
    apply_lora(ours, spec)
    _train(ours, tokens)
    assert all(m.lora_B.weight.abs().sum() > 0 for m in lora_modules(ours).values())
    out = save_adapter(
        ours, tmp_path / "adapter", base_model_name_or_path=str(base_dir), spec=spec if pass_spec else None
    )
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(_hf(base_dir), out, is_trainable=True).eval()
    problems = [
        str(w.message) for w in caught if re.search(r"missing|unexpected|ignored", str(w.message), re.I)
    ]
    assert not problems, problems

    # PEFT built adapters on exactly our layers (no extra zero-initialised ones) ...
    peft_keys = set(peft.get_peft_model_state_dict(peft_model).keys())
    assert peft_keys == set(lora_state_dict(ours))
    # ... and computes what we compute,
    torch.testing.assert_close(_logits(peft_model, tokens), _logits(ours, tokens), atol=ATOL, rtol=0)
    # in training mode too: dropout sits on the adapter input only, drawn in the same layer order, so the
    # same seed gives the same outputs and the same adapter gradients.
    ours.train()
    peft_model.train()
    ours.zero_grad(set_to_none=True)  # drop _train's last gradients
    torch.manual_seed(5)
    our_loss = _lm_loss(ours, tokens)
    torch.manual_seed(5)
    peft_loss = _lm_loss(peft_model, tokens)
    torch.testing.assert_close(our_loss, peft_loss, atol=ATOL, rtol=0)
    if spec.dropout:
        assert not torch.allclose(our_loss, _lm_loss(ours.eval(), tokens))
    our_loss.backward()
    peft_loss.backward()
    peft_grads = {
        n.replace(".default", ""): p.grad for n, p in peft_model.named_parameters() if p.requires_grad
    }
    for n, m in lora_modules(ours).items():
        for x in ("A", "B"):
            key = f"base_model.model.{n}.lora_{x}.weight"
            torch.testing.assert_close(
                getattr(m, f"lora_{x}").weight.grad, peft_grads[key], atol=ATOL, rtol=1e-4
            )


def test_adapter_config_is_what_peft_would_write(base_dir, tmp_path):
    """Every key we write is a ``peft.LoraConfig`` field, and PEFT reads back the config it would build."""
    peft = pytest.importorskip("peft")
    spec = LoraSpec(r=8, alpha=16, dropout=0.05, target_modules=tuple(ALL), use_rslora=True)
    model = load_pretrained(base_dir)
    apply_lora(model, spec)
    d = save_adapter(model, tmp_path / "a", base_model_name_or_path="org/base", spec=spec)
    written = json.loads((d / ADAPTER_CONFIG_NAME).read_text())
    fields = set(peft.LoraConfig.__dataclass_fields__)
    assert set(written) <= fields, set(written) - fields

    loaded = peft.PeftConfig.from_pretrained(d).to_dict()
    direct = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=ALL,
        use_rslora=True,
        task_type="CAUSAL_LM",
        base_model_name_or_path="org/base",
        inference_mode=True,
    ).to_dict()
    assert loaded == direct


PEFT_TO_OURS = {
    "attn-mlp": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"]),
    "all-rslora": dict(r=8, lora_alpha=2, target_modules="all-linear", use_rslora=True),
}


@pytest.mark.parametrize("case", list(PEFT_TO_OURS))
def test_we_load_a_peft_adapter_with_equal_logits(case, base_dir, tmp_path, tokens):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    # init_lora_weights=False: PEFT draws B at random too, so the adapter changes the outputs.
    cfg = peft.LoraConfig(
        task_type="CAUSAL_LM", init_lora_weights=False, lora_dropout=0.1, **PEFT_TO_OURS[case]
    )
    peft_model = peft.get_peft_model(_hf(base_dir), cfg).eval()
    peft_model.save_pretrained(tmp_path / "peft")

    ours = load_pretrained(base_dir)
    spec = load_adapter(ours, tmp_path / "peft")
    ours.eval()
    assert spec.r == cfg.r and spec.use_rslora == cfg.use_rslora
    assert not torch.allclose(_logits(ours, tokens), _logits(load_pretrained(base_dir), tokens), atol=1e-3)
    torch.testing.assert_close(_logits(ours, tokens), _logits(peft_model, tokens), atol=ATOL, rtol=0)
    # and the adapter we would write back holds the same tensors under the same names
    theirs = peft.get_peft_model_state_dict(peft_model)
    ours_sd = lora_state_dict(ours)
    assert set(theirs) == set(ours_sd)
    for k, v in theirs.items():
        torch.testing.assert_close(ours_sd[k], v, atol=0, rtol=0)


def test_we_load_a_pickled_peft_adapter(base_dir, tmp_path, tokens):
    """Older PEFT versions wrote adapter_model.bin; vLLM reads it too, so we do."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = peft.LoraConfig(
        task_type="CAUSAL_LM", init_lora_weights=False, r=2, lora_alpha=4, target_modules=["v_proj"]
    )
    peft_model = peft.get_peft_model(_hf(base_dir), cfg).eval()
    peft_model.save_pretrained(tmp_path / "peft", safe_serialization=False)
    assert (tmp_path / "peft" / "adapter_model.bin").is_file()
    ours = load_pretrained(base_dir)
    load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(_logits(ours.eval(), tokens), _logits(peft_model, tokens), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------------
# Merge
# ------------------------------------------------------------------------------------------------------


def test_merged_outputs_equal_and_save_as_a_plain_checkpoint(base_dir, tmp_path, tokens):
    model = load_pretrained(base_dir)
    torch.manual_seed(0)
    apply_lora(model, LoraSpec(r=4, alpha=8, dropout=0.1, target_modules=("all-linear",)))
    _train(model, tokens)
    adapted = _logits(model, tokens)

    names = merge_lora(model)
    assert len(names) == 2 * 7
    assert not has_lora(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    torch.testing.assert_close(_logits(model, tokens), adapted, atol=ATOL, rtol=0)

    save_pretrained(model, tmp_path / "merged")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    with safe_open(str(base_dir / "model.safetensors"), "pt") as f:
        assert keys == set(f.keys())  # strict HF names: no adapter or base_layer keys
    reloaded = load_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(reloaded, tokens), adapted, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------------
# Training semantics
# ------------------------------------------------------------------------------------------------------


def test_only_adapters_train_and_all_of_them_change(base_dir, tokens):
    base = load_pretrained(base_dir)
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    names = apply_lora(model, LoraSpec(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj")))
    assert names == [
        f"model.layers.{i}.{n}"
        for i in range(2)
        for n in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    ]
    # B = 0: the adapted model starts exactly equal to its base
    torch.testing.assert_close(_logits(model, tokens), _logits(base, tokens), atol=0, rtol=0)
    # HF base names unchanged, adapter names beside them
    keys = set(model.state_dict())
    assert set(base.state_dict()) <= keys
    assert keys - set(base.state_dict()) == {
        k.removeprefix("base_model.model.") for k in lora_state_dict(model)
    }

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}.weight" for n in names for x in "AB"}
    assert [id(p) for p in lora_parameters(model)] == [
        id(p) for n, p in model.named_parameters() if p.requires_grad
    ]  # the optimizer's order is the model's order

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    for _ in range(2):  # A's gradient is B^T(...) = 0 at step 1; both move by step 2
        opt.zero_grad()
        loss = _lm_loss(model, tokens)
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        opt.step()
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


def test_gradient_checkpointing_gives_the_same_adapter_gradients(base_dir, tokens):
    """The embedding is frozen, so no block input requires grad: the (non-reentrant) checkpoint must still
    carry gradients to the adapters inside the recomputed blocks."""
    grads = []
    for checkpointing in (False, True):
        model = load_pretrained(base_dir)
        torch.manual_seed(0)
        apply_lora(model, LoraSpec(r=4, alpha=8, target_modules=("all-linear",)))
        with torch.no_grad():
            for p in lora_parameters(model):
                p.normal_(std=0.05)
        model.gradient_checkpointing = checkpointing
        model.train()
        model(tokens[:, :-1], labels=tokens[:, 1:]).backward()
        grads.append([p.grad for p in lora_parameters(model)])
    assert all(g is not None for g in grads[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_init_is_deterministic_and_as_peft(base_dir):
    spec = LoraSpec(r=4, alpha=8, target_modules=("q_proj",))

    def adapters(seed: int) -> list[torch.Tensor]:
        m = load_pretrained(base_dir)
        torch.manual_seed(seed)
        apply_lora(m, spec)
        return [p.detach().clone() for p in lora_parameters(m)]

    a, b, c = adapters(0), adapters(0), adapters(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    lora_a, lora_b = a[0], a[1]
    assert torch.count_nonzero(lora_b) == 0
    # Kaiming-uniform with a=sqrt(5) over fan_in=in_features: U(-1/sqrt(in), 1/sqrt(in))
    bound = 1 / math.sqrt(lora_a.shape[1])
    assert lora_a.abs().max() <= bound and lora_a.abs().max() > 0.9 * bound

    m = load_pretrained(base_dir)
    apply_lora(m, spec)
    m.init_weights()  # what the meta/FSDP path runs: it redraws every nn.Linear, adapters included
    reset_lora_parameters(m)
    assert all(torch.count_nonzero(mod.lora_B.weight) == 0 for mod in lora_modules(m).values())


def test_spec_from_manifest_section_and_scale():
    from llmforge.manifest.train import LoraConfig

    spec = LoraSpec.from_config(LoraConfig(r=8, alpha=32, dropout=0.0, target_modules=["q_proj"]))
    assert spec == LoraSpec(r=8, alpha=32, dropout=0.0, target_modules=("q_proj",))
    assert spec.scale == 4.0
    assert LoraSpec(r=16, alpha=8, use_rslora=True).scale == 2.0
    assert LoraSpec.from_config(SimpleNamespace(r=2, alpha=1, dropout=0.5, target_modules=["o_proj"])).r == 2


def test_bf16_base_keeps_float32_adapters(base_dir, tokens):
    model = load_pretrained(base_dir, dtype="bfloat16")
    apply_lora(model, LoraSpec(r=4, alpha=8, target_modules=("q_proj",)))
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert _logits(model, tokens).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (
            ("qproj",),
            r"'qproj' matches no Linear.*valid names are down_proj, gate_proj, k_proj, o_proj, q_proj",
        ),
        (
            ("q_proj", "lm_head"),
            r"'lm_head' cannot be adapted: the training loss is a fused chunked cross-entropy",
        ),
        (("model.embed_tokens",), r"'model.embed_tokens' cannot be adapted: embed_tokens is an embedding"),
    ],
)
def test_bad_targets_are_clear_errors(targets, message, base_dir):
    model = load_pretrained(base_dir)
    with pytest.raises(ModelError, match=message):
        apply_lora(model, LoraSpec(r=4, alpha=8, target_modules=targets))
    assert not has_lora(model) and all(p.requires_grad for p in model.parameters())  # untouched


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(alpha=0), "alpha must be > 0"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(target_modules=()), "target_modules must be a non-empty list"),
    ],
)
def test_bad_spec_values(fields, message):
    with pytest.raises(ModelError, match=message):
        LoraSpec(**{"r": 4, "alpha": 8, **fields})


def test_applying_twice_is_refused(base_dir):
    model = load_pretrained(base_dir)
    apply_lora(model, LoraSpec(r=4, alpha=8))
    with pytest.raises(ModelError, match="already has adapters"):
        apply_lora(model, LoraSpec(r=4, alpha=8))


@pytest.mark.parametrize(
    ("config_text", "message"),
    [
        (None, r"adapter_config.json: missing; a LoRA adapter folder holds"),
        (
            '{"r": 4, "lora_alpha": 8,\n "target_modules": [q_proj]}',
            r"adapter_config.json:2:21: not valid JSON",
        ),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"r": 4, "target_modules": ["q_proj"]}', "required field 'lora_alpha' is missing"),
        (
            '{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": true}',
            r"unsupported LoRA .*DoRA",
        ),
        ('{"r": 4, "lora_alpha": 8, "target_modules": ".*q_proj"}', "regular expression"),
        ('{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "peft_type": "IA3"}', "only LORA"),
        ('{"r": -1, "lora_alpha": 8, "target_modules": ["q_proj"]}', "r must be a positive integer"),
    ],
)
def test_bad_adapter_config_is_a_clear_error(config_text, message, base_dir, tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    if config_text is not None:
        (d / ADAPTER_CONFIG_NAME).write_text(config_text)
    model = load_pretrained(base_dir)
    with pytest.raises(ModelError, match=message) as err:
        load_adapter(model, d)
    assert str(d) in str(err.value)
    assert not has_lora(model)


def test_bad_adapter_tensors_name_the_source(base_dir, tmp_path):
    model = load_pretrained(base_dir)
    apply_lora(model, LoraSpec(r=4, alpha=8, target_modules=("q_proj",)))
    good = {k: v.clone() for k, v in lora_state_dict(model).items()}
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    missing = {k: v for k, v in good.items() if k != key}
    with pytest.raises(ModelError, match=rf"x.safetensors: missing adapter tensor '{re.escape(key)}'"):
        load_lora_state_dict(model, missing, source="x.safetensors")
    extra = {**good, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": torch.zeros(64)}
    with pytest.raises(ModelError, match=r"x.safetensors: unexpected tensor .*lora_B.bias.*bias"):
        load_lora_state_dict(model, extra, source="x.safetensors")
    wrong = {**good, key: torch.zeros(8, 64)}
    with pytest.raises(ModelError, match=r"has shape \[8, 64\], the model's adapter has \[4, 64\]"):
        load_lora_state_dict(model, wrong, source="x.safetensors")

    # a corrupt weights file, through load_adapter
    d = save_adapter(model, tmp_path / "a", base_model_name_or_path="base")
    cfg = json.loads((d / ADAPTER_CONFIG_NAME).read_text())
    (d / ADAPTER_CONFIG_NAME).write_text(json.dumps({**cfg, "r": 8}))  # the config lies about the rank
    fresh = load_pretrained(base_dir)
    with pytest.raises(
        ModelError, match=r"adapter_model.safetensors: tensor .* has shape \[4, 64\], .* \[8, 64\]"
    ):
        load_adapter(fresh, d)
    assert not has_lora(fresh) and all(p.requires_grad for p in fresh.parameters())  # left as it was
    (d / ADAPTER_WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match=r"adapter_model.safetensors: corrupt or unreadable"):
        load_adapter(fresh, d)
    assert not has_lora(fresh)


def test_adapter_that_does_not_match_existing_adapters(base_dir, tmp_path):
    model = load_pretrained(base_dir)
    apply_lora(model, LoraSpec(r=4, alpha=8, target_modules=("q_proj",)))
    d = save_adapter(model, tmp_path / "a", base_model_name_or_path="base")
    other = load_pretrained(base_dir)
    apply_lora(other, LoraSpec(r=2, alpha=8, target_modules=("q_proj",)))
    with pytest.raises(ModelError, match=r"does not match the model's adapters \(r=2"):
        load_adapter(other, d)
    with pytest.raises(ModelError, match="does not match the model's adapters"):
        save_adapter(model, tmp_path / "b", base_model_name_or_path="base", spec=LoraSpec(r=4, alpha=8))
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------------------
# vLLM's reader
# ------------------------------------------------------------------------------------------------------

# What vLLM reads from an adapter folder (`--lora-modules name=DIR`), mirrored from vLLM's source at
# vllm-project/vllm main as of 2026 (PEFTHelper with rank_pattern support; vLLM 0.3x):
#   vllm/lora/peft_helper.py  PEFTHelper.from_local_dir / from_dict: adapter_config.json must hold r,
#       lora_alpha, target_modules (the dataclass fields without defaults); _validate_features rejects
#       modules_to_save (other than classifier/score), use_dora, lora_bias, init_lora_weights strings
#       that change the base (pissa/olora/corda/loftq), alora_invocation_tokens, layer_replication,
#       use_bdlora, use_qalora; validate_legal rejects bias != "none" and max(r, *rank_pattern) >
#       --max-lora-rank, whose choices are vllm/config/lora.py `MaxLoRARanks` (largest 512);
#       scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.
#   vllm/lora/lora_model.py  LoRAModel.from_local_checkpoint: reads adapter_model.safetensors (else
#       .bin / .pt); every key's module must end in one of the model's expected LoRA modules.
#   vllm/lora/utils.py  parse_fine_tuned_lora_name: strips "base_model.model.", accepts only
#       "<module>.lora_A.weight" / "<module>.lora_B.weight" (or lora_embedding_A/B).
#   vllm/model_executor/models/llama.py  packed_modules_mapping {"qkv_proj": [q,k,v]_proj,
#       "gate_up_proj": [gate,up]_proj}; with o_proj and down_proj these are Llama's expected modules.
VLLM_LLAMA_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
VLLM_MAX_RANK = 512


def _vllm_problems(d: Path, max_lora_rank: int) -> list[str]:
    """Everything vLLM's LoRA loader would reject in ``d`` (empty: it loads)."""
    from safetensors import safe_open

    cfg = json.loads((d / ADAPTER_CONFIG_NAME).read_text())
    problems = [f"missing {k}" for k in ("r", "lora_alpha", "target_modules") if k not in cfg]
    if [m for m in cfg.get("modules_to_save") or [] if m not in ("classifier", "score")]:
        problems.append("modules_to_save")
    for flag in (
        "use_dora",
        "lora_bias",
        "alora_invocation_tokens",
        "layer_replication",
        "use_bdlora",
        "use_qalora",
    ):
        if cfg.get(flag):
            problems.append(flag)
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian", "eva", "orthogonal", "mica", "lora_ga"):
        problems.append(f"init_lora_weights={init}")
    if cfg.get("bias", "none") != "none":
        problems.append("bias")
    if max([cfg["r"], *(cfg.get("rank_pattern") or {}).values()]) > max_lora_rank:
        problems.append("rank above --max-lora-rank")
    if not (d / "adapter_model.safetensors").is_file():
        problems.append("no adapter_model.safetensors")
        return problems
    pairs: dict[str, set[str]] = {}
    with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118
            name = key.removeprefix("base_model.model.")
            parts = name.split(".")
            if not (parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B")):
                problems.append(f"unsupported LoRA weight {key}")
                continue
            module = ".".join(parts[:-2])
            if module.rsplit(".", 1)[-1] not in VLLM_LLAMA_LORA_MODULES:
                problems.append(f"unexpected module {module}")
            t = f.get_tensor(key)
            r = cfg["r"]
            if (
                not t.is_floating_point()
                or t.dim() != 2
                or (t.shape[0] if parts[-2] == "lora_A" else t.shape[1]) != r
            ):
                problems.append(f"{key}: shape {list(t.shape)} is not rank {r}")
            pairs.setdefault(module, set()).add(parts[-2])
    problems += [f"{m} lacks lora_A or lora_B" for m, ab in pairs.items() if ab != {"lora_A", "lora_B"}]
    return problems


@pytest.mark.parametrize("r", [1, 8, 20])
def test_vllm_accepts_our_adapter_folder(r, base_dir, tmp_path, tokens):
    model = load_pretrained(base_dir)
    apply_lora(model, LoraSpec(r=r, alpha=2 * r, target_modules=("all-linear",)))
    _train(model, tokens, steps=1)
    d = save_adapter(model, tmp_path / "a", base_model_name_or_path=str(base_dir))
    max_rank = vllm_max_lora_rank(r)
    assert max_rank >= r and max_rank in (1, 8, 16, 32, 64, 128, 256, 320, 512)
    assert _vllm_problems(d, max_rank) == []
    cfg = json.loads((d / ADAPTER_CONFIG_NAME).read_text())
    assert set(cfg["target_modules"]) == VLLM_LLAMA_LORA_MODULES
    assert cfg["lora_alpha"] / cfg["r"] == 2  # vLLM's scaling equals ours


def test_vllm_checker_can_fail(base_dir, tmp_path):
    """The mirror above is not vacuous: it flags what vLLM rejects."""
    model = load_pretrained(base_dir)
    apply_lora(model, LoraSpec(r=16, alpha=8, target_modules=("q_proj",)))
    d = save_adapter(model, tmp_path / "a", base_model_name_or_path="base")
    assert _vllm_problems(d, max_lora_rank=8) == ["rank above --max-lora-rank"]
    cfg = json.loads((d / ADAPTER_CONFIG_NAME).read_text())
    (d / ADAPTER_CONFIG_NAME).write_text(
        json.dumps({**cfg, "use_dora": True, "modules_to_save": ["lm_head"]})
    )
    assert _vllm_problems(d, max_lora_rank=16) == ["modules_to_save", "use_dora"]
    with pytest.raises(ModelError, match="above 512"):
        vllm_max_lora_rank(VLLM_MAX_RANK + 1)


# ------------------------------------------------------------------------------------------------------
# QLoRA-style NF4 base
# ------------------------------------------------------------------------------------------------------


def test_nf4_base_trains_adapters_and_saves_memory(tokens):
    pytest.importorskip("torchao")
    cfg = tiny_config(hidden_size=128, intermediate_size=256)
    torch.manual_seed(0)
    model = Llama(cfg)
    apply_lora(model, LoraSpec(r=8, alpha=16, target_modules=("all-linear",)))
    dense = copy.deepcopy(model)
    fp32_bytes = base_weight_nbytes(model)

    names = quantize_base_nf4(model)
    assert len(names) == 14
    nf4_bytes = base_weight_nbytes(model)
    bits = 32 * nf4_bytes / fp32_bytes
    assert 4.0 < bits < 4.6, bits  # 4-bit codes + double-quantized block scales

    # the NF4 model computes exactly what a model with the dequantized base computes
    for (n, q), (_, d) in zip(lora_modules(model).items(), lora_modules(dense).items(), strict=True):
        with torch.no_grad():
            d.weight.copy_(q.weight.get_original_weight())
        assert type(q.weight).__name__ == "NF4Tensor", n
    torch.testing.assert_close(_logits(model, tokens), _logits(dense, tokens), atol=ATOL, rtol=0)

    packed = {n: m.weight.quantized_data.clone() for n, m in lora_modules(model).items()}
    model.train()
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    for step in range(2):
        opt.zero_grad()
        loss = _lm_loss(model, tokens)
        assert torch.isfinite(loss)
        loss.backward()
        grads = [p.grad for p in lora_parameters(model)]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        if step == 1:
            assert all(g.abs().sum() > 0 for g in grads)
        opt.step()
    assert all(torch.equal(m.weight.quantized_data, packed[n]) for n, m in lora_modules(model).items())

    model.eval()
    adapted = _logits(model, tokens)
    merge_lora(model)
    assert all(
        type(m) is nn.Linear and type(m.weight) is nn.Parameter
        for m in model.modules()
        if isinstance(m, nn.Linear)
    )
    torch.testing.assert_close(_logits(model, tokens), adapted, atol=ATOL, rtol=0)


def test_nf4_needs_adapters_first(base_dir):
    pytest.importorskip("torchao")
    with pytest.raises(ModelError, match="apply_lora first"):
        quantize_base_nf4(load_pretrained(base_dir))


def test_lora_spec_round_trips_through_the_folder(base_dir, tmp_path):
    model = load_pretrained(base_dir)
    spec = LoraSpec(r=4, alpha=6, dropout=0.2, target_modules=("gate_proj", "up_proj"), use_rslora=True)
    apply_lora(model, spec)
    assert lora_spec(model) == spec
    assert isinstance(model.model.layers[0].mlp.up_proj, LoRALinear)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_()
    d = save_adapter(model, tmp_path / "a", base_model_name_or_path="base", spec=spec)
    again = load_pretrained(base_dir)
    assert load_adapter(again, d) == spec
    with torch.no_grad():
        for p in lora_parameters(again):
            p.zero_()
    assert load_adapter(again, d) == spec  # into matching adapters already there: the resume path
    # bit-exact: what a resumed LoRA run needs
    for (k, v), (k2, v2) in zip(lora_state_dict(model).items(), lora_state_dict(again).items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


def test_merge_keeps_biases_and_tied_heads(tokens):
    """Qwen2-style q/k/v/o biases stay in the merged Linear; a tied head stays tied and untouched."""
    torch.manual_seed(0)
    model = randomize(Llama(tiny_config(attention_bias=True, tie_word_embeddings=True)))
    apply_lora(model, LoraSpec(r=4, alpha=8, target_modules=("all-linear",)))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(std=0.1)
    model.eval()
    adapted = _logits(model, tokens)
    bias = model.model.layers[0].self_attn.q_proj.bias
    merge_lora(model)
    assert model.model.layers[0].self_attn.q_proj.bias is bias
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(_logits(model, tokens), adapted, atol=ATOL, rtol=0)
