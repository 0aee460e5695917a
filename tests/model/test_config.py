"""LlamaConfig ↔ config.json, presets, and manifest resolution with errors that name the manifest key."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import typing

import pytest
import torch

from llmforge.errors import ModelError
from llmforge.manifest.model import ModelSection
from llmforge.model import PRESETS, Llama, LlamaConfig, config_from_manifest, preset_config

from .conftest import LLAMA3_SCALING, tiny_config

transformers = pytest.importorskip("transformers")


# -- config.json interop ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"rope_scaling": LLAMA3_SCALING, "tie_word_embeddings": True, "eos_token_id": [2, 5]},
        {"head_dim": 32},
    ],
)
def test_hf_dict_round_trip_through_transformers(overrides):
    cfg = tiny_config(**overrides)
    assert LlamaConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    # what transformers 5 writes back (rope_parameters, dtype) reads as the same config
    hf = transformers.LlamaConfig.from_dict(cfg.to_hf_dict())
    hf_dict = json.loads(hf.to_json_string())
    assert LlamaConfig.from_hf_dict(hf_dict) == cfg


def test_transformers_4_layout():
    d = tiny_config().to_hf_dict()
    del d["rope_parameters"], d["dtype"]
    d["rope_theta"] = 500000.0
    d["rope_scaling"] = {"type": "llama3", **{k: v for k, v in LLAMA3_SCALING.items() if k != "rope_type"}}
    cfg = LlamaConfig.from_hf_dict(d)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == LLAMA3_SCALING


def test_unsupported_configs_are_refused_clearly():
    d = tiny_config().to_hf_dict()
    with pytest.raises(ModelError, match="rope_type 'yarn' is not supported"):
        LlamaConfig.from_hf_dict(
            {**d, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}
        )
    with pytest.raises(ModelError, match="model_type 'gpt2'"):
        LlamaConfig.from_hf_dict({**d, "model_type": "gpt2"})
    with pytest.raises(ModelError, match="quantized"):
        LlamaConfig.from_hf_dict({**d, "quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(ModelError, match="hidden_act 'gelu'"):
        LlamaConfig.from_hf_dict({**d, "hidden_act": "gelu"})
    with pytest.raises(ModelError, match="malformed llama config"):
        LlamaConfig.from_hf_dict({"model_type": "llama"})


def test_sliding_window_rules(caplog):
    base = {**tiny_config().to_hf_dict(), "model_type": "mistral"}
    with caplog.at_level(logging.WARNING, logger="llmforge"):
        assert LlamaConfig.from_hf_dict({**base, "sliding_window": None}).max_position_embeddings == 128
        assert LlamaConfig.from_hf_dict({**base, "sliding_window": 4096}).max_position_embeddings == 128
        assert not caplog.records
        assert LlamaConfig.from_hf_dict({**base, "sliding_window": 64}).max_position_embeddings == 64
        assert "capped at 64" in caplog.text
    qwen = {**base, "model_type": "qwen2", "sliding_window": 64}

    def qwen_context(**kw) -> int:
        return LlamaConfig.from_hf_dict({**qwen, **kw}).max_position_embeddings

    assert qwen_context(use_sliding_window=False) == 128
    assert qwen_context(use_sliding_window=True, max_window_layers=2) == 128  # no layer >= 2 slides
    assert qwen_context(use_sliding_window=True, max_window_layers=1) == 64
    assert LlamaConfig.from_hf_dict(qwen).attention_bias


# -- presets ------------------------------------------------------------------------------------------

# (vocabulary the size is stated at, lower, upper bound)
PRESET_RANGES = {
    "tiny": (8000, 1e6, 5e6),
    "small": (8000, 20e6, 40e6),
    "124M": (32000, 100e6, 150e6),
    "350M": (32000, 300e6, 400e6),
    "1B": (32000, 0.9e9, 1.4e9),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_sizes(name):
    vocab, lo, hi = PRESET_RANGES[name]
    cfg = preset_config(name, vocab)
    with torch.device("meta"):  # no memory for the big ones
        model = Llama(cfg)
    n = model.num_parameters()
    assert lo <= n <= hi, f"{name}: {n / 1e6:.1f}M"
    assert n == cfg.num_parameters()
    assert model.flops_per_token(1024) > 6 * model.num_parameters(exclude_embeddings=True)


def test_manifest_preset_names_match():
    ann = ModelSection.model_fields["preset"].annotation
    literal = next(a for a in typing.get_args(ann) if typing.get_origin(a) is typing.Literal)
    assert set(typing.get_args(literal)) == set(PRESETS)
    for name, fld in ModelSection.model_fields.items():
        assert fld.description, f"model.{name} needs a description"


def test_config_module_does_not_import_torch():
    code = (
        "import sys\n"
        "from llmforge.model import config_from_manifest, PRESETS, LlamaConfig\n"
        "from llmforge.manifest.model import ModelSection\n"
        "config_from_manifest(ModelSection(), 8000, bos_id=1, eos_id=2, pad_id=0)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- manifest resolution -------------------------------------------------------------------------------


def _resolve(vocab: int = 8000, **section):
    return config_from_manifest(ModelSection.model_validate(section), vocab, bos_id=1, eos_id=2, pad_id=0)


def test_preset_then_explicit_fields():
    cfg = _resolve(preset="tiny", num_hidden_layers=2, dropout=0.1, rope_scaling={"factor": 4.0})
    assert cfg.hidden_size == PRESETS["tiny"]["hidden_size"] and cfg.num_hidden_layers == 2
    assert cfg.vocab_size == 8000 and (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 0)
    assert cfg.attention_dropout == 0.1 and cfg.rope_scaling["rope_type"] == "llama3"
    # changing the head count alone keeps the preset's query/KV ratio (tiny: 4 heads, 2 KV heads)
    assert _resolve(num_attention_heads=8).num_key_value_heads == 4
    assert _resolve(vocab_size=8064).vocab_size == 8064  # padded vocabularies are allowed


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"num_attention_heads": 3}, "model.num_attention_heads"),
        ({"num_key_value_heads": 3}, "model.num_key_value_heads"),
        ({"vocab_size": 4000}, "model.vocab_size"),
        ({"preset": None, "hidden_size": 64}, "model.intermediate_size"),
    ],
)
def test_manifest_errors_name_the_key(section, key):
    with pytest.raises(ModelError, match=rf"^{key}: "):
        _resolve(**section)


def test_special_ids_outside_vocab():
    with pytest.raises(ModelError, match=r"model\.eos_token_id: id 9000"):
        config_from_manifest(ModelSection(), 8000, bos_id=1, eos_id=9000, pad_id=0)


def test_model_from_checkpoint(tmp_path):
    ckpt = tmp_path / "base"
    ckpt.mkdir()
    base = tiny_config(eos_token_id=[2, 3])
    (ckpt / "config.json").write_text(json.dumps(base.to_hf_dict()))

    cfg = config_from_manifest(
        ModelSection.model_validate({"from": "base", "max_position_embeddings": 256}),
        97,
        bos_id=1,
        eos_id=2,
        pad_id=0,
        root=tmp_path,
    )
    assert cfg.hidden_size == 64 and cfg.max_position_embeddings == 256 and cfg.eos_token_id == [2, 3]

    def resolve(vocab=97, eos=2, **extra):
        section = ModelSection.model_validate({"from": str(ckpt), **extra})
        return config_from_manifest(section, vocab, bos_id=1, eos_id=eos, pad_id=0)

    with pytest.raises(ModelError, match=r"^model\.hidden_size: cannot change the shape"):
        resolve(hidden_size=128)
    with pytest.raises(
        ModelError, match=r"^model\.from: .*vocab_size 97 is smaller than the tokenizer's 8000"
    ):
        resolve(vocab=8000)
    with pytest.raises(ModelError, match=r"tokenizer's EOS \[7\] is not among"):
        resolve(eos=7)
    with pytest.raises(ModelError, match=r"config\.json"):
        config_from_manifest(
            ModelSection.model_validate({"from": str(tmp_path / "missing")}), 97, bos_id=1, eos_id=2, pad_id=0
        )
