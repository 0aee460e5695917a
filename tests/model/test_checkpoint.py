"""Hugging Face checkpoint directories: layout, sharding, tokenizer files, atomicity, precise errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llmforge.errors import CheckpointError
from llmforge.model import Llama, hf_state_dict, load_pretrained, save_pretrained

from .conftest import randomize, tiny_config


@pytest.fixture
def model() -> Llama:
    torch.manual_seed(0)
    return randomize(Llama(tiny_config())).eval()


def _same_weights(a: Llama, b: Llama) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_layout_config_and_generation_config(model, tmp_path):
    out = save_pretrained(model, tmp_path / "ckpt", generation_config={"temperature": 0.7, "do_sample": True})
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["torch_dtype"] == "float32" and cfg["num_key_value_heads"] == 2
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 0)
    assert gen["temperature"] == 0.7 and gen["do_sample"] is True
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert "lm_head.weight" in f.keys()  # noqa: SIM118
    _same_weights(load_pretrained(out), model)


def test_tied_head_is_stored_once_and_retied(tmp_path):
    torch.manual_seed(0)
    model = randomize(Llama(tiny_config(tie_word_embeddings=True)))
    save_pretrained(model, tmp_path / "tied")
    stored = load_file(str(tmp_path / "tied" / "model.safetensors"))
    assert "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored
    loaded = load_pretrained(tmp_path / "tied")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert all(p.requires_grad for p in loaded.parameters())  # ready for continued training
    assert loaded.num_parameters() == model.num_parameters() == model.config.num_parameters()


def test_sharded_round_trip(model, tmp_path):
    total = sum(t.numel() * t.element_size() for t in hf_state_dict(model).values())
    out = save_pretrained(model, tmp_path / "sharded", max_shard_bytes=total // 4)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 4 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(hf_state_dict(model))
    assert set(index["weight_map"].values()) == set(shards)
    loaded = load_pretrained(out)
    _same_weights(loaded, model)

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=0)


def test_tokenizer_files_are_copied(model, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"version": "1.0"}')
    (tok / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (tok / "special_tokens_map.json").write_text("{}")
    (tok / "unrelated.txt").write_text("not copied")
    out = save_pretrained(model, tmp_path / "ckpt", tokenizer_dir=tok)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_text() == (tok / name).read_text()
    assert not (out / "unrelated.txt").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"no tokenizer\.json or tokenizer\.model"):
        save_pretrained(model, tmp_path / "ckpt2", tokenizer_dir=empty)
    assert not (tmp_path / "ckpt2").exists()


def test_save_is_atomic(model, tmp_path, monkeypatch):
    out = save_pretrained(model, tmp_path / "ckpt")
    before = (out / "model.safetensors").read_bytes()

    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    torch.manual_seed(1)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(randomize(Llama(tiny_config()), seed=5), out)
    assert (out / "model.safetensors").read_bytes() == before  # the old checkpoint is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary leftovers


def test_bf16_checkpoint_and_dtype_override(model, tmp_path):
    out = save_pretrained(model.to(torch.bfloat16), tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_pretrained(out)
    assert loaded.lm_head.weight.dtype == torch.bfloat16 and loaded.config.torch_dtype == "bfloat16"
    up = load_pretrained(out, dtype="float32")
    assert all(p.dtype == torch.float32 for p in up.parameters())
    assert up.rope_cos.device.type == "cpu" and up.rope_cos.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(up(torch.tensor([[1, 2, 3]]))).all()


def test_pytorch_model_bin_and_legacy_inv_freq(model, tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    sd = dict(hf_state_dict(model))
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # saved by old transformers; ignored
    torch.save(sd, d / "pytorch_model.bin")
    (d / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    _same_weights(load_pretrained(d), model)


# -- errors -------------------------------------------------------------------------------------------


def _resave_without(path, drop: str | None = None, add: dict | None = None) -> None:
    tensors = load_file(str(path))
    if drop:
        tensors.pop(drop)
    tensors.update(add or {})
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor_names_file_and_tensor(model, tmp_path):
    out = save_pretrained(model, tmp_path / "ckpt")
    _resave_without(out / "model.safetensors", drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: missing tensor 'model\.layers\.1\.mlp\.up_proj"
    ):
        load_pretrained(out)


def test_missing_untied_head_hints_at_tying(model, tmp_path):
    out = save_pretrained(model, tmp_path / "ckpt")
    _resave_without(out / "model.safetensors", drop="lm_head.weight")
    with pytest.raises(CheckpointError, match="tie_word_embeddings"):
        load_pretrained(out)


def test_unexpected_tensor_names_its_shard(model, tmp_path):
    out = save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    _resave_without(out / shard, add={"model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match=rf"{shard}: unexpected tensor 'model\.layers\.9\.mlp\.up_proj"):
        load_pretrained(out)


def test_shape_mismatch_names_file_and_tensor(model, tmp_path):
    out = save_pretrained(model, tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape",
    ):
        load_pretrained(out)


def test_corrupt_and_incomplete_directories(model, tmp_path):
    out = save_pretrained(model, tmp_path / "ckpt")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or unreadable"):
        load_pretrained(out)

    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_pretrained(out)

    (out / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_pretrained(out)
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(tmp_path / "nope")


def test_missing_shard_and_bad_config(model, tmp_path):
    out = save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=20_000)
    next(out.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-\d+\.safetensors: shard listed in"):
        load_pretrained(out)

    out = save_pretrained(model, tmp_path / "ckpt2")
    (out / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="model_type 'gpt2'"):
        load_pretrained(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pretrained(out)


def test_save_unwraps_compiled_and_ddp_style_wrappers(model, tmp_path):
    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    out = save_pretrained(Wrapper(model), tmp_path / "ckpt")
    _same_weights(load_pretrained(out), model)
